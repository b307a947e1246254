"""`validation.metrics` during training: clip_score, clip_i, dino and diversity (finetune/eval/measure.py)
of the samples each validation wrote, at every validation step and at the end.

- Measured are the images `Trainer.validate` actually wrote (a hook may reject some, or refuse a
  prompt); each one's prompt is read from its folder's manifest, whatever name it was saved under.
- clip_i and dino compare them with the training images (the run's examples, never the held-out
  ones), embedded once, at the first validation.
- The metric models load at the first validation and stay on the CPU between validations: on the
  accelerator they would hold its memory through training. They go there one at a time, only while
  embedding (`embed_each_on`).
- A metric that cannot be computed (its model is not there offline, too few images) is one warning
  with its reason, the first time; it is then left out of the row, never written as 0.
- The main process measures; every process receives the values (keep_best and early stopping,
  decisions.Decisions, save checkpoints on all processes together).
"""

from __future__ import annotations

from pathlib import Path

from .decisions import write_row

class SampleMetrics:
    """The trainer's `validation.metrics`: `measure(step, written)` after each validation's samples."""

    def __init__(self, trainer):
        self.t, self.v = trainer, trainer.recipe.validation
        self.wanted = list(dict.fromkeys(self.v.metrics))
        self.models = None  # eval.models.MetricModels, on the CPU between validations
        self.reference = None  # eval.measure.Embedded of the training images, on the CPU
        self.warned: set[str] = set()
        if self.wanted and not self.v.prompts:
            trainer.log("warning: validation.metrics: nothing to measure without validation.prompts")
            self.wanted = []

    def measure(self, step: int, written: list[Path]) -> dict[str, float]:
        """The metrics of the images this validation wrote, on every process; logged and written as one
        metrics.jsonl row. {} when none are asked for or none could be computed."""
        if not self.wanted:
            return {}
        from .distributed import on_main

        values = on_main(self.t.accelerator, lambda: self._measure(written))
        if values:
            self.t.log(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
            write_row(self.t, step, values)
        return values

    def _measure(self, written: list[Path]) -> dict[str, float]:
        from ..eval.measure import embed_each_on, subject_scores

        models, device = self._loaded(), self.t.accelerator.device
        images, prompts = sample_images(written)
        if self.reference is None:
            examples = self.t.run.examples
            self.reference = embed_each_on(models, lambda: (e.load() for e in examples), device)
        samples = embed_each_on(models, lambda: images, device)
        scores = subject_scores(models, samples, prompts, self.reference, self.wanted)
        self._warn(scores.missing)
        return {name: scores.values[name] for name in self.wanted if name in scores.values}

    def _loaded(self):
        if self.models is None:
            from ..eval.models import load_metric_models

            kinds = {"clip" if name in ("clip_score", "clip_i") else "dino" for name in self.wanted}
            # Its own warnings would repeat what _warn says of each metric: quiet here.
            self.models = load_metric_models(self.v.metric_models, kinds, log=lambda *_: None)
        return self.models

    def _warn(self, missing: dict[str, str]) -> None:
        for name, reason in missing.items():
            if name not in self.warned:
                self.warned.add(name)
                self.t.log(f"warning: validation.metrics: {name} is not measured: {reason}")


def sample_images(written: list[Path]) -> tuple[list, list[str]]:
    """The written images (PIL) and the prompt each was made from, as its folder's manifest records (an
    image it does not name is not measured: its prompt is unknown)."""
    from PIL import Image

    from ..hooks.pipeline import read_manifest

    prompts = {}
    for folder in {p.parent for p in written}:
        prompts.update({folder / row["file"]: str(row.get("prompt", "")) for row in read_manifest(folder)
                        if row.get("file")})
    images, known = [], [p for p in written if p in prompts]
    for path in known:
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    return images, [prompts[p] for p in known]
