"""What the validation metrics decide, and what they show: `output.keep_best` (the checkpoint with the
best value of a metric, named in `checkpoints/best.json`) and `training.early_stopping`, by the
held-out val_loss (held_out.py) or a sample metric of `validation.metrics` (validation_metrics.py);
their metrics.jsonl rows (`write_row`) and their model-card rows (`card_rows`).

- keep_best: a validation whose value is better than every earlier one (lower val_loss; higher
  clip_score, clip_i, dino: `HIGHER_IS_BETTER`) saves a checkpoint at that step
  (`checkpoints/step-NNNNNN`, as any other) and names it in `checkpoints/best.json`; the trainer
  state records it too, and `keep_last_checkpoints` never deletes it (checkpoint.py). The final
  files in the run folder stay the last step's.
- The trainer measures first (samples and their metrics, then val_loss), then `Decisions.decide`
  acts on the values of that step, the same on every process.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..recipe.schema import HIGHER_IS_BETTER, TRAINING_METRICS

BEST = "best.json"
METRIC = "val_loss"  # the held-out loss


def observe(record: dict, step: int, value: float, min_delta: float, higher: bool = False) -> bool:
    """Add one validation's `value` to `record` (kept in the trainer state, so a resume goes on from
    it); True when it is the best yet (the highest when `higher`, else the lowest). Early stopping
    counts the validations since the last improvement by more than `min_delta` over the value it last
    improved to (`reference`)."""
    sign = 1.0 if higher else -1.0  # compared as sign * value: larger is better either way
    best = "best" not in record or sign * value > sign * record["best"]
    if best:
        record.update(best=value, best_step=step)
    if "reference" not in record or sign * (value - record["reference"]) > min_delta:
        record.update(reference=value, since=0)
    else:
        record["since"] += 1
    return best


class Decisions:
    """output.keep_best and training.early_stopping, on the values one validation measured (the same
    on every process: the checkpoints they save are saved by all of them together). The trainer state's
    `held_out` record holds, per metric, the `observe` record, and the kept checkpoint's name."""

    def __init__(self, trainer):
        self.t = trainer
        self.keep_best, self.early = trainer.recipe.output.keep_best, trainer.tr.early_stopping
        self.warned: set[str] = set()
        _upgrade(self.record)
        if trainer.run.resume_from is not None and trainer.accelerator.is_main_process:
            self._sync_best_file()

    @property
    def record(self) -> dict:
        return self.t.state.held_out

    def decide(self, step: int, values: dict[str, float], end: bool = False) -> bool:
        """Record this validation's values, keep the best checkpoint; True when early stopping ends the run
        here (never at the `end`, which ends it anyway)."""
        es_metric = self.early.metric if self.early else None
        best = {name: observe(self.record.setdefault("metrics", {}).setdefault(name, {}), step, value,
                              self.early.min_delta if name == es_metric else 0.0, HIGHER_IS_BETTER[name])
                for name, value in values.items() if name in HIGHER_IS_BETTER}
        if self.keep_best and self._measured("output.keep_best", self.keep_best, best, step) and best[self.keep_best]:
            self._keep(step, values[self.keep_best])
        if end or not es_metric or not self._measured("training.early_stopping", es_metric, best, step):
            return False
        return self._stop(step, es_metric)

    def _measured(self, key: str, metric: str, best: dict, step: int) -> bool:
        if metric in best:
            return True
        if key not in self.warned:  # why it is missing was logged where it was measured
            self.warned.add(key)
            self.t.log(f"warning: {key}: {metric} was not measured at step {step}; it decides "
                       "nothing until it is")
        return False

    def _keep(self, step: int, value: float) -> None:
        t = self.t
        # Named before saving: pruning (keep_last_checkpoints) spares what this names.
        self.record.update(checkpoint=f"step-{step:06d}", kept_by=self.keep_best)
        saved = t.save_checkpoint()
        t.log(f"step {step}: {self.keep_best} {value:.4f} is the {_direction(self.keep_best)} yet; "
              f"checkpoints/{saved.name} is kept (output.keep_best)")
        if t.accelerator.is_main_process:
            self._write_best_file(saved)

    def _stop(self, step: int, metric: str) -> bool:
        r, es = self.record["metrics"][metric], self.early
        if r["since"] < es.patience:
            return False
        self.t.log(f"early stopping at step {step}: {metric} has not improved by {es.min_delta} for {es.patience} "
                   f"validations (best {r['best']:.4f} at step {r['best_step']})")
        self.t.save_checkpoint()
        return True

    def _write_best_file(self, saved: Path) -> None:
        from ..files import write_text_atomically

        r = self.record["metrics"][self.keep_best]
        write_text_atomically(saved.parent / BEST, json.dumps(
            {"metric": self.keep_best, "value": r["best"], "step": r["best_step"], "checkpoint": saved.name},
            indent=1))

    def _sync_best_file(self) -> None:
        """After a resume, best.json says what the resumed state says (a later best of the run that was
        interrupted is not this run's; one kept by another metric than output.keep_best now is no more kept)."""
        folder = self.t.run.run_dir / "checkpoints"
        name = self.record.get("checkpoint")
        ours = name and self.record.get("kept_by") == self.keep_best
        if ours and (folder / name).is_dir():
            self._write_best_file(folder / name)
            return
        (folder / BEST).unlink(missing_ok=True)
        if ours:
            self.t.log(f"warning: output.keep_best: {name}, the best checkpoint when this run was saved, is gone; "
                       "the next best is kept from here")
        self.record.pop("checkpoint", None)
        self.record.pop("kept_by", None)


