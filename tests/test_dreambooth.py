"""Full DreamBooth from its bundled recipe, through the CLI with overrides only: the UNet trains,
everything else stays bit-identical, and both the diffusers folder and the single-file checkpoint
load with diffusers' own loaders and reproduce the trained UNet."""

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from finetune.cli import app

from .helpers import make_image_folder


@pytest.fixture(scope="module")
def dreambooth_run(tiny_sd15, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("db")
    data = make_image_folder(tmp / "data", n=3, sizes=((64, 64),))
    args = ["train", "sd15-dreambooth", f"model.base={tiny_sd15}", f"data.path={data}", "data.resolution=64",
            "training.max_steps=4", "training.learning_rate=1e-4", "training.mixed_precision=no",
            f"prior_preservation.class_data_dir={tmp / 'class'}", "prior_preservation.num_class_images=2",
            "prior_preservation.num_inference_steps=2", "validation.num_inference_steps=2",
            "validation.every_n_steps=null", "output.save_every_n_steps=2", "output.save_dtype=fp32",
            f"output.dir={tmp / 'out'}", "output.run_name=db", "--no-progress"]
    r = CliRunner().invoke(app, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return tmp / "out" / "db", tmp


def test_only_the_unet_changed(dreambooth_run, tiny_sd15):
    run, _ = dreambooth_run
    for part, changed in (("unet", True), ("vae", False), ("text_encoder", False)):
        name = "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
        before, after = load_file(tiny_sd15 / part / name), load_file(run / "model" / part / name)
        assert before.keys() == after.keys()
        differs = [k for k in before if not torch.equal(before[k], after[k])]
        assert bool(differs) == changed, part
    assert (run / "checkpoints" / "step-000002" / "model" / "model_index.json").is_file()
    assert len(list((run / "../../class").glob("*.png"))) == 2


def _unet_out(unet):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500]), encoder_hidden_states=ctx).sample


def test_saved_model_and_single_file_load_and_match(dreambooth_run, tiny_sd15):
    from diffusers import StableDiffusionPipeline

    run, _ = dreambooth_run
    folder = StableDiffusionPipeline.from_pretrained(run / "model", safety_checker=None)
    base = StableDiffusionPipeline.from_pretrained(tiny_sd15, safety_checker=None)
    single = StableDiffusionPipeline.from_single_file(run / "db.safetensors", config=str(tiny_sd15),
                                                      safety_checker=None, local_files_only=True)
    trained = _unet_out(folder.unet)
    assert not torch.allclose(trained, _unet_out(base.unet))
    assert torch.allclose(_unet_out(single.unet), trained, atol=1e-5)
    card = (run / "README.md").read_text()
    assert "DreamBooth" in card and "db.safetensors" in card and "from_single_file" in card
