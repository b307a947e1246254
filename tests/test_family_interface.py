"""What the family interface decides before a model loads: which family a recipe will load (built-in,
folder, explicit), the method options that mean nothing for it (one line from `finetune validate`),
`model.flow` and its older name `model.flux`; and what it writes: SD2.x LoRAs say SD2 in their metadata."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from finetune.errors import RecipeError
from finetune.export.lora import kohya_metadata
from finetune.families import get_family, known_family
from finetune.recipe import load_recipe, validate
from finetune.recipe.schema import ModelConfig

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path, **sections) -> Path:
    recipe = {"data": {"path": str(REPO / "datasets" / "robot")}, **sections}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("base,family", [("builtin:tiny-sd15", "sd1"), ("builtin:tiny-flux", "flux"),
                                         ("builtin:tiny-sdxl", "sdxl"), ("builtin:tiny-sd3", "sd3"),
                                         ("builtin:tiny-z-image", "z_image")])
def test_family_of_a_builtin_is_known_without_building_it(base, family, monkeypatch, tmp_path):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))  # an empty cache: nothing is built
    assert known_family(ModelConfig(base=base)).name == family
    assert not list(tmp_path.iterdir())


def test_family_of_a_folder_comes_from_its_model_index(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    assert known_family(ModelConfig(base=str(tmp_path))).name == "sdxl"
    assert known_family(ModelConfig(base="owner/not-downloaded")) is None  # only loading would tell
    assert known_family(ModelConfig(base="owner/not-downloaded", family="flux")).name == "flux"


@pytest.mark.parametrize("base,refused", [("builtin:tiny-sd15", True), ("builtin:tiny-flux", True),
                                          ("builtin:tiny-sdxl", False), ("builtin:tiny-sd3", False)])
def test_text_encoder_2_lr_is_refused_where_there_is_no_second_trained_encoder(base, refused, tmp_path):
    path = _write(tmp_path, model={"base": base},
                  method={"type": "lora", "train_text_encoder": True, "text_encoder_2_lr": 1e-5})
    if not refused:
        assert load_recipe(path)[0].method.text_encoder_2_lr == 1e-5
        return
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert e.value.problems == [
        f"{path}: method.text_encoder_2_lr: {get_family(known_family(ModelConfig(base=base)).name).title} trains "
        "text_encoder with a text-encoder LoRA, no text_encoder_2; unset it (method.text_encoder_lr is the text "
        "encoder's rate)"]


def test_an_explicit_single_file_is_refused_where_the_family_writes_none(tmp_path):
    from finetune.families import FAMILIES

    without = [name for name, cls in FAMILIES.items() if not cls.has_single_file]
    if not without:
        pytest.skip("every family writes a single file")
    path = _write(tmp_path, model={"base": "owner/model", "family": without[0]},
                  method={"type": "dreambooth", "single_file": True})
    with pytest.raises(RecipeError, match="method.single_file: .* has no single-file checkpoint format"):
        load_recipe(path)


def test_model_flux_is_the_older_name_of_model_flow():
    r = validate({"data": {"path": "x"}, "model": {"flux": {"guidance_scale": 3.0}}}, "t")
    assert r.model.flow.guidance_scale == 3.0 and r.model.flux is None
    with pytest.raises(RecipeError, match="older name of model.flow"):
        validate({"data": {"path": "x"}, "model": {"flux": {}, "flow": {}}}, "t")


@pytest.mark.parametrize("width,prediction,version,arch", [
    (768, "epsilon", "sd_v1", "stable-diffusion-v1/lora"),
    (1024, "epsilon", "sd_v2", "stable-diffusion-v2-512/lora"),
    (1024, "v_prediction", "sd_v2_v", "stable-diffusion-v2-768-v/lora"),
])
def test_sd2_loras_say_sd2_in_their_metadata(width, prediction, version, arch):
    # SD2.x's text encoder is OpenCLIP-H (1024 wide); SD1.x's is CLIP-L (768).
    c = SimpleNamespace(text_encoders={"text_encoder": SimpleNamespace(config=SimpleNamespace(hidden_size=width))},
                        noise_scheduler=SimpleNamespace(config=SimpleNamespace(prediction_type=prediction)))
    family = get_family("sd1")
    assert family.base_model_version(c) == version
    meta = kohya_metadata(rank=4, alpha=4, base_model_version=family.base_model_version(c), modelspec=family.modelspec)
    assert meta["ss_base_model_version"] == version and meta["modelspec.architecture"] == arch
    assert meta["ss_v2"] == str(version != "sd_v1")
