"""What the optimizers that schedule themselves (Prodigy, schedule-free AdamW, Adafactor's relative step)
ask of the rest of a recipe: checked with the recipe (`finetune validate`), before any model loads."""

from __future__ import annotations

# Below this a Prodigy run trains many times slower than the step size it estimates (its default is 1.0).
PRODIGY_MIN_LR = 0.1
# The method keys that give a parameter group a rate of its own (lora, dreambooth; textual inversion, pivotal).
GROUP_RATES = ("text_encoder_lr", "text_encoder_2_lr", "learning_rate")


def optimizer_problem(recipe) -> str | None:
    """The first problem as "key.path: message", or None."""
    opt, tr = recipe.optimizer, recipe.training
    own = {"prodigy": "Prodigy sets its own step size",
           "adamw_schedulefree": "schedule-free AdamW needs no schedule (it samples and saves its running average)",
           }.get(opt.type)
    if opt.type == "adafactor" and opt.relative_step:
        own = "Adafactor with optimizer.relative_step follows its own schedule"
    if own and tr.lr_scheduler != "constant":
        return f"training.lr_scheduler: {own}; use constant (got {tr.lr_scheduler})"
    if opt.type == "prodigy":
        return _prodigy_problem(recipe)
    if own and opt.type == "adafactor" and tr.lr_warmup_steps:
        return ("training.lr_warmup_steps: Adafactor with optimizer.relative_step has its own warm-up "
                "(optimizer.warmup_init); use 0")
    return None


def _prodigy_problem(recipe) -> str | None:
    tr = recipe.training
    if tr.learning_rate < PRODIGY_MIN_LR:
        return (f"training.learning_rate: Prodigy multiplies the step size it estimates by this rate; use 1.0 "
                f"(tune optimizer.d_coef, 0.5-2, instead): {tr.learning_rate:g} would train about "
                f"{1 / tr.learning_rate:,.0f}x slower than that estimate")
    if tr.lr_warmup_steps:
        return ("training.lr_warmup_steps: Prodigy's step size starts tiny and grows by itself, and the constant "
                "schedule has no warm-up; use 0 (optimizer.use_bias_correction + safeguard_warmup damp the first steps)")
    if tr.scale_lr:
        return "training.scale_lr: Prodigy estimates its step size for the batch it sees; scaling it overshoots"
    for key in GROUP_RATES:
        rate = getattr(recipe.method, key, None)
        if rate is not None and rate != tr.learning_rate:
            return (f"method.{key}: Prodigy takes one rate for every parameter group (prodigyopt refuses others); "
                    f"unset it, or set it to training.learning_rate ({tr.learning_rate:g})")
    return None
