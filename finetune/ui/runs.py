"""What a run folder says: its recipe, progress, losses, samples, checkpoints and evaluation. Read
from the files every run writes (recipe.yaml, metrics.jsonl, samples/, checkpoints/), so a run
started by the command line looks the same as one started by the UI."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..recipe import load_raw, validate
from ..train.checkpoint import completed
from ..train.decisions import BEST
from ..train.run_dir import read_metrics
from .roots import Roots

ADAPTER_SUFFIXES = (".safetensors",)


@dataclass
class RunInfo:
    path: Path
    name: str
    description: str
    method: str
    base: str
    step: int
    max_steps: int | None
    losses: list[tuple[int, float]]
    lrs: list[tuple[int, float]]
    images_per_s: float | None
    eta_s: float | None
    samples: list[Path]  # newest step last
    checkpoints: list[str]
    best: dict | None
    eval_report: Path | None
    card: Path | None
    files: list[Path]
    finished: bool


def find_runs(roots: Roots) -> list[RunInfo]:
    """Every run folder (one holding recipe.yaml) under the roots, newest first; a damaged one is
    left out, never an error for the whole list."""
    runs = []
    for folder in roots.walk():
        if not (folder / "recipe.yaml").is_file():
            continue
        try:
            runs.append(run_info(folder))
        except Exception:  # noqa: BLE001 - any damage (bad YAML, a torn file, a race with rm) skips this run only
            continue
    return sorted(runs, key=_last_change, reverse=True)


def run_info(path: Path) -> RunInfo:
    """One run folder's state; a recipe.yaml that does not validate raises its RecipeError."""
    path = Path(path)
    recipe = validate(load_raw(path / "recipe.yaml"), str(path / "recipe.yaml"))
    rows = [r for r in read_metrics(path / "metrics.jsonl") if _number(r.get("step"))]
    losses = _series(rows, "loss")
    step = losses[-1][0] if losses else 0
    max_steps = recipe.training.max_steps
    card = _file(path / "README.md")  # the last thing a finished run writes
    ips = next((r["images_per_second"] for r in reversed(rows) if _number(r.get("images_per_second"))), None)
    return RunInfo(
        path=path, name=path.name, description=recipe.description or "", method=recipe.method.type,
        base=recipe.model.base, step=step, max_steps=max_steps, losses=losses, lrs=_series(rows, "lr"),
        images_per_s=ips, eta_s=None if card else eta(rows, step, max_steps, _batch(recipe), ips),
        samples=samples(path), checkpoints=[c.name for c in completed(path / "checkpoints")],
        best=_json(path / "checkpoints" / BEST), eval_report=_file(path / "eval" / "report.md"), card=card,
        files=sorted(p for p in path.iterdir() if p.is_file() and p.suffix in ADAPTER_SUFFIXES),
        finished=card is not None)


def samples(path: Path) -> list[Path]:
    """Validation images, by step, then by name."""
    found = [p for p in (path / "samples").glob("step-*/**/*.png") if p.is_file()]
    return sorted(found, key=lambda p: (_step_of(p.relative_to(path / "samples").parts[0]), p))


def _step_of(folder: str) -> int:
    # step-NNNNNN, zero-padded to 6 digits: past a million steps the name alone would sort wrong
    try:
        return int(folder.removeprefix("step-"))
    except ValueError:
        return -1


def eta(rows: list[dict], step: int, max_steps: int | None, batch: int, ips: float | None) -> float | None:
    """Seconds left: the mean step time of the current process's rows (elapsed_s restarts at 0 when
    a run is resumed), else the global batch over the last images/s."""
    if not max_steps or step >= max_steps:
        return None
    timed = [(r["step"], r["elapsed_s"]) for r in rows if "loss" in r and _number(r.get("elapsed_s"))]
    segment = timed[-1:]
    for s, e in reversed(timed[:-1]):  # back to where elapsed_s went down: the start of this process
        if e > segment[0][1]:
            break
        segment.insert(0, (s, e))
    if len(segment) >= 2 and segment[-1][0] > segment[0][0]:
        per_step = (segment[-1][1] - segment[0][1]) / (segment[-1][0] - segment[0][0])
    elif ips:
        per_step = batch / ips
    else:
        return None
    return max(per_step, 0.0) * (max_steps - step)


def _batch(recipe) -> int:
    # One process's view: a multi-process run's images/s is for all of them, so this errs long.
    return recipe.training.batch_size * recipe.training.gradient_accumulation_steps


def _series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if _number(r.get(key))]


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _file(p: Path) -> Path | None:
    return p if p.is_file() else None


def _json(p: Path) -> dict | None:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _last_change(run: RunInfo) -> float:
    for p in (run.path / "metrics.jsonl", run.path):
        try:
            return p.stat().st_mtime
        except OSError:
            continue
    return 0.0
