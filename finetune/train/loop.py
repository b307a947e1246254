"""The one training loop. It knows nothing of SD1 vs SDXL or LoRA vs DreamBooth: the family
turns images and captions into model inputs and targets, the method decides what trains and
what is saved; the loop does the accumulation, precision, logging, sampling and checkpoints."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import FinetuneError, safe_name
from . import checkpoint as ckpt
from .batches import BatchSource, fork_rng
from .optim import build_optimizer
from .preflight import preflight
from .run_dir import MetricsLog, open_run, owned
from .signals import GracefulStop

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class RunResult:
    run_dir: Path
    files: list[Path]
    losses: list[float]
    steps: int
    samples: list[Path] = field(default_factory=list)
    interrupted: str | None = None  # the signal's name when a run stopped early with a checkpoint
    checkpoint: Path | None = None
    # In-memory objects for callers that go on using them (tests, notebooks).
    components: object = None
    optimizer: object = None


def resolve_family(model_cfg):
    """The family and the source of the base model described by a recipe's `model` section."""
    from ..families import detect_family, get_family
    from ..families.base import resolve_source

    source = resolve_source(model_cfg.base, model_cfg.allow_pickle)
    if model_cfg.family != "auto":
        return get_family(model_cfg.family), source
    index = source.model_index()
    if index is None:
        return get_family("sd1"), source  # single files and hub ids: SD1.x/2.x unless told otherwise
    return detect_family(index), source


def apply_memory_options(c, method, training) -> None:
    if training.gradient_checkpointing:
        # The denoiser always: gradients flow through it even when only embeddings train.
        c.denoiser.enable_gradient_checkpointing()
        trained = method.trainable_modules(c)
        for te in c.text_encoders.values():
            if any(te is m for m in trained) and hasattr(te, "gradient_checkpointing_enable"):
                te.gradient_checkpointing_enable()


def decide_caching(recipe, dataset, method) -> tuple[bool, bool]:
    data = recipe.data
    latents = dataset.deterministic if data.cache_latents == "auto" else bool(data.cache_latents)
    if latents and not dataset.deterministic:
        raise FinetuneError("data.cache_latents: cannot cache latents with random crops or flips; "
                            "set data.crop=center and data.random_flip=false, or cache_latents=false")
    text = not method.trains_text_encoder if data.cache_text_embeddings == "auto" else bool(data.cache_text_embeddings)
    if text and method.trains_text_encoder:
        raise FinetuneError("data.cache_text_embeddings: cannot cache while the text encoder trains; set it to false or auto")
    return latents, text


def train(recipe, recipe_path: Path | None = None, log: Callable[[str], None] = print,
          progress: bool = True, resume: str | None = None, allow_changed_data: bool = False) -> RunResult:
    """Train as `recipe` says. `resume`: "latest" or a run folder / checkpoint to continue exactly;
    refused when the training data changed since, unless `allow_changed_data`."""
    from ..data import ImageCaptionDataset, discover_examples

    preflight(recipe)
    tr = recipe.training
    family, source = resolve_family(recipe.model)
    base_dir = recipe_path.parent if recipe_path else None
    examples = discover_examples(recipe.data, base_dir, log=log)
    dataset = ImageCaptionDataset(examples, recipe.data, seed=tr.seed)
    log(f"data: {len(examples)} images x {recipe.data.repeats} repeats from {recipe.data.path}")

    # The folder is this run's (created, or locked for a resume) before any model loads.
    run_dir, run_name, resume_from, lock = open_run(recipe, recipe_path, resume, log)
    with owned(run_dir, lock, log):
        if resume_from is not None:
            ckpt.check_same_data(resume_from, ckpt.data_fingerprint(examples), allow_changed_data, log)
        return _load_and_train(recipe, log, progress, family, source, examples, dataset, run_dir, run_name,
                               resume_from)


