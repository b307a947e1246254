"""Every bundled recipe trains its family's tiny model through the CLI with overrides alone: the
recipes users start from are never broken by a schema or method change."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.recipe import load_recipe
from finetune.tiny_models import BUILTIN_FAMILIES

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))

# Files each method must leave in the run folder ({name} is the run name).
EXPECTED = {
    "lora": ["pytorch_lora_weights.safetensors", "{name}.safetensors"],
    "dreambooth": ["model/model_index.json", "{name}.safetensors"],
    "textual_inversion": ["learned_embeds.safetensors", "{name}.safetensors"],
    "pivotal": ["learned_embeds.safetensors", "pytorch_lora_weights.safetensors", "{name}.safetensors",
                "{name}-emb.safetensors"],
}


def _tiny_model(family: str, base: str) -> str:
    """The built-in tiny model of `family` (of FLUX.2 [klein] for a klein recipe)."""
    names = [n for n, f in BUILTIN_FAMILIES.items() if f == family and n.startswith("tiny-")]
    klein = [n for n in names if n.endswith("-klein")]
    return "builtin:" + (klein[0] if klein and "klein" in base.lower() else names[0])


# The quickstarts (one per family) are in the smoke set scripts/check_latest_deps.sh runs.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.smoke) if "quickstart" in n else n for n in RECIPES])
def test_bundled_recipe_trains_the_tiny_model(name, tiny_sd15, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes point at datasets/robot, relative to the repository
    recipe, _ = load_recipe(name)
    family = recipe.model.family if recipe.model.family != "auto" else "sd1"
    tiny = tiny_sd15 if family == "sd1" else _tiny_model(family, recipe.model.base)
    overrides = [f"model.base={tiny}", "data.resolution=64", "training.max_steps=2", "training.mixed_precision=no",
                 "validation.num_inference_steps=2", "output.save_every_n_steps=null", f"output.dir={tmp_path}",
                 "output.run_name=r", "--no-progress"]
    if recipe.memory.fp8_base:  # float8 weights need a mixed precision; bf16 runs on the CPU too
        overrides[overrides.index("training.mixed_precision=no")] = "training.mixed_precision=bf16"
    if recipe.method.type in ("textual_inversion", "pivotal"):
        overrides.append("method.initializer_token=x")  # "robot" is several tokens in the tiny tokenizer
    if recipe.prior_preservation.enabled:
        overrides += [f"prior_preservation.class_data_dir={tmp_path / 'class'}", "prior_preservation.num_class_images=2",
                      "prior_preservation.num_inference_steps=2"]
    result = CliRunner().invoke(app, ["train", name, *overrides], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = tmp_path / "r"
    for f in EXPECTED[recipe.method.type]:
        assert (run / f.format(name="r")).exists(), f
    assert (run / "recipe.yaml").is_file() and (run / "README.md").is_file()
    if recipe.validation.prompts:
        assert len(list((run / "samples").rglob("*.png"))) >= len(recipe.validation.prompts)
