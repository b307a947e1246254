"""Recipe validation: good recipes load, bad ones report every problem with file and key path."""

from pathlib import Path

import pytest
import yaml

from finetune.errors import RecipeError
from finetune.recipe import dump_recipe, load_recipe

REPO = Path(__file__).resolve().parents[1]
BUNDLED = sorted((REPO / "recipes").glob("*.yaml"))


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.stem)
def test_every_bundled_recipe_validates(path):
    recipe, file = load_recipe(path)
    assert file == path
    assert recipe.data.path


def test_bundled_recipes_exist():
    assert {"quickstart", "sd15-lora"} <= {p.stem for p in BUNDLED}


def test_all_problems_reported_at_once_with_file_and_key_path(tmp_path):
    p = write(tmp_path, "bad.yaml", {
        "model": {"base": "x/y", "famly": "sd1"},
        "data": {"path": "imgs", "resolution": 100, "crop": "middle"},
        "method": {"type": "lora", "rank": "zero"},
        "optimizer": {"type": "adam"},
        "training": {"learning_rate": -1},
    })
    with pytest.raises(RecipeError) as exc:
        load_recipe(p)
    problems = exc.value.problems
    assert all(line.startswith(f"{p}: ") for line in problems)
    text = "\n".join(problems)
    assert "model.famly: unknown key; valid keys here:" in text and "family" in text
    assert "data.resolution: 100 is not a multiple of 8" in text and "try 96" in text
    assert "data.crop: expected 'center' or 'random'" in text
    assert "method.rank:" in text
    assert "optimizer.type: expected 'adamw', 'adamw8bit'" in text
    assert "training.learning_rate:" in text
    assert len(problems) == 6


def test_unknown_method_type_and_family(tmp_path):
    p = write(tmp_path, "r.yaml", {"data": {"path": "x"}, "method": {"type": "loar"}, "model": {"family": "sd9"}})
    with pytest.raises(RecipeError) as exc:
        load_recipe(p)
    text = str(exc.value)
    method_line = next(line for line in text.splitlines() if ": method.type: " in line)
    assert "'loar'" in method_line and "'lora'" in method_line
    assert "model.family: unknown family 'sd9'" in text and "sd1" in text


def test_missing_data_section(tmp_path):
    p = write(tmp_path, "r.yaml", {"training": {"max_steps": 5}})
    with pytest.raises(RecipeError, match=r"data: required key is missing"):
        load_recipe(p)


def test_extends_and_overrides(tmp_path):
    write(tmp_path, "base.yaml", {"data": {"path": "a", "resolution": 512},
                                  "training": {"max_steps": 100, "learning_rate": 1e-4}})
    child = write(tmp_path, "child.yaml", {"extends": "base.yaml", "training": {"max_steps": 7}})
    recipe, _ = load_recipe(child, ["training.learning_rate=3e-4", "data.bucketing.enabled=false",
                                    "validation.prompts=[a, b]"])
    assert recipe.training.max_steps == 7          # child wins
    assert recipe.data.resolution == 512           # inherited
    assert recipe.training.learning_rate == 3e-4   # override wins, parsed as a number
    assert recipe.data.bucketing.enabled is False
    assert recipe.validation.prompts == ["a", "b"]


def test_override_type_errors_name_the_key(tmp_path):
    p = write(tmp_path, "r.yaml", {"data": {"path": "a"}})
    with pytest.raises(RecipeError, match=r"training\.max_steps: .*got 'many'"):
        load_recipe(p, ["training.max_steps=many"])
    with pytest.raises(RecipeError, match="expected key.path=value"):
        load_recipe(p, ["training.max_steps"])


def test_extends_cycle_and_missing(tmp_path):
    write(tmp_path, "a.yaml", {"extends": "b.yaml", "data": {"path": "x"}})
    write(tmp_path, "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")
    write(tmp_path, "c.yaml", {"extends": "nope.yaml"})
    with pytest.raises(RecipeError, match="nope.yaml: recipe not found"):
        load_recipe(tmp_path / "c.yaml")


def test_yaml_syntax_error_names_line(tmp_path):
    p = write(tmp_path, "r.yaml", "data:\n  path: [unclosed\n")
    with pytest.raises(RecipeError, match=r"r\.yaml:\d+: not valid YAML"):
        load_recipe(p)


def test_run_name_cannot_escape_outputs(tmp_path):
    p = write(tmp_path, "r.yaml", {"data": {"path": "a"}, "output": {"run_name": "../../etc"}})
    with pytest.raises(RecipeError, match="output.run_name"):
        load_recipe(p)


def test_resolved_recipe_round_trips(tmp_path):
    child = write(tmp_path, "r.yaml", {"extends": str(REPO / "recipes" / "quickstart.yaml")})
    recipe, _ = load_recipe(child, ["training.max_steps=3"])
    dumped = write(tmp_path, "resolved.yaml", dump_recipe(recipe))
    again, _ = load_recipe(dumped)
    assert again == recipe
    assert "extends" not in dumped.read_text()
    assert again.model.base == "builtin:tiny-sd15"  # inherited through two levels of extends


def test_yaml_is_data_not_code(tmp_path):
    p = write(tmp_path, "r.yaml", "data: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p)


def test_bare_no_means_no_mixed_precision(tmp_path):
    p = write(tmp_path, "r.yaml", "data: {path: a}\ntraining:\n  mixed_precision: no\n")
    recipe, _ = load_recipe(p)
    assert recipe.training.mixed_precision == "no"
    recipe, _ = load_recipe(p, ["training.mixed_precision=no"])
    assert recipe.training.mixed_precision == "no"


def test_child_changing_method_type_drops_the_parents_method_keys(tmp_path):
    write(tmp_path, "base.yaml", {"data": {"path": "a"}, "method": {"type": "lora", "rank": 4}})
    child = write(tmp_path, "child.yaml", {"extends": "base.yaml", "method": {"type": "dreambooth"}})
    recipe, _ = load_recipe(child)
    assert recipe.method.type == "dreambooth"
    bad = write(tmp_path, "bad.yaml", {"extends": "base.yaml", "method": {"type": "dreambooth", "rank": 4}})
    with pytest.raises(RecipeError) as exc:
        load_recipe(bad)
    assert "method.rank: unknown key" in str(exc.value) and "train_text_encoder" in str(exc.value)
    assert "init_lora_weights" not in str(exc.value)  # the keys listed are dreambooth's, not lora's
