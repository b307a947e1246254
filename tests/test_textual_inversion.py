"""Textual inversion on the tiny SD1.5: only the new token rows learn, everything else stays
bit-identical, both saved files load with diffusers' own loader and change its output, bad
settings are one clear error, and the bundled recipe runs on the tiny model through overrides."""

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.errors import FinetuneError, RecipeError
from finetune.recipe import load_recipe, validate
from finetune.train import train

from .helpers import make_image_folder, tiny_recipe

REPO = Path(__file__).resolve().parents[1]
TOKEN = "<sks-ball>"
TOKENS = [TOKEN, f"{TOKEN}_1"]
INIT = "x"  # one token in the tiny byte-level tokenizer ("x</w>")
PROMPT = f"a photo of {TOKEN}"


def ti_method(**kw):
    return {"type": "textual_inversion", "placeholder_token": TOKEN, "initializer_token": INIT, "num_vectors": 2, **kw}


def run(tmp_path, model, caption=PROMPT, method=None, **overrides):
    data = make_image_folder(tmp_path / "data", caption=caption)
    r = tiny_recipe(model, data, tmp_path / "outputs", **overrides)
    r["method"] = method or ti_method()
    return train(validate(r, "test"), log=lambda *_: None, progress=False)


@pytest.fixture(scope="module")
def trained(tiny_sd15, tmp_path_factory):
    """One run shared by the checks below: 6 steps, 2 vectors, the image set's own captions
    ("a photo of <sks-ball>, view i"), AdamW with weight decay (which would move every row)."""
    tmp = tmp_path_factory.mktemp("ti")
    return run(tmp, tiny_sd15, training__max_steps=6, training__learning_rate=2e-2)


def fresh_pipeline(model):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image(pipe, prompt=PROMPT):
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, height=64, width=64, generator=g, output_type="np").images[0]


def token_rows(te, tokenizer):
    ids = tokenizer.convert_tokens_to_ids(TOKENS)
    return te.get_input_embeddings().weight.detach()[ids].clone()


def initial_vectors(model):
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(model / "tokenizer")
    te = CLIPTextModel.from_pretrained(model / "text_encoder")
    (init_id,) = tok(INIT, add_special_tokens=False).input_ids
    return te.get_input_embeddings().weight.detach()[init_id].repeat(2, 1).clone()


def test_only_the_new_rows_change(trained, tiny_sd15):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    c = trained.components
    te, tok = c.text_encoders["text_encoder"], c.tokenizers["text_encoder"]
    on_disk = {
        "unet": (UNet2DConditionModel.from_pretrained(tiny_sd15 / "unet"), c.denoiser),
        "vae": (AutoencoderKL.from_pretrained(tiny_sd15 / "vae"), c.vae),
        "text_encoder": (CLIPTextModel.from_pretrained(tiny_sd15 / "text_encoder"), te),
    }
    emb_ptr = te.get_input_embeddings().weight.data_ptr()
    emb_key = next(k for k, v in te.state_dict().items() if v.data_ptr() == emb_ptr)
    for name, (original, current) in on_disk.items():
        cur = current.state_dict()
        assert cur.keys() == original.state_dict().keys(), name
        for k, v in original.state_dict().items():
            if name == "text_encoder" and k == emb_key:
                n = v.shape[0]
                assert cur[k].shape[0] == n + 2
                assert torch.equal(cur[k][:n], v), "a row of an existing token changed"
            else:
                assert torch.equal(cur[k], v), f"{name}.{k} changed"
    # The new rows did learn: they moved away from the initializer's embedding.
    new = token_rows(te, tok)
    assert tok.convert_tokens_to_ids(TOKENS) == [len(tok) - 2, len(tok) - 1]
    assert ((new - initial_vectors(tiny_sd15)).abs().amax(dim=1) > 1e-3).all(), "every vector should learn"
    # Only the new rows ever had a gradient: the optimizer's moments of every other row are zero.
    weight = te.get_input_embeddings().weight
    state = trained.optimizer.state[weight]
    ids = tok.convert_tokens_to_ids(TOKENS)
    others = torch.ones(weight.shape[0], dtype=torch.bool)
    others[ids] = False
    assert (state["exp_avg"][ids].abs().sum(dim=1) > 0).all()
    assert torch.count_nonzero(state["exp_avg"][others]) == 0
    assert torch.count_nonzero(state["exp_avg_sq"][others]) == 0


