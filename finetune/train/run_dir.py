"""The run folder: outputs/<run>/ with the resolved recipe, adapters, samples, metrics, model card."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import FinetuneError
from ..recipe import dump_recipe


def plan_run_dir(recipe, recipe_path: Path | None) -> tuple[Path, str]:
    """The run folder's path and name, refused early if it is taken; nothing is created yet."""
    out = Path(recipe.output.dir)
    name = recipe.output.run_name or f"{recipe_path.stem if recipe_path else 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = out / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FinetuneError(f"output.run_name: {run_dir} already exists and is not empty; choose another run name "
                            f"(e.g. output.run_name={name}-2) or remove that folder")
    return run_dir, name


def create_run_dir(run_dir: Path, recipe) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")


class MetricsLog:
    """metrics.jsonl: one JSON object a line, appended and flushed as training goes."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "a", encoding="utf-8")

    def write(self, **row) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


# Sections a resumed run may change: they decide what is written and sampled, not what is trained.
RESUME_MAY_CHANGE = ("description", "output", "validation")


def find_resume(recipe, recipe_path: Path | None, resume: str, log) -> tuple[Path, str, Path]:
    """The run folder, its name and the checkpoint to continue from, for `--resume` (`latest`) or
    `--resume PATH` (a run folder or one of its checkpoints)."""
    from .checkpoint import MANIFEST, latest_valid, verify

    if resume != "latest":
        path = Path(resume)
        if (path / MANIFEST).is_file() or path.parent.name == "checkpoints":
            problem = verify(path) if path.is_dir() else "no such folder"
            if problem:
                raise FinetuneError(f"--resume: {path} cannot be resumed from: {problem}")
            ckpt, run_dir = path, path.parent.parent
        elif path.is_dir():
            run_dir, ckpt = path, latest_valid(path, log)
        else:
            raise FinetuneError(f"--resume: {path} is neither a run folder nor a checkpoint")
    else:
        run_dir, ckpt = _latest_run(recipe, recipe_path, log)
    if (run_dir / "README.md").is_file():  # the model card is the last thing a finished run writes
        raise FinetuneError(f"--resume: {run_dir} already finished; its final files are in that folder")
    if ckpt is None:
        raise FinetuneError(f"--resume: {run_dir} has no complete checkpoint to resume from; set "
                            "output.save_every_n_steps so runs leave checkpoints, or start afresh without --resume")
    _check_same_recipe(recipe, run_dir)
    return run_dir, run_dir.name, ckpt


def _latest_run(recipe, recipe_path, log):
    from .checkpoint import latest_valid

    out = Path(recipe.output.dir)
    if recipe.output.run_name:
        candidates = [out / recipe.output.run_name]
    else:
        stem = recipe_path.stem if recipe_path else "run"
        candidates = [p for p in out.glob(f"{stem}-*") if p.is_dir()]
    found = [(run, ckpt) for run in candidates if (ckpt := latest_valid(run, log)) is not None]
    if not found:
        where = candidates[0] if recipe.output.run_name else out / f"{recipe_path.stem if recipe_path else 'run'}-*"
        raise FinetuneError(f"--resume: no checkpoint to resume from in {where}; give the run folder "
                            "(--resume outputs/<run>) or start afresh without --resume")
    return max(found, key=lambda rc: rc[1].stat().st_mtime)


def _check_same_recipe(recipe, run_dir: Path) -> None:
    import yaml

    try:
        saved = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise FinetuneError(f"--resume: cannot read {run_dir / 'recipe.yaml'} ({e})") from None
    now = recipe.model_dump(mode="json")
    diffs = [k for k in _differences(saved or {}, now) if k.split(".")[0] not in RESUME_MAY_CHANGE]
    if diffs:
        raise FinetuneError(f"--resume: the recipe differs from the one {run_dir.name} was started with at "
                            f"{', '.join(diffs[:6])}; a resumed run must train the same way (only "
                            f"{', '.join(RESUME_MAY_CHANGE)} may change). Resume with that run's recipe.yaml")


def _differences(a, b, prefix: str = "") -> list[str]:
    """Key paths where a and b differ, for keys both have (a newer version's new keys are not a change)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in a.keys() & b.keys():
            out += _differences(a[k], b[k], f"{prefix}{k}.")
        return sorted(out)
    return [] if a == b else [prefix.rstrip(".")]
