"""`output.trackers`: experiment trackers (TensorBoard, W&B, MLflow, ...) through accelerate's own
tracking, beside the local metrics.jsonl, which a run always writes. Each row written to
metrics.jsonl goes to every tracker too, at its step; the resolved recipe is the run's config."""

from __future__ import annotations

import json
from pathlib import Path

KEY = "output.trackers"
# The pip package behind each of accelerate's LoggerType names, where it is not the name itself.
PIP_NAMES = {"comet_ml": "comet-ml"}
# Where tracker files that live in the run folder (TensorBoard's event files) go: logs/<run name>/.
LOGS = "logs"


def tracker_problems(trackers: list[str]) -> list[str]:
    """One `output.trackers: ...` line per name accelerate does not know, or whose package is not
    installed; found without starting any tracker (preflight, before the model loads)."""
    import accelerate.utils as au
    from accelerate.utils import LoggerType

    known = [t.value for t in LoggerType]
    problems = []
    for name in trackers:
        if name not in known:
            problems.append(f"{KEY}: unknown tracker {name!r}; accelerate knows: {', '.join(known)}")
        elif name != "all" and not getattr(au, f"is_{name}_available", lambda: True)():
            package = PIP_NAMES.get(name, name)
            problems.append(f"{KEY}: {name} needs the {package} package (pip install {package}), "
                            "or remove it from output.trackers")
    return problems


def accelerator_options(trackers: list[str], run_dir: Path | None) -> dict:
    """Accelerator(...) keywords for the trackers: `log_with`, and the run folder as the project."""
    if not trackers:
        return {}
    from accelerate.utils import ProjectConfiguration

    return {"log_with": list(trackers),
            "project_config": ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / LOGS))}


def flat_config(recipe) -> dict:
    """The resolved recipe as one level of `section.key: value`, every value a bool, number, string or
    None (lists and mappings as JSON text): what every tracker's config (TensorBoard's hparams) accepts."""
    out = {}

    def walk(value, prefix: str) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(value, (list, tuple, dict)):
            out[prefix.rstrip(".")] = json.dumps(value)
        else:
            out[prefix.rstrip(".")] = value

    walk(recipe.model_dump(mode="json"), "")
    return out


class TrackedMetrics:
    """metrics.jsonl (run_dir.MetricsLog) whose rows also go to the accelerator's trackers; closing it
    ends the trackers (their files flushed and closed), however the run ended."""

    def __init__(self, metrics, accelerator):
        self.metrics, self.accelerator = metrics, accelerator

    def write(self, **row) -> None:
        self.metrics.write(**row)
        numbers = {k: v for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers and "step" in row:
            self.accelerator.log(numbers, step=row["step"])

    def close(self) -> None:
        try:
            self.metrics.close()
        finally:
            # What accelerator.end_training() does for trackers; end_training would also destroy the
            # process group, which the processes of a distributed run still share after this.
            for tracker in self.accelerator.trackers:
                tracker.finish()


def open_metrics(run, accelerator):
    """The main process's metrics log (None on the others): metrics.jsonl, and with `output.trackers`
    the trackers started, named after the run, with the resolved recipe as their config."""
    from .run_dir import MetricsLog

    if not accelerator.is_main_process:
        return None
    metrics = MetricsLog(run.run_dir / "metrics.jsonl")
    if not run.recipe.output.trackers:
        return metrics
    try:
        accelerator.init_trackers(run.run_name, config=flat_config(run.recipe))
    except BaseException:
        metrics.close()
        raise
    return TrackedMetrics(metrics, accelerator)
