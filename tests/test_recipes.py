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


def test_impossible_combinations_and_missing_things_are_one_line_each_before_any_model_loads(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "model.ckpt").write_bytes(b"not really a checkpoint")
    ok = {"model": {"base": "builtin:tiny-sd15"}, "data": {"path": "pics"}, "method": {"type": "lora", "rank": 4}}
    p = write(tmp_path, "r.yaml", ok)
    load_recipe(p)

    def errors(*overrides):
        with pytest.raises(RecipeError) as exc:
            load_recipe(p, list(overrides))
        return str(exc.value).splitlines()

    # Switching the method on the command line drops the other method's keys, as `extends:` does;
    # what the new method needs is then named.
    assert errors("method.type=textual_inversion") == [
        f"{p}: method.placeholder_token: required key is missing",
        f"{p}: method.initializer_token: required key is missing"]
    assert errors("data.resolution=100") == [f"{p}: data.resolution: 100 is not a multiple of 8 (the VAE's scale factor); try 96"]
    assert errors("prior_preservation.enabled=true")[0].startswith(f"{p}: prior_preservation.class_prompt: required")
    assert errors("model.family=sdxx")[0].startswith(f"{p}: model.family: unknown family 'sdxx'")
    assert errors("model.base=/no/such/model") == [
        f"{p}: model.base: /no/such/model is neither an existing folder/file nor a hub id (owner/name)"]
    assert errors("model.base=builtin:nope")[0].startswith(f"{p}: model.base: unknown built-in model 'nope'")
    assert "pickled checkpoint" in errors(f"model.base={tmp_path / 'model.ckpt'}")[0]
    assert errors("data.path=./missing") == [f"{p}: data.path: ./missing does not exist here (nor in {tmp_path})"]
    # Both at once: every problem, one line each.
    assert len(errors("model.base=/no/such/model", "data.path=./missing")) == 2


def test_training_an_uncached_hub_model_offline_fails_before_loading(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from finetune.errors import FinetuneError
    from finetune.recipe import validate
    from finetune.train import train

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "pics").mkdir()
    r = validate({"model": {"base": "someone/not-cached-model"}, "data": {"path": str(tmp_path / "pics")}}, "r")
    with pytest.raises(FinetuneError, match="not in the local hub cache and HF_HUB_OFFLINE is set"):
        train(r, log=lambda *_: None, progress=False)


def test_pickled_weights_load_only_with_the_flag_and_then_weights_only(tiny_sd15, tmp_path, monkeypatch):
    """A diffusers folder whose weights are pickled .bin files is refused by default; with
    model.allow_pickle it loads, through torch.load(weights_only=True)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from finetune.errors import FinetuneError
    from finetune.families import get_family
    from finetune.families.base import resolve_source
    from finetune.recipe.schema import ModelConfig

    pickled = tmp_path / "pickled"
    StableDiffusionPipeline.from_pretrained(tiny_sd15, safety_checker=None).save_pretrained(pickled, safe_serialization=False)
    # (transformers writes the text encoder as safetensors regardless; the UNet and VAE are pickled)
    assert (pickled / "unet" / "diffusion_pytorch_model.bin").is_file() and not list((pickled / "unet").glob("*.safetensors"))
    family = get_family("sd1")
    cfg = ModelConfig(base=str(pickled))
    with pytest.raises(FinetuneError, match="model.allow_pickle=true"):
        family.load(resolve_source(cfg.base), cfg)
    loads = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: (loads.append(k.get("weights_only")), real(*a, **k))[1])
    cfg = ModelConfig(base=str(pickled), allow_pickle=True)
    c = family.load(resolve_source(cfg.base, True), cfg)
    assert c.denoiser is not None and loads and all(w is True for w in loads)