def _upgrade(record: dict) -> None:
    """A record saved when only val_loss could decide kept its `observe` keys at the top."""
    if "best" in record:
        record.setdefault("metrics", {})[METRIC] = {k: record.pop(k) for k in ("best", "best_step", "reference",
                                                                               "since") if k in record}
        if "checkpoint" in record:
            record["kept_by"] = METRIC


def _direction(metric: str) -> str:
    return "highest" if HIGHER_IS_BETTER[metric] else "lowest"


def write_row(trainer, step: int, values: dict[str, float]) -> None:
    """One metrics.jsonl row of a validation's `values` (main process). Its own row: the step's row
    (trainer._report) is written before validation. Through the loop's log while it is open (the trackers
    get it too); the end-of-run values after it closed, to the file."""
    from .run_dir import MetricsLog

    if not values or not trainer.accelerator.is_main_process:
        return
    if getattr(trainer, "metrics", None) is not None:
        trainer.metrics.write(step=step, **values)
        return
    rows = MetricsLog(trainer.run.run_dir / "metrics.jsonl")
    try:
        rows.write(step=step, **values)
    finally:
        rows.close()


# ------------------------------------------------------------------ the model card


def card_rows(run_dir: Path) -> list[str]:
    """Model-card table rows: each validation metric at the end and its best (the held-out loss, then
    validation.metrics in their order), and the kept best checkpoint."""
    from .run_dir import read_metrics

    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    lines, last_step = [], None
    for metric in (METRIC, *TRAINING_METRICS):
        values = [(row["step"], row[metric]) for row in rows if _number(row.get(metric))]
        if values:
            lines.append(_metric_row(metric, values))
            last_step = values[-1][0]
    try:
        best = json.loads((Path(run_dir) / "checkpoints" / BEST).read_text(encoding="utf-8"))
        lines.append(f"| best checkpoint | `checkpoints/{best['checkpoint']}`: {best['metric']} {best['value']:.4f} at "
                     f"step {best['step']} (the files in this folder are step {last_step}'s) |")
    except (OSError, ValueError, KeyError):
        pass
    return lines


def _metric_row(metric: str, values: list[tuple[int, float]]) -> str:
    label = f"held-out loss ({METRIC})" if metric == METRIC else metric
    (last_step, last) = values[-1]
    text = f"{last:.4f} at step {last_step}"
    if metric in HIGHER_IS_BETTER:  # diversity has no better direction: only its last value
        pick = max if HIGHER_IS_BETTER[metric] else min  # the first of equal values, as `observe` keeps it
        step, value = pick(values, key=lambda sv: sv[1])
        text += f"; {_direction(metric)} {value:.4f} at step {step}"
    return f"| {label} | {text} |"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
