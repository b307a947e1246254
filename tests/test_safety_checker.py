"""The safety-checker hook with a tiny StableDiffusionSafetyChecker built locally: flagged images
are blocked (no file), blurred or replaced per recipe; a checker that cannot load fails closed."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from finetune.cli import app


def make_checker(folder, always_flag: bool):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                           image_size=32, patch_size=8),
        projection_dim=16)
    checker = StableDiffusionSafetyChecker(cfg)
    # A concept "fires" when cosine similarity exceeds its threshold: -2 always, +2 never.
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-2.0 if always_flag else 2.0)
        checker.special_care_embeds_weights.fill_(2.0)
    checker.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def gen(tiny_sd15, out, hook):
    args = ["generate", "--base", tiny_sd15, "--steps", "2", "--width", "64", "--height", "64", "--out", out,
            "--prompt", "a photo", "--hook", hook, "--hook", "provenance"]
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def checkers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("checkers")
    return make_checker(tmp / "flag", True), make_checker(tmp / "pass", False)


def test_flagged_image_is_blocked_and_recorded(tiny_sd15, checkers, tmp_path):
    r = gen(tiny_sd15, tmp_path / "g", f"{{type: safety_checker, weights: {checkers[0]}}}")
    assert r.exit_code == 3, r.output  # nothing written: a documented exit code of its own
    assert "rejected:" in r.output and "safety_checker" in r.output
    assert not list((tmp_path / "g").glob("*.png"))
    (row,) = [json.loads(x) for x in (tmp_path / "g" / "manifest.jsonl").read_text().splitlines()]
    assert row["status"] == "rejected" and row["file"] is None and "safety_checker" in row["reason"]


def test_clean_image_passes_and_blur_replace_transform(tiny_sd15, checkers, tmp_path):
    assert gen(tiny_sd15, tmp_path / "ok", f"{{type: safety_checker, weights: {checkers[1]}}}").exit_code == 0
    (clean,) = (tmp_path / "ok").glob("*.png")
    a = np.asarray(Image.open(clean), dtype=np.float32)
    assert gen(tiny_sd15, tmp_path / "b", f"{{type: safety_checker, weights: {checkers[0]}, action: blur}}").exit_code == 0
    (blurred,) = (tmp_path / "b").glob("*.png")
    b = np.asarray(Image.open(blurred), dtype=np.float32)
    assert b.std() < a.std() and np.abs(b - a).mean() > 1  # same image, blurred
    assert gen(tiny_sd15, tmp_path / "r", f"{{type: safety_checker, weights: {checkers[0]}, action: replace}}").exit_code == 0
    (replaced,) = (tmp_path / "r").glob("*.png")
    assert np.asarray(Image.open(replaced)).std() == 0
    rows = [json.loads(x) for x in (tmp_path / "r" / "manifest.jsonl").read_text().splitlines()]
    assert rows[0]["verdicts"][0]["action"] == "transform"


def test_checker_that_cannot_load_fails_closed(tiny_sd15, tmp_path):
    r = gen(tiny_sd15, tmp_path / "g", f"{{type: safety_checker, weights: {tmp_path / 'missing'}}}")
    assert r.exit_code == 1
    assert "output hook safety_checker: cannot load" in r.output and "nothing was generated" in r.output
    assert not (tmp_path / "g").exists()
