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
