"""The one training loop. It knows nothing of SD1 vs SDXL or LoRA vs DreamBooth: the family
turns images and captions into model inputs and targets, the method decides what trains and
what is saved; the loop does the accumulation, precision, logging, sampling and checkpoints."""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import FinetuneError
from .batches import BatchSource
from .optim import build_optimizer
from .run_dir import MetricsLog, create_run_dir, plan_run_dir

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class RunResult:
    run_dir: Path
    files: list[Path]
    losses: list[float]
    steps: int
    samples: list[Path] = field(default_factory=list)
    # In-memory objects for callers that go on using them (tests, notebooks).
    components: object = None
    optimizer: object = None


def preflight(recipe) -> None:
    """Hardware checks that need no model: fail before anything heavy loads."""
    mp = recipe.training.mixed_precision
    if mp == "fp16" and not torch.cuda.is_available():
        raise FinetuneError("training.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on this machine")
    if mp == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise FinetuneError("training.mixed_precision: this GPU does not support bf16; use fp16")


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
          progress: bool = True) -> RunResult:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from diffusers.training_utils import cast_training_params

    from ..data import ImageCaptionDataset, discover_examples
    from ..data.prior import ensure_class_images
    from ..methods import get_method

    preflight(recipe)
    tr = recipe.training
    family, source = resolve_family(recipe.model)
    base_dir = recipe_path.parent if recipe_path else None
    examples = discover_examples(recipe.data, base_dir)
    dataset = ImageCaptionDataset(examples, recipe.data, seed=tr.seed)
    log(f"data: {len(examples)} images x {recipe.data.repeats} repeats from {recipe.data.path}")

    run_dir, run_name = plan_run_dir(recipe, recipe_path)
    from ..hooks import build_pipeline

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
    c.denoiser.to(device, dtype=weight_dtype)
    for te in c.text_encoders.values():
        te.to(device, dtype=weight_dtype)
    class_files = []
    pp = recipe.prior_preservation
    if pp.enabled:
        # Made by the untouched base model, before any adapter is attached.
        with accelerator.autocast():
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
    create_run_dir(run_dir, recipe)
    log(f"run folder: {run_dir}")
    with _discard_if_failed(run_dir):
        return _train_loop(recipe, log, progress, accelerator, family, source, c, method, groups, dataset,
                           examples, class_files, run_dir, run_name, weight_dtype, output_hooks)


@contextlib.contextmanager
def _discard_if_failed(run_dir: Path):
    try:
        yield
    except BaseException:
        # A run that dies before its first checkpoint leaves nothing worth keeping.
        if not (run_dir / "checkpoints").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _train_loop(recipe, log, progress, accelerator, family, source, c, method, groups, dataset, examples,
                class_files, run_dir, run_name, weight_dtype, output_hooks) -> RunResult:
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
        cond = conditioning([method.prepare_caption(cap) for cap in batch["captions"]])
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
                                                     kind=f"validation step {step}"))
        finally:
            for m in trainable:
                m.train()

    def save_checkpoint(step: int) -> None:
        # Written whole into a temporary folder, then renamed: a crash never leaves half a checkpoint.
        final = run_dir / "checkpoints" / f"step-{step:06d}"
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
        try:
            method.save(c, tmp, recipe.output, run_name)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        keep = recipe.output.keep_last_checkpoints
        if keep:
            # Only now that the new one is complete do older ones go.
            done = sorted(p for p in final.parent.glob("step-*") if p.is_dir())
            for old in done[:-keep]:
                shutil.rmtree(old)

    metrics = MetricsLog(run_dir / "metrics.jsonl")
    log(f"training {max_steps} steps ({n_epochs} epochs of {steps_per_epoch}), batch {tr.batch_size} "
        f"x {tr.gradient_accumulation_steps} accumulation, on {device}")
    bar = tqdm(total=max_steps, desc="train", disable=not progress or not accelerator.is_main_process)
    for m in trainable:
        m.train()
    losses, samples, step, window, prior_window = [], [], 0, [], []
    class_batches = classes.forever() if classes is not None else None
    start = last = time.perf_counter()
    images_seen = 0
    for epoch in range(n_epochs):
        for batch in instances.epoch(epoch):
            with accelerator.accumulate(*trainable):
                loss = batch_loss(instances, batch)
                if classes is not None:
                    class_batch = next(class_batches)
                    prior_loss = batch_loss(classes, class_batch)
                    prior_window.append(prior_loss.detach().item())
                    loss = loss + recipe.prior_preservation.prior_loss_weight * prior_loss
                if not torch.isfinite(loss):
                    raise FinetuneError(f"loss became {loss.item()} at step {step + 1} on {', '.join(batch['keys'])}; "
                                        "lower training.learning_rate, or use bf16 instead of fp16")
                accelerator.backward(loss)
                if accelerator.sync_gradients and tr.max_grad_norm:
                    accelerator.clip_grad_norm_(params, tr.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if accelerator.sync_gradients:
                    method.after_step(c)
            window.append(loss.detach().item())
            images_seen += len(batch["keys"])
            if not accelerator.sync_gradients:
                continue
            step += 1
            step_loss = sum(window) / len(window)
            window = []
            losses.append(step_loss)
            lr = lr_scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
            if step % tr.log_every_n_steps == 0 or step == max_steps:
                now = time.perf_counter()
                extra = {"prior_loss": sum(prior_window) / len(prior_window)} if prior_window else {}
                metrics.write(step=step, epoch=epoch, loss=step_loss, lr=lr, **extra,
                              images_per_second=images_seen / max(now - last, 1e-9), elapsed_s=round(now - start, 3))
                last, images_seen, prior_window = now, 0, []
            v_every = recipe.validation.every_n_steps
            if v_every and step % v_every == 0 and step != max_steps:
                samples += validate(step)
            s_every = recipe.output.save_every_n_steps
            if s_every and step % s_every == 0 and step != max_steps:
                save_checkpoint(step)
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