@pytest.mark.smoke
@pytest.mark.parametrize("fmt", ["diffusers", "webui"])
def test_saved_embedding_loads_in_a_fresh_pipeline_and_changes_its_output(trained, tiny_sd15, fmt):
    c = trained.components
    trained_vectors = token_rows(c.text_encoders["text_encoder"], c.tokenizers["text_encoder"])
    d = trained.run_dir
    # The same token with its starting vectors: what the output would be had nothing been learned.
    start = fresh_pipeline(tiny_sd15)
    start.load_textual_inversion({TOKEN: initial_vectors(tiny_sd15)})
    pipe = fresh_pipeline(tiny_sd15)
    if fmt == "diffusers":
        state = load_file(d / "learned_embeds.safetensors")
        assert list(state) == [TOKEN] and state[TOKEN].shape == (2, 32)
        pipe.load_textual_inversion(str(d))
    else:
        state = load_file(d / "run.safetensors")
        assert list(state) == ["emb_params"] and state["emb_params"].shape == (2, 32)
        pipe.load_textual_inversion(str(d / "run.safetensors"), token=TOKEN)
    assert torch.equal(token_rows(pipe.text_encoder, pipe.tokenizer), trained_vectors)
    # diffusers expands the multi-vector token in prompts, as training did.
    assert pipe.maybe_convert_prompt(PROMPT, pipe.tokenizer) == f"a photo of {' '.join(TOKENS)}"
    assert abs(image(pipe) - image(start)).mean() > 1e-3


def test_captions_are_expanded_to_every_vector(tiny_sd15):
    from finetune.families import get_family
    from finetune.methods import get_method
    from finetune.methods.textual_inversion import TextualInversionConfig
    from finetune.recipe.schema import TrainingConfig

    family = get_family("sd1")
    m = get_method(TextualInversionConfig(**ti_method(num_vectors=3)), family, TrainingConfig())
    three = f"{TOKEN} {TOKEN}_1 {TOKEN}_2"
    assert m.prepare_caption(f"a photo of {TOKEN}, red") == f"a photo of {three}, red"
    assert m.prepare_caption(f"a photo of {three}") == f"a photo of {three}"  # already expanded
    assert m.prepare_caption("") == ""  # caption dropout stays empty
    with pytest.raises(FinetuneError, match="does not contain"):
        m.prepare_caption("a photo of sks ball")
    fixed = get_method(TextualInversionConfig(**ti_method(caption=f"art by {TOKEN}")), family, TrainingConfig())
    assert fixed.prepare_caption("anything at all") == f"art by {TOKEN} {TOKEN}_1"
    assert fixed.prepare_caption("") == f"art by {TOKEN} {TOKEN}_1"


