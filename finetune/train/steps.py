"""Book-keeping of optimizer steps: what a step's batches added up to, and what a non-finite loss does."""

from __future__ import annotations

import math
import time

from ..errors import FinetuneError, safe_name


class Window:
    """The batches of the optimizer step under way: loss sums and image counts (summed over the
    processes when the step ends), and images per second between metric rows."""

    def __init__(self):
        self.loss = self.images = self.prior = self.prior_images = 0.0
        self.has_grads = False
        self.prior_mean = None
        self.start = self.last = time.perf_counter()
        self.seen = 0  # this process's images since the last metrics row

    def add(self, stats: dict) -> None:
        self.loss += stats["loss"]
        self.images += stats["images"]
        self.prior += stats.get("prior", 0.0)
        self.prior_images += stats.get("prior_images", 0)
        self.seen += stats["images"]
        self.has_grads = True

    def totals(self) -> list[float]:
        return [self.loss, self.images, self.prior, self.prior_images]

    def close(self, totals: list[float]) -> float:
        """The step's loss (mean over every process's images) from the summed totals; starts a new window."""
        loss, images, prior, prior_images = totals
        self.prior_mean = prior / prior_images if prior_images else None
        self.loss = self.images = self.prior = self.prior_images = 0.0
        self.has_grads = False
        return loss / images if images else float("nan")

    def rates(self, accelerator, per_process) -> dict:
        """Images per second since the last row: all processes together, and each when there are several."""
        now = time.perf_counter()
        mine = self.seen / max(now - self.last, 1e-9)
        each = per_process(accelerator, mine)
        row = {"images_per_second": sum(each), "elapsed_s": round(now - self.start, 3)}
        if len(each) > 1:
            row["images_per_second_per_process"] = each
        if self.prior_mean is not None:
            row["prior_loss"] = self.prior_mean
        self.last, self.seen = now, 0
        return row


class NonFinite:
    """A NaN/inf loss (on any process): stop the run, or with training.on_nan: skip, log it and go on
    within a limit of batches in a row."""

    def __init__(self, recipe, log):
        self.tr, self.log, self.in_a_row = recipe.training, log, 0

    def ok(self) -> None:
        self.in_a_row = 0

    def skip(self, loss, step: int, batch: dict, state) -> None:
        tr = self.tr
        self.in_a_row += 1
        state.skipped_steps += 1
        value = loss.item() if not math.isfinite(loss.item()) else "non-finite on another process"
        keys = batch["instance"]["key"] if batch.get("instance") else []
        what = f"loss became {value} at step {step} on {', '.join(map(safe_name, keys))}"
        if tr.on_nan == "stop":
            raise FinetuneError(f"{what}; {self._cause()}. training.on_nan: skip skips such batches instead")
        if self.in_a_row > tr.max_skipped_in_a_row:
            raise FinetuneError(f"{what}; {self.in_a_row} batches in a row were skipped (training.max_skipped_in_a_row: "
                                f"{tr.max_skipped_in_a_row}); {self._cause()}")
        self.log(f"warning: {what}; batch skipped (training.on_nan: skip). {self._cause()}")

    def _cause(self) -> str:
        tr = self.tr
        if tr.mixed_precision == "fp16":
            return "fp16 overflow is the usual cause: use bf16, or lower training.learning_rate"
        return (f"training.learning_rate {tr.learning_rate:g} is likely too high (or an image is broken: "
                "finetune dataset check)")