def _load_and_train(recipe, log, progress, family, source, examples, dataset, run_dir, run_name,
                    resume_from) -> RunResult:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from diffusers.training_utils import cast_training_params

    from ..data.prior import ensure_class_images
    from ..hooks import build_pipeline
    from ..methods import get_method

    tr = recipe.training

    # Before the model loads: a configured filter that cannot load stops the run now (fail closed).
    output_hooks = build_pipeline(recipe.output.hooks, log)
    # accelerate keeps process-wide state; a second run in one process (notebooks, benchmarks)
    # may ask for another precision, so start from a clean slate each time.
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(mixed_precision=tr.mixed_precision, gradient_accumulation_steps=tr.gradient_accumulation_steps)
    set_seed(tr.seed)

    log(f"loading {source.label} ({family.name})")
    c = family.load(source, recipe.model)
    weight_dtype = WEIGHT_DTYPES[tr.mixed_precision]
    device = accelerator.device
    # The VAE stays fp32: SD VAEs overflow in fp16 (NaN latents, black images).
    c.vae.to(device, dtype=torch.float32)
    if getattr(c.denoiser, "is_quantized", False):  # bitsandbytes 8-bit/NF4 weights keep their own dtype
        c.denoiser.to(device)
    else:
        c.denoiser.to(device, dtype=weight_dtype)
    for te in c.text_encoders.values():
        te.to(device, dtype=weight_dtype)
    class_files = []
    pp = recipe.prior_preservation
    if pp.enabled:
        # Made by the untouched base model, before any adapter is attached.
        # Apart from the training RNG: a run that generates its class images and one that finds
        # them (a second run, a resume) then train alike.
        with accelerator.autocast(), fork_rng():
            class_files = ensure_class_images(c.pipeline, pp, recipe.data.resolution, log, progress,
                                              screen=output_hooks.screening())
        if not class_files:
            raise FinetuneError(f"prior_preservation.class_data_dir: no usable class images in {pp.class_data_dir}")
        log(f"prior preservation: {len(class_files)} class images, prior loss weight {pp.prior_loss_weight}")
    method = get_method(recipe.method, family, tr)
    groups = method.setup(c)
    trainable = method.trainable_modules(c)
    if weight_dtype != torch.float32:
        cast_training_params(trainable, dtype=torch.float32)
    apply_memory_options(c, method, tr)
    n_trainable = method.trainable_parameter_count(groups)
    log(f"method {recipe.method.type}: {n_trainable:,} trainable parameters")
    log(f"run folder: {run_dir}")
    return _train_loop(recipe, log, progress, accelerator, family, source, c, method, groups, dataset,
                       examples, class_files, run_dir, run_name, weight_dtype, output_hooks, resume_from)


def _non_finite(loss, step: int, keys: list[str], recipe, in_a_row: int, log) -> None:
    """Stop on a NaN/inf loss, or (training.on_nan: skip) log it and go on, within a limit."""
    tr = recipe.training
    if tr.mixed_precision == "fp16":
        cause = "fp16 overflow is the usual cause: use bf16, or lower training.learning_rate"
    else:
        cause = (f"training.learning_rate {tr.learning_rate:g} is likely too high (or an image is broken: "
                 "finetune dataset check)")
    what = f"loss became {loss.item()} at step {step} on {', '.join(map(safe_name, keys))}"
    if tr.on_nan == "stop":
        raise FinetuneError(f"{what}; {cause}. training.on_nan: skip skips such batches instead")
    if in_a_row > tr.max_skipped_in_a_row:
        raise FinetuneError(f"{what}; {in_a_row} batches in a row were skipped (training.max_skipped_in_a_row: "
                            f"{tr.max_skipped_in_a_row}); {cause}")
    log(f"warning: {what}; batch skipped (training.on_nan: skip). {cause}")


