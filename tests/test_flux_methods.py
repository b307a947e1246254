"""Textual inversion, pivotal tuning and DreamBooth on the tiny FLUX.1.

The new token is learned in CLIP-L only (T5 keeps its vocabulary): the run trains, only the new
rows move, and both embedding files load with FluxPipeline's own `load_textual_inversion` and change
its output. Pivotal tuning saves the embedding beside a kohya LoRA in FLUX's BFL names. DreamBooth
saves the diffusers folder and a transformer-only single file in BFL's layout, which diffusers'
`from_single_file` reads back tensor for tensor; at FLUX.1's real size the layout is exactly the
one diffusers' converter takes apart, key for key and shape for shape."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.recipe import validate
from finetune.train import train

from .helpers import make_image_folder, step_rows, tiny_recipe

TOKEN = "<sks-ball>"
TOKENS = [TOKEN, f"{TOKEN}_1"]
PROMPT = f"a photo of {TOKEN}"
INNER = 32  # the tiny transformer's width (heads x head dim)
FLUX_DEV_TRANSFORMER = (Path(__file__).resolve().parents[1] / "finetune" / "plan" / "configs"
                        / "black-forest-labs__FLUX.1-dev" / "transformer")


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    from finetune.tiny_models.flux import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"), n=2, sizes=((64, 64),), caption=PROMPT)


def _train(tiny_flux, data, tmp_path, method: dict, **overrides):
    r = tiny_recipe(tiny_flux, data, tmp_path / "out", **overrides)
    r["method"] = method
    return train(validate(r, "test"), log=lambda *_: None, progress=False)


def _ti(**kw) -> dict:
    # "x": one token in the tiny byte-level CLIP tokenizer.
    return {"type": "textual_inversion", "placeholder_token": TOKEN, "initializer_token": "x", "num_vectors": 2, **kw}


@pytest.fixture(scope="module")
def ti_run(tiny_flux, data, tmp_path_factory):
    return _train(tiny_flux, data, tmp_path_factory.mktemp("ti"), _ti(learning_rate=5e-2), training__max_steps=3)


def _pipe(model):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe):
    return pipe(PROMPT, num_inference_steps=2, width=64, height=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0]


def _rows(pipe_or_te, tokenizer):
    te = getattr(pipe_or_te, "text_encoder", pipe_or_te)
    return te.get_input_embeddings().weight.detach()[tokenizer.convert_tokens_to_ids(TOKENS)].clone()


# ------------------------------------------------------------------ textual inversion


def test_ti_learns_the_token_in_clip_l_only(ti_run, tiny_flux):
    from transformers import CLIPTextModel, CLIPTokenizer

    losses = [row["loss"] for row in step_rows(ti_run.run_dir)]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    c = ti_run.components
    clip, tok = c.text_encoders["text_encoder"], c.tokenizers["text_encoder"]
    assert TOKEN not in c.tokenizers["text_encoder_2"].get_vocab(), "T5 gets no new token"
    original = CLIPTextModel.from_pretrained(tiny_flux / "text_encoder").get_input_embeddings().weight.detach()
    (init_id,) = CLIPTokenizer.from_pretrained(tiny_flux / "tokenizer")("x", add_special_tokens=False).input_ids
    weight = clip.get_input_embeddings().weight.detach()
    n = original.shape[0]
    assert torch.equal(weight[:n], original), "a row of an existing token changed"
    moved = (_rows(clip, tok) - original[init_id]).abs().amax(dim=1)
    # measured: 0.14 and 0.15 after 3 steps at 5e-2
    assert (moved > 1e-2).all(), f"every vector should learn, moved {moved.tolist()}"


def test_training_encodes_the_caption_as_flux_pipeline_encodes_the_prompt(ti_run, tiny_flux):
    # CLIP-L reads the expanded token (`<t> <t>_1`), T5 the caption as written: as FluxPipeline does
    # with the embedding loaded, so what the vectors learn is what sampling feeds them.
    from finetune.families import get_family
    from finetune.methods.textual_inversion import TextualInversionConfig, TextualInversionMethod

    c = ti_run.components
    method = TextualInversionMethod(TextualInversionConfig(**_ti()), get_family("flux"), None)
    caption = method.prepare_caption(PROMPT)
    assert f"{TOKEN} {TOKEN}_1" in caption
    with torch.no_grad():
        ours = get_family("flux").encode_prompts(c, [caption])
    pipe = _pipe(tiny_flux)
    pipe.load_textual_inversion(str(ti_run.run_dir))
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(PROMPT, prompt_2=None, device="cpu")
    assert torch.allclose(ours["prompt_embeds"], embeds, atol=1e-6)
    assert torch.allclose(ours["pooled_prompt_embeds"], pooled, atol=1e-6)


@pytest.mark.parametrize("fmt", ["diffusers", "embedding"])
def test_ti_files_load_in_flux_pipeline_and_change_its_output(ti_run, tiny_flux, fmt):
    c = ti_run.components
    trained = _rows(c.text_encoders["text_encoder"], c.tokenizers["text_encoder"])
    run = ti_run.run_dir
    before = _image(_pipe(tiny_flux))
    pipe = _pipe(tiny_flux)
    if fmt == "diffusers":
        state = load_file(run / "learned_embeds.safetensors")
        assert list(state) == [TOKEN] and state[TOKEN].shape == (2, 32)
        pipe.load_textual_inversion(str(run))  # CLIP-L: the pipeline's `text_encoder` / `tokenizer`
    else:
        state = load_file(run / "run.safetensors")
        assert list(state) == ["clip_l"] and state["clip_l"].shape == (2, 32)
        pipe.load_textual_inversion(str(run / "run.safetensors"), token=TOKEN, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
    assert torch.equal(_rows(pipe, pipe.tokenizer), trained)
    # FluxPipeline expands the token for CLIP-L; T5 reads the prompt as written.
    assert pipe.maybe_convert_prompt(PROMPT, pipe.tokenizer) == f"a photo of {' '.join(TOKENS)}"
    assert pipe.maybe_convert_prompt(PROMPT, pipe.tokenizer_2) == PROMPT
    assert abs(_image(pipe) - before).mean() > 1e-3  # measured: 8e-3


# ------------------------------------------------------------------ pivotal tuning


def test_pivotal_saves_a_clip_l_embedding_and_a_kohya_lora(tiny_flux, data, tmp_path):
    run = _train(tiny_flux, data, tmp_path, {**_ti(), "type": "pivotal", "rank": 4, "alpha": 4},
                 training__max_steps=2).run_dir
    for name in ("learned_embeds.safetensors", "pytorch_lora_weights.safetensors", "run.safetensors",
                 "run-emb.safetensors"):
        assert (run / name).is_file(), name
    assert list(load_file(run / "run-emb.safetensors")) == ["clip_l"]
    kohya = load_file(run / "run.safetensors")
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in kohya
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in kohya
    pipe = _pipe(tiny_flux)
    pipe.load_textual_inversion(str(run))
    pipe.load_lora_weights(str(run))
    assert pipe.get_list_adapters()


# ------------------------------------------------------------------ DreamBooth and the single file


class _TinyWidthTorch:
    """`torch` as diffusers' FLUX converter sees it, but cutting `linear1` at the tiny width: the
    converter hard-codes FLUX.1's (q, k, v, mlp) = (3072, 3072, 3072, 12288) rows (diffusers 0.42,
    and its main branch in 2026), so no FLUX narrower than the real one reads back unpatched.
    Everything else it does (key detection, renames, the scale/shift swap) runs as shipped."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def split(tensor, sizes, dim=0):
        if tuple(sizes) == (3072, 3072, 3072, 12288) and tensor.shape[dim] == 7 * INNER:
            sizes = (INNER, INNER, INNER, 4 * INNER)
        return torch.split(tensor, sizes, dim=dim)


