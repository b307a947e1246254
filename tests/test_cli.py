"""The command line as a user drives it: a recipe file, a folder of PNGs with captions, a local
diffusers model folder; errors one line each with a non-zero exit."""

import json

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from finetune import __version__
from finetune.cli import app

from .helpers import make_image_folder

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and r.output.strip() == f"finetune {__version__}"


def test_recipes_list_and_show():
    r = invoke("recipes")
    assert r.exit_code == 0
    names = [line.split()[0] for line in r.output.splitlines() if line.strip()]
    assert "quickstart" in names and "sd15-lora" in names
    r = invoke("recipes", "quickstart")
    assert r.exit_code == 0 and "builtin:tiny-sd15" in r.output


def test_validate_ok_and_bad(tmp_path):
    r = invoke("validate", "quickstart", "training.max_steps=5")
    assert r.exit_code == 0 and r.output.strip().endswith(": ok")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  path: x\n  resolution: 100\ntraining:\n  lerning_rate: 1\n")
    r = invoke("validate", bad)
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith(f"error: {bad}: ") for line in lines)
    assert "Traceback" not in r.output


@pytest.fixture
def user_recipe(tmp_path, tiny_sd15):
    """What a user writes: their PNG folder with .txt captions and a local diffusers model."""
    make_image_folder(tmp_path / "my photos", n=5)
    recipe = tmp_path / "my-lora.yaml"
    recipe.write_text(yaml.safe_dump({
        "extends": "sd15-lora",
        "model": {"base": str(tiny_sd15)},
        "data": {"path": "my photos", "resolution": 64},   # relative to the recipe file
        "training": {"mixed_precision": "no", "max_steps": 100, "learning_rate": 1e-3, "gradient_checkpointing": True},
        "validation": {"prompts": ["a photo of sks ball"], "num_inference_steps": 2, "every_n_steps": 100},
        "output": {"dir": str(tmp_path / "outputs"), "save_every_n_steps": 100},
    }))
    return recipe


def test_train_from_a_user_recipe(user_recipe, tmp_path):
    r = invoke("train", user_recipe, "training.max_steps=4", "--set", "output.run_name=mine", "--no-progress")
    assert r.exit_code == 0, r.output
    run = tmp_path / "outputs" / "mine"
    assert f"run folder: {run}" in r.output
    for name in ("recipe.yaml", "pytorch_lora_weights.safetensors", "mine.safetensors", "metrics.jsonl", "README.md"):
        assert (run / name).is_file(), name
    assert list((run / "samples" / "step-000004").glob("*.png"))
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert resolved["training"]["max_steps"] == 4 and resolved["optimizer"]["type"] == "adamw8bit"
    # The same run name again is refused before any model loads, leaving the first run intact.
    r = invoke("train", user_recipe, "training.max_steps=4", "output.run_name=mine")
    assert r.exit_code == 1 and "already exists" in r.output and (run / "mine.safetensors").is_file()


def test_train_errors_are_one_line_and_leave_nothing(user_recipe, tmp_path):
    r = invoke("train", user_recipe, "data.path=nowhere", "output.run_name=x")
    assert r.exit_code == 1
    assert r.output.strip().count("\n") == 0 and r.output.startswith("error: data.path")
    assert "Traceback" not in r.output
    assert not (tmp_path / "outputs" / "x").exists()
    r = invoke("train", user_recipe, "model.base=" + str(tmp_path / "missing.ckpt"), "output.run_name=x")
    assert r.exit_code == 1 and r.output.startswith(f"error: {user_recipe}: model.base: file ")
    assert r.output.strip().count("\n") == 0
    r = invoke("train", user_recipe, "training.mixed_precision=fp16", "output.run_name=x")
    assert r.exit_code == 1 and "fp16 needs a CUDA GPU" in r.output
    assert not (tmp_path / "outputs" / "x").exists()


def test_generate_with_and_without_lora(user_recipe, tiny_sd15, tmp_path):
    assert invoke("train", user_recipe, "training.max_steps=30", "output.run_name=g", "--no-progress").exit_code == 0
    run = tmp_path / "outputs" / "g"
    common = ["--base", tiny_sd15, "--prompt", "a photo of sks ball", "--steps", "3", "--width", "64", "--height", "64"]
    outs = {}
    for label, extra in {"base": [], "folder": ["--lora", run], "kohya": ["--lora", run / "g.safetensors"],
                         "half": ["--lora", f"{run / 'g.safetensors'}:0.5"]}.items():
        r = invoke("generate", *common, *extra, "--out", tmp_path / label)
        assert r.exit_code == 0, r.output
        files = sorted((tmp_path / label).glob("*.png"))
        assert len(files) == 1
        outs[label] = np.asarray(Image.open(files[0]), dtype=np.float32)
    assert np.abs(outs["folder"] - outs["base"]).mean() > 0.5
    assert np.abs(outs["kohya"] - outs["folder"]).mean() < np.abs(outs["kohya"] - outs["base"]).mean()
    assert 0 < np.abs(outs["half"] - outs["base"]).mean() < np.abs(outs["kohya"] - outs["base"]).mean()


def test_generate_refuses_pickled_lora(tmp_path, tiny_sd15):
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"not really")
    r = invoke("generate", "--base", tiny_sd15, "--prompt", "p", "--lora", bad)
    assert r.exit_code == 1 and "pickled" in r.output


def test_quickstart_recipe_runs_through_overrides_alone(tmp_path):
    r = invoke("train", "quickstart", "training.max_steps=3", f"output.dir={tmp_path}", "output.run_name=q",
               "validation.num_inference_steps=2", "--no-progress")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "q" / "q.safetensors").is_file()
    # The quickstart's eval runs offline on its own tiny CLIP and DINOv2 (validation.metric_models).
    r = invoke("eval", tmp_path / "q", "--n", 1, "--steps", 2)
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "q" / "eval" / "eval.json").read_text())
    assert {"clip_score", "clip_i", "dino", "kid_dinov2", "prior_clip_i", "prior_dino"} <= set(record["metrics"])
    assert record["reference"]["count"] == 8 and "warning" not in r.output


HEAVY = ("torch", "diffusers", "transformers", "accelerate", "peft")


@pytest.mark.parametrize("args", [["validate", "sd15-lora"], ["validate", "sdxl-brand", "method.rank=4"],
                                  ["validate", "flux-lora"], ["recipes"], ["--help"],
                                  ["dataset", "check", "datasets/robot"]])
def test_commands_without_a_model_import_no_model_library(args):
    """Answering about a YAML file or a folder of images needs neither torch nor diffusers (seconds
    and hundreds of MB on a small machine); each command runs in a fresh interpreter to see that."""
    import subprocess
    import sys

    from .conftest import REPO

    code = ("import sys\nfrom finetune.cli import run\nsys.argv = ['finetune', *sys.argv[1:]]\n"
            "try:\n    run()\nexcept SystemExit as e:\n    code = e.code\n"
            f"print('loaded:', ','.join(m for m in {HEAVY!r} if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "loaded:", f"{' '.join(args)}: {r.stdout[-300:]}"
