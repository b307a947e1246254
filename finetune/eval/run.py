"""`finetune eval RUN_OR_ADAPTER`: sample a fixed, seeded set of prompts without and with the adapter,
measure both sets, and write `eval/` (eval.json, report.md, a base-vs-adapter grid per prompt and
the images) into the run folder whole, or not at all; the model card then links the report.

Everything that can be wrong with the input is found before a model loads (inputs.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FinetuneError
from . import inputs as I
from .images import ADAPTED, BASE, Settings

EVAL_DIR = "eval"


@dataclass
class EvalOptions:
    """The command line's options; None: the run's recipe says (else the defaults below)."""
    base: str | None = None
    family: str = "auto"
    prompts: Path | None = None
    reference: str | None = None
    triggers: list[str] = field(default_factory=list)
    n: int = 4
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    out: Path | None = None
    clip: str | None = None
    dino: str | None = None
    inception: bool = False
    device: str | None = None
    dtype: str | None = None


@dataclass
class Results:
    metrics: dict = field(default_factory=dict)  # name -> {"base": v, "adapter": v} (prior: {"adapter": v})
    missing: dict = field(default_factory=dict)  # name -> why it was not measured


def evaluate(target: str, opts: EvalOptions, log=print) -> Path:
    """Evaluate `target` (a run folder, a checkpoint folder or a LoRA file); the folder written."""
    from ..files import write_atomically
    from .models import load_metric_models
    from .report import link_from_card, write_report

    inputs, settings, recipe = prepare(target, opts, log)
    models = load_metric_models(metric_models(recipe, opts), {"clip", "dino", "inception"}, log)

    def build(tmp: Path) -> None:
        from .images import sample_both

        pairs, placement = sample_both(inputs, settings, tmp, opts.device, opts.dtype, log)
        results = measure(models, placement.torch_device, pairs, inputs.reference, settings.seed)
        write_report(tmp, inputs, settings, models, pairs, results, inputs.out)

    write_atomically(inputs.out, build, folder=True)  # an interrupted eval leaves the last one as it was
    if inputs.run_dir is not None and inputs.out.resolve() == (inputs.run_dir / EVAL_DIR).resolve():
        link_from_card(inputs.run_dir, inputs.out)
    return inputs.out


def prepare(target: str, opts: EvalOptions, log):
    """(EvalInputs, Settings, the run's recipe or None), every input checked; nothing is loaded."""
    from ..generate import check_options

    adapter, folder = I.find_adapter(target)
    recipe = run_dir = None
    if folder is not None:
        recipe, run_dir = I.run_recipe(folder)
        adapter = I.run_adapter(recipe, folder)
        if opts.base:
            I.check_family(recipe, opts.base, opts.family, run_dir)
    elif not opts.base:
        raise FinetuneError(f"--base: {target} is an adapter file alone; give the base model it was trained for")
    base = opts.base or recipe.model.base
    family = opts.family if opts.base else recipe.model.family
    rows = I.prompt_rows(opts.prompts, recipe)
    triggers = opts.triggers or (I.trigger_words(recipe) if recipe else [])
    subject, prior = I.split_prompts(rows, triggers, recipe)
    settings = _settings(opts, recipe)
    out = Path(opts.out) if opts.out else _default_out(folder, run_dir, adapter)
    check_options(settings.n, settings.seed, settings.steps, settings.guidance, settings.width, settings.height, out)
    reference, where = _reference(opts, recipe, run_dir, log)
    inputs = I.EvalInputs(target=str(target), base=base, family=family, adapter=adapter, run_dir=run_dir, out=out,
                          subject=subject, prior=prior, triggers=triggers, reference=reference, reference_where=where)
    return inputs, settings, recipe


def _settings(opts: EvalOptions, recipe) -> Settings:
    v = recipe.validation if recipe else None
    size = (v.width or recipe.data.resolution, v.height or recipe.data.resolution) if recipe else (None, None)
    return Settings(n=opts.n, seed=_first(opts.seed, v and v.seed, 0),
                    steps=_first(opts.steps, v and v.num_inference_steps, 25),
                    guidance=_first(opts.guidance, v and v.guidance_scale, 7.5), width=size[0], height=size[1])


def _first(*values):
    return next(v for v in values if v is not None)


def _default_out(folder: Path | None, run_dir: Path | None, adapter) -> Path:
    if run_dir is None:
        return Path("outputs") / f"eval-{adapter.path.stem}"
    if folder != run_dir:  # a checkpoint: beside the run's own eval
        return run_dir / f"{EVAL_DIR}-{folder.name}"
    return run_dir / EVAL_DIR


def _reference(opts: EvalOptions, recipe, run_dir: Path | None, log) -> tuple[list, str | None]:
    """The reference images: --reference, else the run's training images; none for a bare adapter."""
    from ..recipe.schema import DataConfig

    if opts.reference:
        return I.reference_examples(DataConfig(path=opts.reference), None, log), opts.reference
    if recipe is None:
        log("warning: no --reference images: subject fidelity (clip_i, dino) and distances are not measured")
        return [], None
    try:
        return I.reference_examples(recipe.data, run_dir, log), recipe.data.path
    except FinetuneError as e:
        raise FinetuneError(f"{e} (the run's data.path; give --reference DIR)") from None


def metric_models(recipe, opts: EvalOptions):
    """The run's validation.metric_models (else the defaults), with the command line's over them."""
    from ..recipe.schema import MetricModelsConfig

    cfg = recipe.validation.metric_models if recipe else MetricModelsConfig()
    changes = {k: v for k, v in (("clip", opts.clip), ("dino", opts.dino)) if v}
    if opts.inception:
        changes["inception"] = True
    return cfg.model_copy(update=changes)


def measure(models, device, pairs, reference: list, seed: int) -> Results:
    """Every metric of both sides: subject prompts' images against the reference, prior prompts'
    images against each other. Each metric model embeds on `device`, one at a time."""
    from .measure import distribution_scores, embed_each_on, prior_scores, subject_scores

    ref = embed_each_on(models, lambda: (e.load().convert("RGB") for e in reference), device)
    subject, prior = [p for p in pairs if p.subject], [p for p in pairs if not p.subject]
    out = Results()
    for side in (BASE, ADAPTED):
        images = embed_each_on(models, lambda: _open(subject, side), device)  # noqa: B023 - called at once
        scores = subject_scores(models, images, [p.prompt for p in subject], ref)
        scores.add(distribution_scores(models, images, ref, seed=seed))
        for name, value in scores.values.items():
            out.metrics.setdefault(name, {})[side] = value
        out.missing.update(scores.missing)
    drift = prior_scores(models, embed_each_on(models, lambda: _open(prior, BASE), device),
                         embed_each_on(models, lambda: _open(prior, ADAPTED), device))
    out.metrics.update({name: {ADAPTED: value} for name, value in drift.values.items()})
    out.missing.update(drift.missing)
    return out


def _open(pairs, side: str):
    from PIL import Image

    for p in pairs:
        with Image.open(p.base if side == BASE else p.adapted) as im:
            yield im.convert("RGB")