def test_bad_settings_are_one_clear_error(tiny_sd15, tmp_path):
    # Checked before the model loads: each problem is one line naming its key.
    cases = {
        "method.placeholder_token": ti_method(placeholder_token="my ball"),
        "method.placeholder_token ": ti_method(placeholder_token="<My-Ball>"),
        "method.caption": ti_method(caption="a photo of a ball"),
    }
    for key, method in cases.items():
        r = tiny_recipe(tiny_sd15, tmp_path, tmp_path / "out")
        r["method"] = method
        with pytest.raises(RecipeError) as exc:
            validate(r, "test")
        assert len(exc.value.problems) == 1 and f": {key.strip()}: " in exc.value.problems[0], exc.value.problems

    # Checked against the tokenizer, before anything is written.
    with pytest.raises(FinetuneError, match=r"method\.placeholder_token: '<\|endoftext\|>' is already a token"):
        run(tmp_path / "a", tiny_sd15, method=ti_method(placeholder_token="<|endoftext|>"))
    with pytest.raises(FinetuneError, match=r"method\.initializer_token: 'ball' is 4 tokens"):
        run(tmp_path / "b", tiny_sd15, method=ti_method(initializer_token="ball"))
    # Captions that never say the placeholder would teach it nothing.
    with pytest.raises(FinetuneError, match=r"method\.placeholder_token: the training caption .* does not contain"):
        run(tmp_path / "c", tiny_sd15, caption="a photo of sks ball")
    for sub in "abc":
        assert not (tmp_path / sub / "outputs" / "run").exists()


def test_half_precision_text_encoder_with_fp32_vectors(tiny_sd15):
    """As the loop sets it up under bf16/fp16: the text encoder in half precision, its trained
    embedding weight back in fp32. It still encodes (the embeddings are handed on in the
    encoder's dtype; CPU layer_norm refuses a mix) and the gradient reaches the new rows."""
    from diffusers.training_utils import cast_training_params

    from finetune.families import get_family
    from finetune.families.base import resolve_source
    from finetune.methods import get_method
    from finetune.methods.textual_inversion import TextualInversionConfig
    from finetune.recipe.schema import ModelConfig, TrainingConfig

    family = get_family("sd1")
    c = family.load(resolve_source(str(tiny_sd15)), ModelConfig(base=str(tiny_sd15)))
    method = get_method(TextualInversionConfig(**ti_method()), family, TrainingConfig())
    c.text_encoders["text_encoder"].to(torch.bfloat16)
    (group,) = method.setup(c)
    cast_training_params(method.trainable_modules(c), dtype=torch.float32)
    (weight,) = group["params"]
    assert weight.dtype == torch.float32
    hidden = family.encode_prompts(c, [method.prepare_caption(PROMPT)])["encoder_hidden_states"]
    assert hidden.dtype == torch.bfloat16 and torch.isfinite(hidden.float()).all()
    hidden.float().square().mean().backward()
    ids = c.tokenizers["text_encoder"].convert_tokens_to_ids(TOKENS)
    assert weight.grad.dtype == torch.float32 and (weight.grad[ids].abs().sum(dim=1) > 0).all()


def test_bundled_recipe_runs_on_the_tiny_model(tiny_sd15, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the recipe's data.path (datasets/robot) is relative to the repository
    recipe, path = load_recipe("sd15-textual-inversion", [
        f"model.base={tiny_sd15}", "data.resolution=64", "training.max_steps=2", "training.mixed_precision=no",
        "method.initializer_token=x", "validation.num_inference_steps=2", "validation.images_per_prompt=1",
        "training.gradient_accumulation_steps=1", "output.save_every_n_steps=1",
        "output.save_dtype=fp16", f"output.dir={tmp_path}", "output.run_name=ti"])
    result = train(recipe, path, log=lambda *_: None, progress=False)
    d = result.run_dir
    assert result.steps == 2
    diffusers_file = load_file(d / "learned_embeds.safetensors")
    webui_file = load_file(d / "ti.safetensors")
    assert diffusers_file["<sks-robot>"].shape == webui_file["emb_params"].shape == (4, 32)
    assert diffusers_file["<sks-robot>"].dtype == torch.float16
    assert (d / "checkpoints" / "step-000001" / "learned_embeds.safetensors").is_file()
    assert len(list((d / "samples").rglob("*.png"))) == 2  # validation prompts use the new token
    assert not [n for n in os.listdir(d) if n.endswith(".tmp")]
    card = (d / "README.md").read_text()
    assert f"pipe.load_textual_inversion({str(d)!r})" in card and "`<sks-robot>`" in card
    assert "load_lora_weights" not in card and "<lora:" not in card