def _read_back(path, config, monkeypatch):
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders import single_file_utils

    monkeypatch.setattr(single_file_utils, "torch", _TinyWidthTorch())
    return FluxTransformer2DModel.from_single_file(str(path), config=str(config), subfolder="transformer")


def test_single_file_round_trips_exactly(tiny_flux, tmp_path, monkeypatch):
    from diffusers import FluxTransformer2DModel

    from finetune.export.flux_single_file import save_flux_single_file

    original = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    with torch.no_grad():  # distinct halves, so a missed scale/shift swap cannot pass unseen
        original.norm_out.linear.weight[:INNER] += 1.0
    path = save_flux_single_file(tmp_path / "flux.safetensors", original, dtype=torch.float32)
    keys = set(load_file(path))
    assert "double_blocks.0.img_attn.qkv.weight" in keys and "single_blocks.1.linear1.bias" in keys
    assert "final_layer.adaLN_modulation.1.weight" in keys and "guidance_in.in_layer.weight" in keys
    back = _read_back(path, tiny_flux, monkeypatch).state_dict()
    ours = original.state_dict()
    assert back.keys() == ours.keys()
    differ = [k for k in ours if not torch.equal(back[k], ours[k])]
    assert not differ, differ[:5]


def test_single_file_layout_at_full_size_is_what_diffusers_takes_apart():
    """FLUX.1 [dev]'s real configuration, on the meta device: the file's keys are the 780 a BFL
    checkpoint has, and diffusers' converter (unpatched, at its hard-coded real width) uses every one
    and rebuilds every parameter at its shape."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from finetune.export.flux_single_file import flux_bfl_state_dict

    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(FLUX_DEV_TRANSFORMER))
    state = model.state_dict()
    bfl = flux_bfl_state_dict(state, inner=3072)
    assert len(bfl) == 780  # 19 double blocks x 24 + 38 single blocks x 8 + 20 outside the blocks
    assert bfl["single_blocks.37.linear1.weight"].shape == (21504, 3072)
    left = dict(bfl)
    converted = convert_flux_transformer_checkpoint_to_diffusers(left)
    assert not left, f"keys diffusers does not read: {sorted(left)[:5]}"
    assert converted.keys() == state.keys()
    assert all(converted[k].shape == state[k].shape for k in state)


def test_dreambooth_saves_the_folder_and_a_single_file(tiny_flux, data, tmp_path, monkeypatch):
    from diffusers import FluxTransformer2DModel

    result = _train(tiny_flux, data, tmp_path, {"type": "dreambooth"}, training__max_steps=2,
                    output__save_dtype="bf16")
    run = result.run_dir
    assert (run / "model" / "model_index.json").is_file()
    single = load_file(run / "run.safetensors")
    assert {v.dtype for v in single.values()} == {torch.bfloat16}, "the file follows output.save_dtype"
    folder = FluxTransformer2DModel.from_pretrained(run / "model", subfolder="transformer").state_dict()
    back = _read_back(run / "run.safetensors", tiny_flux, monkeypatch).state_dict()
    base = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer").state_dict()
    assert all(torch.equal(back[k].to(torch.bfloat16), folder[k].to(torch.bfloat16)) for k in folder)
    assert any(not torch.equal(folder[k], base[k]) for k in base), "the transformer trained"
