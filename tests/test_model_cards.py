"""Every model card tells the truth: its Python code runs as written against the run folder (on
the tiny model the run was trained on) and makes an image with the adapter loaded, and what it
says about other apps holds for the family (AUTOMATIC1111 runs no FLUX)."""

import os
import re

import pytest
from PIL import Image

from .conftest import TOKEN

CASES = [("sd1", "lora"), ("sd1", "textual_inversion"), ("sd1", "pivotal"), ("sd1", "dreambooth"),
         ("sdxl", "lora"), ("sdxl", "textual_inversion"), ("sdxl", "pivotal"), ("sdxl", "dreambooth"),
         ("flux", "lora"), ("flux", "pivotal"), ("flux", "dreambooth")]


def card_code(run_dir) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (run_dir / "README.md").read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1, "a card has one Python snippet"
    return blocks[0]


def run_card(run_dir, cwd) -> dict:
    namespace: dict = {}
    old = os.getcwd()
    os.chdir(cwd)
    try:
        exec(compile(card_code(run_dir), str(run_dir / "README.md"), "exec"), namespace)
    finally:
        os.chdir(old)
    return namespace


def _adapters_loaded(pipe, method, family):
    """What the card's code must have put into the pipeline for this method."""
    if method in ("textual_inversion", "pivotal"):
        from finetune.families import get_family

        # Each tokenizer of an encoder that learns the token knows it (SDXL: both; FLUX.1: CLIP-L's only).
        for encoder in get_family(family).embedding_keys:
            name = encoder.replace("text_encoder", "tokenizer")
            tok = getattr(pipe, name)
            assert tok.convert_tokens_to_ids(TOKEN) != tok.unk_token_id, f"{name} does not know {TOKEN}"
    if method in ("lora", "pivotal"):
        assert pipe.get_list_adapters(), "no LoRA loaded"


@pytest.mark.smoke
@pytest.mark.parametrize(("family", "method"), CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_model_card_code_runs_and_loads_the_adapter(tiny_run, tmp_path, family, method):
    run_dir = tiny_run(family, method)
    ns = run_card(run_dir, tmp_path)
    with Image.open(tmp_path / "sample.png") as image:
        assert image.size == (64, 64)  # the size the run's samples use
    _adapters_loaded(ns["pipe"], method, family)


@pytest.mark.parametrize("family", ["sd1", "flux"])
def test_model_card_names_only_apps_that_load_the_family(tiny_run, family):
    card = (tiny_run(family, "lora") / "README.md").read_text(encoding="utf-8")
    assert ("AUTOMATIC1111" in card) == (family != "flux")
    assert "Forge" in card and "ComfyUI" in card


def test_sdxl_embedding_card_never_offers_a_one_encoder_load(tiny_run):
    """`load_textual_inversion(run_folder)` fills only CLIP-L on SDXL, and the clip_l/clip_g file is
    not one diffusers reads in a single call: the card must not suggest either."""
    card = (tiny_run("sdxl", "textual_inversion") / "README.md").read_text(encoding="utf-8")
    assert "load_textual_inversion(run_folder)" not in card
    assert "load_textual_inversion(file, token=...)" not in card