def _train_loop(recipe, log, progress, accelerator, family, source, c, method, groups, dataset, examples,
                class_files, run_dir, run_name, weight_dtype, output_hooks, resume_from) -> RunResult:
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from ..data import ImageCaptionDataset
    from ..data.prior import class_examples
    from ..export.model_card import write_model_card
    from ..hooks import Provenance
    from .sampling import emit_images

    tr = recipe.training
    device = accelerator.device
    trainable = method.trainable_modules(c)
    cache_latents, cache_text = decide_caching(recipe, dataset, method)

    def encode(pixels):
        return family.encode_images(c, pixels.to(device))

    source_args = dict(batch_size=tr.batch_size, seed=tr.seed, encode=encode, cache_latents=cache_latents,
                       dtype=weight_dtype, progress=progress)
    instances = BatchSource(dataset, desc="caching latents", **source_args)
    classes = None
    if class_files:
        class_set = ImageCaptionDataset(class_examples(class_files, recipe.prior_preservation.class_prompt),
                                        recipe.data.model_copy(update={"repeats": 1, "caption_dropout": 0.0}),
                                        seed=tr.seed + 1)
        classes = BatchSource(class_set, desc="caching class latents", **source_args)
    steps_per_epoch = max(1, math.ceil(len(instances) / tr.gradient_accumulation_steps))
    max_steps = tr.max_steps or tr.epochs * steps_per_epoch
    n_epochs = math.ceil(max_steps / steps_per_epoch)

    optimizer = build_optimizer(groups, recipe.optimizer, tr.learning_rate)
    lr_scheduler = get_scheduler(tr.lr_scheduler, optimizer, num_warmup_steps=tr.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)
    prepared = accelerator.prepare(*trainable, optimizer, lr_scheduler)
    wrapped = {id(m): w for m, w in zip(trainable, prepared[:-2])}
    c.denoiser = wrapped.get(id(c.denoiser), c.denoiser)
    c.text_encoders = {n: wrapped.get(id(te), te) for n, te in c.text_encoders.items()}
    trainable, optimizer, lr_scheduler = list(prepared[:-2]), prepared[-2], prepared[-1]
    params = [p for g in groups for p in g["params"]]
    ckpt.register_param_hooks(accelerator, groups)

    text_cache: dict[str, dict[str, torch.Tensor]] = {}
    truncated = family.count_truncated(c, [e.caption or "" for e in examples])
    if truncated:
        log(f"warning: {truncated} caption(s) are longer than the text encoder's token limit and will be cut")

    def conditioning(captions: list[str]) -> dict[str, torch.Tensor]:
        if not cache_text:
            return family.encode_prompts(c, captions)
        missing = [cap for cap in dict.fromkeys(captions) if cap not in text_cache]
        if missing:
            with torch.no_grad():
                enc = family.encode_prompts(c, missing)
            for j, cap in enumerate(missing):
                text_cache[cap] = {k: v[j] for k, v in enc.items()}
        return {k: torch.stack([text_cache[cap][k] for cap in captions]) for k in text_cache[captions[0]]}

    def batch_loss(source: BatchSource, batch: dict) -> torch.Tensor:
        latents = source.latents(batch).to(device, weight_dtype)
        cond = {**conditioning([method.prepare_caption(cap) for cap in batch["captions"]]),
                **family.image_conditioning(c, batch)}
        noisy, timesteps, target = family.sample_noisy(c, latents, tr.noise_offset)
        with accelerator.autocast():
            pred = family.predict(c, noisy, timesteps, cond)
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
        weights = family.loss_weights(c, timesteps, tr.min_snr_gamma)
        return (loss * weights).mean() if weights is not None else loss.mean()

    def validate(step: int) -> list[Path]:
        v = recipe.validation
        if not v.prompts:
            return []
        for m in trainable:
            m.eval()
        pipe = c.pipeline
        pipe.set_progress_bar_config(disable=True)
        res = recipe.data.resolution
        try:
            return emit_images(pipe, v.prompts, output_hooks, run_dir / "samples" / f"step-{step:06d}", seed=v.seed,
                               n=v.images_per_prompt, steps=v.num_inference_steps, guidance=v.guidance_scale,
                               negative_prompt=v.negative_prompt, width=v.width or res, height=v.height or res,
                               autocast=accelerator.autocast,
                               provenance=Provenance(prompt="", base_model=source.label, run=run_name,
                                                     kind=f"validation step {step}"), log=log)
        finally:
            for m in trainable:
                m.train()

    def save_checkpoint(state: ckpt.TrainerState) -> Path:
        def write(folder: Path) -> None:
            method.save(c, folder, recipe.output, run_name)  # usable on their own, like the final files
            accelerator.save_state(str(folder / ckpt.STATE))

        state.data = state.data or ckpt.data_fingerprint(examples)
        folder = run_dir / "checkpoints"
        return ckpt.save(folder, state.step, write, state, ckpt.estimate_size(folder, groups),
                         recipe.output.keep_last_checkpoints)

    state = ckpt.TrainerState()
    if resume_from is not None:
        # After caching, which draws from the RNG exactly as the first run did; now the RNG, optimizer,
        # scheduler and trained weights become those of the checkpoint.
        accelerator.load_state(str(resume_from / ckpt.STATE))
        state = ckpt.read_trainer_state(resume_from)
        state.data = {}  # recorded afresh at the next save: the data may have changed (--allow-changed-data)
        method.load_state_dict(state.method, c)
        ckpt.discard_after(run_dir, resume_from, state.step)
        log(f"resuming from {resume_from} at step {state.step} (epoch {state.epoch}, batch {state.batches_in_epoch})")

    metrics = MetricsLog(run_dir / "metrics.jsonl")
    log(f"training {max_steps} steps ({n_epochs} epochs of {steps_per_epoch}), batch {tr.batch_size} "
        f"x {tr.gradient_accumulation_steps} accumulation, on {device}")
    bar = tqdm(total=max_steps, initial=state.step, desc="train", disable=not progress or not accelerator.is_main_process)
    for m in trainable:
        m.train()
    losses, samples, step, window, prior_window = state.losses, [], state.step, [], []
    class_batches = classes.forever(skip=state.class_batches) if classes is not None else None
    start = last = time.perf_counter()
    images_seen, skipped_in_a_row, has_grads = 0, 0, False
    stop = GracefulStop(log)
    with stop:
        for epoch in range(state.epoch, n_epochs):
            first = state.batches_in_epoch if epoch == state.epoch else 0
            for batch_index, batch in enumerate(instances.epoch(epoch, skip=first), start=first):
                with accelerator.accumulate(*trainable):
                    loss = batch_loss(instances, batch)
                    if classes is not None:
                        class_batch = next(class_batches)
                        state.class_batches += 1
                        prior_loss = batch_loss(classes, class_batch)
                        prior_window.append(prior_loss.detach().item())
                        loss = loss + recipe.prior_preservation.prior_loss_weight * prior_loss
                    if torch.isfinite(loss):
                        skipped_in_a_row = 0
                        accelerator.backward(loss)
                        has_grads = True
                    else:
                        skipped_in_a_row += 1
                        state.skipped_steps += 1
                        _non_finite(loss, step + 1, batch["keys"], recipe, skipped_in_a_row, log)
                    if accelerator.sync_gradients and tr.max_grad_norm and has_grads:
                        accelerator.clip_grad_norm_(params, tr.max_grad_norm)
                    if has_grads:  # every batch of this step skipped: nothing to apply (nor to unscale)
                        optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    if accelerator.sync_gradients:
                        method.after_step(c)
                        has_grads = False
                if torch.isfinite(loss):
                    window.append(loss.detach().item())
                images_seen += len(batch["keys"])
                if not accelerator.sync_gradients:
                    continue
                step += 1
                step_loss = sum(window) / len(window) if window else float("nan")
                window = []
                losses.append(step_loss)
                lr = lr_scheduler.get_last_lr()[0]
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
                if step % tr.log_every_n_steps == 0 or step == max_steps:
                    now = time.perf_counter()
                    extra = {"prior_loss": sum(prior_window) / len(prior_window)} if prior_window else {}
                    if state.skipped_steps:
                        extra["skipped_batches"] = state.skipped_steps
                    metrics.write(step=step, epoch=epoch, loss=step_loss, lr=lr, **extra,
                                  images_per_second=images_seen / max(now - last, 1e-9), elapsed_s=round(now - start, 3))
                    last, images_seen, prior_window = now, 0, []
                v_every = recipe.validation.every_n_steps
                if v_every and step % v_every == 0 and step != max_steps:
                    samples += validate(step)
                state.step, state.epoch, state.batches_in_epoch = step, epoch, batch_index + 1
                state.method = method.state_dict()
                s_every = recipe.output.save_every_n_steps
                if (s_every and step % s_every == 0 or stop.requested) and step != max_steps:
                    saved = save_checkpoint(state)
                    if stop.requested:
                        bar.close()
                        metrics.close()
                        log(f"{stop.name}: stopped at step {step} of {max_steps}; checkpoint {saved}")
                        return RunResult(run_dir=run_dir, files=[], losses=losses, steps=step, samples=samples,
                                         interrupted=stop.name, checkpoint=saved, components=c, optimizer=optimizer)
                if step >= max_steps:
                    break
            if step >= max_steps:
                break
    bar.close()
    metrics.close()

    c.denoiser = accelerator.unwrap_model(c.denoiser)
    files = method.save(c, run_dir, recipe.output, run_name)
    final_samples = validate(step)
    samples += final_samples
    card = write_model_card(run_dir, recipe, family, method, source, run_name, files, final_samples, losses)
    log(f"done: {step} steps, final loss {losses[-1]:.4f}; wrote {', '.join(str(f) for f in [*files, card])}")
    return RunResult(run_dir=run_dir, files=files, losses=losses, steps=step, samples=samples,
                     components=c, optimizer=optimizer)
