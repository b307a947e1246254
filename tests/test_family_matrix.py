"""The family x method matrix, as the README's table states it: every pair marked "yes" trains two
steps on the family's tiny model and saves its files; every pair marked "no" is refused by
`finetune validate` (the recipe loader) in one line that names what is possible instead, before any
model is built. The README is the expectation, so the table cannot drift from what the code does."""

import itertools
import re
from pathlib import Path

import pytest
import yaml

from finetune.errors import RecipeError
from finetune.families import get_family
from finetune.recipe import load_recipe
from finetune.tiny_models import BUILTIN_FAMILIES
from finetune.train import train

from .helpers import make_image_folder

REPO = Path(__file__).resolve().parents[1]

# The README's column names -> the method section each column trains.
METHODS = {
    "lora": {"type": "lora", "rank": 4, "alpha": 4},
    "lora + text encoder": {"type": "lora", "rank": 4, "alpha": 4, "train_text_encoder": True},
    "textual_inversion": {"type": "textual_inversion", "placeholder_token": "<sks>", "initializer_token": "x"},
    "pivotal": {"type": "pivotal", "rank": 4, "alpha": 4, "placeholder_token": "<sks>", "initializer_token": "x"},
    "dreambooth": {"type": "dreambooth"},
}
# Files each method leaves ({name}: the run name); DreamBooth's single file where the family has one.
FILES = {
    "lora": ["pytorch_lora_weights.safetensors", "{name}.safetensors"],
    "lora + text encoder": ["pytorch_lora_weights.safetensors", "{name}.safetensors"],
    "textual_inversion": ["learned_embeds.safetensors", "{name}.safetensors"],
    "pivotal": ["learned_embeds.safetensors", "pytorch_lora_weights.safetensors", "{name}.safetensors"],
    "dreambooth": ["model/model_index.json"],
}


def readme_matrix() -> dict[tuple[str, str], bool]:
    """(family, method column) -> whether the README says it trains, from its "Families x methods" table."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("### Families x methods", 1)[1]
    lines = section.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = [line for line in itertools.takewhile(lambda line: line.startswith("|"), lines[first:])]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header[1:] == list(METHODS), header
    cells = {}
    for row in rows[2:]:
        parts = [c.strip() for c in row.strip("|").split("|")]
        family = re.match(r"`(\w+)`", parts[0]).group(1)
        for column, cell in zip(header[1:], parts[1:]):
            assert cell.startswith(("yes", "no")), (family, column, cell)
            cells[family, column] = cell.startswith("yes")
    return cells


MATRIX = readme_matrix()


def test_the_table_covers_every_family_and_method():
    from finetune.families import FAMILIES

    assert {f for f, _ in MATRIX} == set(FAMILIES.names())
    assert len(MATRIX) == len(FAMILIES.names()) * len(METHODS)


def _tiny_models(family: str) -> list[str]:
    return [n for n, f in BUILTIN_FAMILIES.items() if f == family and n.startswith("tiny-")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("matrix") / "data", n=2, sizes=((64, 64),),
                             caption="a photo of <sks> ball")


def _recipe_file(folder: Path, model: str, method: dict, data: Path) -> Path:
    recipe = {
        "model": {"base": f"builtin:{model}"},
        "data": {"path": str(data), "resolution": 64},
        "method": method,
        "training": {"max_steps": 2, "batch_size": 1, "learning_rate": 1e-4, "seed": 0, "mixed_precision": "no"},
        "validation": {"prompts": []},
        "output": {"dir": str(folder / "out"), "run_name": "r", "save_dtype": "fp32"},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("family,column", sorted(MATRIX), ids=[f"{f}-{m}" for f, m in sorted(MATRIX)])
def test_pair_trains_and_saves_or_is_refused_in_one_line(family, column, data, tmp_path):
    for model in _tiny_models(family):
        path = _recipe_file(tmp_path / model, model, METHODS[column], data)
        if not MATRIX[family, column]:
            with pytest.raises(RecipeError) as e:
                load_recipe(path)
            assert len(e.value.problems) == 1 and "\n" not in e.value.problems[0], e.value.problems
            line = e.value.problems[0]
            assert line.startswith(f"{path}: method."), line
            assert re.search(r"; (use|set|unset|train)\b|instead", line), f"the refusal names no alternative: {line}"
            assert not (tmp_path / model / "out").exists()
            continue
        recipe, _ = load_recipe(path)
        result = train(recipe, path, log=lambda *_: None, progress=False)
        files = FILES[column] + (["{name}.safetensors"] if column == "dreambooth" and get_family(family).has_single_file
                                 else [])
        for f in files:
            assert (result.run_dir / f.format(name="r")).exists(), (model, f)
        assert len(result.losses) == 2
