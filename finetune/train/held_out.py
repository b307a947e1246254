"""Images kept out of training, and what is measured on them: a held-out validation loss at each
validation step, the best checkpoint by it (`output.keep_best`) and early stopping
(`training.early_stopping`).

- The split (`data.validation_split`) is a seeded permutation of the example keys: the same
  images are held out on every process and in a resumed run; they leave the examples before the
  dataset is built, so no training batch can draw them (and the data fingerprint a resume checks
  covers the training images only). `data.validation_path` names a set of its own instead.
- Their latents and caption embeddings are made by `cache_held_out` while the VAE and the text
  encoders are still on the GPU (from `build_feed`, before either may be offloaded): measuring
  never runs a text encoder that has left. Only a method that trains the text encoder (its
  outputs change as it trains; it is never offloaded then) has its captions encoded when measured.
- The loss is `evaluate.fixed_noise_loss` per image under that image's own seed, so the same
  noise and timesteps every validation: two values differ only by what the model learned. The
  main process measures, every process receives the value (every one must take the same
  keep_best and early-stopping decisions, which save checkpoints together).
- keep_best: a validation with a lower value than every earlier one saves a checkpoint at that
  step (`checkpoints/step-NNNNNN`, as any other) and names it in `checkpoints/best.json`; the
  trainer state records it too, and `keep_last_checkpoints` never deletes it (checkpoint.py).
  The final files in the run folder stay the last step's.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..errors import FinetuneError

SPLIT_STREAM = 7  # seeded_rng stream of the split, apart from the dataset's and the loss's streams
REPEATS = 4  # noise and timestep draws per held-out image: a steadier mean than one draw
BEST = "best.json"
METRIC = "val_loss"


# ------------------------------------------------------------------ the split, before any model loads


def split_examples(recipe, examples: list, base_dir: Path | None, log) -> tuple[list, list]:
    """(training examples, held-out examples) as `data.validation_split` / `data.validation_path` say."""
    data = recipe.data
    if data.validation_path:
        held = _path_examples(data, base_dir, log)
        log(f"validation: {len(held)} held-out images from {data.validation_path}")
        return examples, held
    if not data.validation_split:
        return examples, []
    n = len(examples)
    k = int(n * data.validation_split + 1e-9)  # 0.3 x 10 is 3.0000000000000004 in floats, 0.29 x 100 28.999...
    if k == 0:
        raise FinetuneError(f"data.validation_split: {data.validation_split} of {n} images holds none out; use at "
                            f"least {math.ceil(1 / data.validation_split - 1e-9)} images, a larger split (at most "
                            "0.5) or data.validation_path")
    held_keys = set(held_out_keys([e.key for e in examples], k, recipe.training.seed))
    log(f"validation: {k} of {n} images held out (data.validation_split {data.validation_split}, "
        f"seed {recipe.training.seed})")
    return [e for e in examples if e.key not in held_keys], [e for e in examples if e.key in held_keys]


def held_out_keys(keys: list[str], k: int, seed: int) -> list[str]:
    """`k` of `keys`, chosen by `seed` alone: the order keys were found in does not matter."""
    from ..data.buckets import seeded_rng

    return [str(key) for key in seeded_rng(seed, SPLIT_STREAM).permutation(sorted(keys))[:k]]


def _path_examples(data, base_dir, log) -> list:
    from ..data import discover_examples

    cfg = data.model_copy(update={"path": data.validation_path, "source": "auto"})
    try:
        return discover_examples(cfg, base_dir, log=log)
    except FinetuneError as e:  # its messages name data.path, the key it was given
        raise FinetuneError(str(e).replace("data.path", "data.validation_path")) from None


# ------------------------------------------------------------------ caches, while the encoders are on the GPU


@dataclass
class HeldOutCache:
    keys: list[str]
    latents: dict  # key -> latent (CPU, weight dtype)
    sizes: dict  # key -> size conditioning (original_size, crop_top_left, target_size)
    captions: dict  # key -> caption as it trains (after the method's rewrite)
    text: object  # TextCache of the captions; None: encoded when measured (the text encoder trains)


def cache_held_out(run, accelerator) -> HeldOutCache | None:
    """Latents and (with a frozen text encoder) caption embeddings of the held-out images, shared by
    every process; whole images (centre crop, no flip, no caption dropout), each latent seeded alone."""
    if not getattr(run, "held_out", None):
        return None
    from ..data import ImageCaptionDataset
    from .caches import TextCache, build_latent_cache, build_text_cache, encode_caption
    from .setup import WEIGHT_DTYPES

    tr = run.recipe.training
    cfg = run.recipe.data.model_copy(update={"repeats": 1, "caption_dropout": 0.0, "crop": "center",
                                             "random_flip": False})
    ds = ImageCaptionDataset(run.held_out, cfg, seed=tr.seed)
    encode = lambda px: run.family.encode_images(run.c, px.to(accelerator.device))  # noqa: E731
    latents, sizes = build_latent_cache(ds, encode, tr.seed + 2, WEIGHT_DTYPES[tr.mixed_precision], accelerator, None)
    captions = {e.key: run.method.prepare_caption(e.caption or "") for e in ds.examples}
    text = None
    if not run.method.trains_text_encoder:
        entries = build_text_cache(sorted(set(captions.values())), partial(encode_caption, run.family, run.c),
                                   accelerator, None)
        text = TextCache(entries, accelerator.device)
    return HeldOutCache([e.key for e in ds.examples], latents, sizes, captions, text)


# ------------------------------------------------------------------ measuring and deciding, during training


def observe(record: dict, step: int, value: float, min_delta: float) -> bool:
    """Add one validation to `record` (kept in the trainer state, so a resume goes on from it); True
    when it is the lowest yet. Early stopping counts the validations since the last improvement by more
    than `min_delta` over the value it last improved to (`since`)."""
    lowest = "best" not in record or value < record["best"]
    if lowest:
        record.update(best=value, best_step=step)
    if "reference" not in record or value < record["reference"] - min_delta:
        record.update(reference=value, since=0)
    else:
        record["since"] += 1
    return lowest


class HeldOut:
    """The trainer's held-out measurements: `validate(step)` at each validation step and at the end."""

    def __init__(self, trainer):
        self.t, self.cache = trainer, trainer.feed.held_out
        self.measured_at: int | None = None
        out, es = trainer.recipe.output, trainer.tr.early_stopping
        self.keep_best, self.early = out.keep_best == METRIC, es if es and es.metric == METRIC else None
        if trainer.run.resume_from is not None and trainer.accelerator.is_main_process:
            self._sync_best_file()

    @property
    def record(self) -> dict:
        return self.t.state.held_out

    def validate(self, step: int, end: bool = False) -> bool:
        """Measure (once per step), keep the best checkpoint; True when early stopping ends the run here."""
        if self.cache is None or self.measured_at == step:
            return False
        from .distributed import on_main

        t = self.t
        self.measured_at = step
        value = on_main(t.accelerator, self.loss)
        lowest = observe(self.record, step, value, self.early.min_delta if self.early else 0.0)
        self._write_row(step, value)
        if self.keep_best and lowest:
            self.record["checkpoint"] = f"step-{step:06d}"  # before saving: pruning spares what this names
            saved = t.save_checkpoint()
            if t.accelerator.is_main_process:
                self._write_best_file(saved)
        if end or not self.early or self.record["since"] < self.early.patience:
            return False
        t.log(f"early stopping at step {step}: {METRIC} has not improved by {self.early.min_delta} for "
              f"{self.early.patience} validations (best {self.record['best']:.4f} at step {self.record['best_step']})")
        t.save_checkpoint()
        return True

    def loss(self) -> float:
        """The mean fixed-noise loss over the held-out images, with the model as it is now."""
        t = self.t
        for m in t.trainable:
            m.eval()  # LoRA dropout off: the same weights give the same value
        try:
            return sum(self._image_loss(i, key) for i, key in enumerate(self.cache.keys)) / len(self.cache.keys)
        finally:
            for m in t.trainable:
                m.train()

    def _image_loss(self, i: int, key: str) -> float:
        import torch

        from .evaluate import fixed_noise_loss
        from .setup import WEIGHT_DTYPES

        t, cache, family = self.t, self.cache, self.t.run.family
        caption, tr = cache.captions[key], t.tr
        latent = cache.latents[key][None].to(t.accelerator.device, WEIGHT_DTYPES[tr.mixed_precision])
        with torch.no_grad():
            text = cache.text([caption]) if cache.text is not None else family.encode_prompts(t.c, [caption])
            cond = {**text, **family.image_conditioning(t.c, {k: [v] for k, v in cache.sizes[key].items()})}
            with t.accelerator.autocast():
                return fixed_noise_loss(family, t.c, latent, [caption], seed=_image_seed(tr.seed, i),
                                        repeats=REPEATS, cond=cond)

    def _write_row(self, step: int, value: float) -> None:
        from .run_dir import MetricsLog

        best = f" (lowest {self.record['best']:.4f} at step {self.record['best_step']})" \
            if self.record["best_step"] != step else " (lowest yet)"
        self.t.log(f"step {step}: {METRIC} {value:.4f} on {len(self.cache.keys)} held-out images{best}")
        if not self.t.accelerator.is_main_process:
            return
        # Its own row: the step's row (trainer._report) is written before validation. Through the loop's
        # log while it is open (the trackers get it too); the end-of-run value after it closed, to the file.
        if getattr(self.t, "metrics", None) is not None:
            self.t.metrics.write(step=step, **{METRIC: value})
            return
        rows = MetricsLog(self.t.run.run_dir / "metrics.jsonl")
        try:
            rows.write(step=step, **{METRIC: value})
        finally:
            rows.close()

    def _write_best_file(self, saved: Path) -> None:
        from ..files import write_text_atomically

        r = self.record
        write_text_atomically(saved.parent / BEST, json.dumps(
            {"metric": METRIC, "value": r["best"], "step": r["best_step"], "checkpoint": saved.name}, indent=1))

    def _sync_best_file(self) -> None:
        """After a resume, best.json says what the resumed state says (a later best of the run that was
        interrupted is not this run's)."""
        folder = self.t.run.run_dir / "checkpoints"
        name = self.record.get("checkpoint")
        if name and (folder / name).is_dir():
            self._write_best_file(folder / name)
            return
        (folder / BEST).unlink(missing_ok=True)
        if name:
            self.t.log(f"warning: output.keep_best: {name}, the best checkpoint when this run was saved, is gone; "
                       "the next best is kept from here")
            self.record.pop("checkpoint")


def _image_seed(seed: int, i: int) -> int:
    from ..data.buckets import seeded_rng

    return int(seeded_rng(seed, SPLIT_STREAM, i).integers(0, 2**63 - 1))


# ------------------------------------------------------------------ the model card


def card_rows(run_dir: Path) -> list[str]:
    """Model-card table rows: the held-out loss at the end and its lowest, and the kept best checkpoint."""
    from .run_dir import read_metrics

    values = [(row["step"], row[METRIC]) for row in read_metrics(Path(run_dir) / "metrics.jsonl") if isinstance(row.get(METRIC), (int, float))]
    if not values:
        return []
    (last_step, last), (low_step, low) = values[-1], min(values, key=lambda sv: sv[1])
    rows = [f"| held-out loss ({METRIC}) | {last:.4f} at step {last_step}; lowest {low:.4f} at step {low_step} |"]
    try:
        best = json.loads((Path(run_dir) / "checkpoints" / BEST).read_text(encoding="utf-8"))
        rows.append(f"| best checkpoint | `checkpoints/{best['checkpoint']}`: {METRIC} {best['value']:.4f} at step "
                    f"{best['step']} (the files in this folder are step {last_step}'s) |")
    except (OSError, ValueError, KeyError):
        pass
    return rows
