"""Test helpers: small image sets drawn on the fly and recipes pointing at them."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def draw_subject(seed: int, size=(64, 64)) -> Image.Image:
    """A simple, learnable 'subject': a coloured disc on a two-tone background."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(150, 255, 3)))
    d = ImageDraw.Draw(img)
    d.rectangle([0, h * 2 // 3, w, h], fill=tuple(int(v) for v in rng.integers(0, 100, 3)))
    r = min(w, h) // 4
    cx, cy = w // 2 + int(rng.integers(-4, 5)), h // 2 + int(rng.integers(-4, 5))
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(220, 60, 20))
    return img


def make_image_folder(folder: Path, n: int = 4, sizes=((64, 64), (96, 64), (64, 96)), caption="a photo of sks ball") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        draw_subject(i, sizes[i % len(sizes)]).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"{caption}, view {i}")
    return folder


def tiny_recipe(model_dir, data_dir, out_dir, **overrides) -> dict:
    """A recipe dict for a few CPU steps on the tiny model; `overrides` use section__key=value."""
    r = {
        "model": {"base": str(model_dir)},
        "data": {"path": str(data_dir), "resolution": 64},
        "method": {"type": "lora", "rank": 4, "alpha": 4},
        "optimizer": {"type": "adamw"},
        "training": {"max_steps": 4, "batch_size": 2, "learning_rate": 1e-3, "seed": 0, "mixed_precision": "no"},
        "validation": {"prompts": [], "num_inference_steps": 2},
        "output": {"dir": str(out_dir), "run_name": "run", "save_dtype": "fp32"},
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        r[section][name] = value
    return r


def latents_and_captions(family, c, data_dir):
    from finetune.data import ImageCaptionDataset, discover_examples
    from finetune.recipe.schema import DataConfig

    cfg = DataConfig(path=str(data_dir), resolution=64, bucketing={"enabled": False})
    ds = ImageCaptionDataset(discover_examples(cfg), cfg, seed=0)
    items = [ds[i] for i in range(len(ds))]
    pixels = torch.stack([it["pixel_values"] for it in items])
    with torch.no_grad():
        latents = family.encode_images(c, pixels)
    return latents, [it["caption"] for it in items]


def loss_before_and_after(family, c, data_dir, run_dir) -> tuple[float, float]:
    """Fixed-noise loss on the training images with the base model, then with the run's LoRA loaded."""
    from finetune.train.evaluate import fixed_noise_loss

    latents, captions = latents_and_captions(family, c, data_dir)
    before = fixed_noise_loss(family, c, latents, captions)
    c.pipeline.load_lora_weights(str(run_dir))
    return before, fixed_noise_loss(family, c, latents, captions)


def step_rows(run_dir) -> list[dict]:
    """metrics.jsonl's rows of optimizer steps (the run's last line is its `memory` record)."""
    import json
    from pathlib import Path

    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "step" in r]


# ------------------------------------------------------------------ shared by the family tests (test_<family>.py)


def tiny_model_fixture(builder: str, folder: str, **kwargs):
    """A module-scoped fixture that builds a tiny model once per test file. `builder` is
    "module.function" under finetune.tiny_models, imported only when a test asks for the model:
    the builders import diffusers, which collection should not pay for."""
    import importlib

    import pytest

    module, function = builder.rsplit(".", 1)

    @pytest.fixture(scope="module")
    def build(tmp_path_factory):
        make = getattr(importlib.import_module(f"finetune.tiny_models.{module}"), function)
        return make(tmp_path_factory.mktemp("models") / folder, **kwargs)

    return build


def train_quietly(recipe: dict):
    from finetune.recipe import validate
    from finetune.train import train

    return train(validate(recipe, "test"), log=lambda *_: None, progress=False)


def two_image_recipe(model_dir, tmp: Path, **overrides) -> dict:
    """tiny_recipe on two 64 px images: enough for tests that check what a run writes, not what it learns."""
    return tiny_recipe(model_dir, make_image_folder(tmp / "data", n=2, sizes=((64, 64),)), tmp / "out", **overrides)


def train_lora(model_dir, tmp: Path, *, max_steps: int, learning_rate: float, rank=8, alpha=4, **method):
    """The family tests' `trained` run: a LoRA learned on four 64 px images, and their folder. The
    default alpha != rank, so the exported files must scale by alpha / rank, not by 1."""
    data = make_image_folder(tmp / "data", n=4, sizes=((64, 64),))
    r = tiny_recipe(model_dir, data, tmp / "out", training__max_steps=max_steps, training__batch_size=4,
                    training__learning_rate=learning_rate)
    r["method"].update(rank=rank, alpha=alpha, **method)
    return train_quietly(r), data


def load_family(name: str, model, **config):
    """The family and its loaded components, as training loads them from `model.base`."""
    from finetune.families import get_family
    from finetune.families.base import resolve_source
    from finetune.recipe.schema import ModelConfig

    family = get_family(name)
    return family, family.load(resolve_source(str(model)), ModelConfig(base=str(model), **config))


class TinyPipeline:
    """A family's own diffusers pipeline class, and the call that samples one deterministic 2-step
    64 px image with it; `call` holds what that pipeline needs beyond the rest (e.g. no true CFG)."""

    def __init__(self, cls: str, **call):
        self.cls, self.call = cls, call

    def load(self, model):
        import diffusers

        pipe = getattr(diffusers, self.cls).from_pretrained(model)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def image(self, pipe, prompt="a photo of sks ball"):
        # prompt= by name: Flux2Pipeline takes an image first.
        return pipe(prompt=prompt, num_inference_steps=2, width=64, height=64, output_type="np",
                    generator=torch.Generator().manual_seed(0), **self.call).images[0]


def lora_modules(module) -> set[str]:
    return {n.rsplit(".lora_A", 1)[0] for n, _ in module.named_modules() if n.endswith(".lora_A")}


def real_kohya_names(family: str) -> set[str]:
    """Module names of real kohya LoRAs for the family, from tests/data/<family>_kohya_lora_keys.txt."""
    text = (Path(__file__).parent / "data" / f"{family}_kohya_lora_keys.txt").read_text()
    return {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}


def assert_frozen(module, saved_file, label=""):
    """Every weight of `module` outside its LoRA layers still equals the one saved in the base model."""
    from safetensors.torch import load_file

    saved = load_file(saved_file)
    current = {k.replace(".base_layer", ""): v for k, v in module.state_dict().items() if "lora_" not in k}
    for k, v in saved.items():
        assert torch.equal(current[k], v), (label, k)


def load_diffusers_file(pipeline: TinyPipeline, model, run_dir) -> set[str]:
    """Loads the run's diffusers file with the pipeline's own loader, checks that it changes the output and
    reaches every transformer module it names (none dropped silently), and returns those names."""
    from safetensors import safe_open

    pipe = pipeline.load(model)
    plain = pipeline.image(pipe)
    pipe.load_lora_weights(str(run_dir), adapter_name="d")
    assert np.abs(pipeline.image(pipe) - plain).max() > 1e-3, "the LoRA did not change the output"
    with safe_open(str(run_dir / "pytorch_lora_weights.safetensors"), "pt") as f:
        in_file = {k[len("transformer."):].rsplit(".lora_", 1)[0] for k in f.keys()}
    assert lora_modules(pipe.transformer) == in_file
    return in_file


def assert_kohya_file_samples_as_diffusers_file(pipeline: TinyPipeline, model, run_dir):
    """diffusers converts the kohya layout itself: loaded that way, the kohya file must give the same images."""
    from safetensors.torch import load_file

    pipe = pipeline.load(model)
    pipe.load_lora_weights(str(run_dir), adapter_name="d")
    with_diffusers = pipeline.image(pipe)
    pipe = pipeline.load(model)
    pipe.load_lora_weights(load_file(run_dir / "run.safetensors"), adapter_name="k")
    assert np.abs(pipeline.image(pipe) - with_diffusers).max() < 1e-5


def kohya_file(run_dir) -> tuple[dict, dict]:
    """The run's kohya file: its tensors and its metadata."""
    from safetensors import safe_open

    with safe_open(str(Path(run_dir) / "run.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def peft_scale(run_dir) -> float:
    """alpha / rank of the run's diffusers file, as its adapter metadata records them."""
    import json

    from safetensors import safe_open

    with safe_open(str(Path(run_dir) / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    return meta["transformer.lora_alpha"] / meta["transformer.r"]


def comfyui_deltas(kohya: dict, weight_of: dict[str, str]) -> dict:
    """What ComfyUI adds to each weight a kohya file names (`weight_of`: key -> weight): alpha / rank * up @ down."""
    deltas = {}
    for name in {k.split(".")[0] for k in kohya}:
        down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
        deltas[weight_of[name]] = kohya[f"{name}.alpha"].item() / down.shape[0] * (up @ down)
    return deltas


def assert_kohya_applies_as_trained(run_dir, table: dict[str, tuple[str, int, int | None]], *, complete=True):
    """ComfyUI adds alpha / rank * up @ down to the original weight each kohya key names. `table` maps each
    diffusers Linear to (original weight, first row, rows or None for all): every slice of every fused weight
    must get exactly the trained module's delta. complete=False lets modules of the table go untrained;
    their slices must then get none."""
    from safetensors.torch import load_file

    kohya = load_file(Path(run_dir) / "run.safetensors")
    peft = load_file(Path(run_dir) / "pytorch_lora_weights.safetensors")
    trained = {k.rsplit(".lora_", 1)[0] for k in peft}
    if complete:
        assert {f"transformer.{m}" for m in table} == trained, sorted(trained ^ {f"transformer.{m}" for m in table})
    scale = peft_scale(run_dir)
    deltas = comfyui_deltas(kohya, {"lora_unet_" + original.replace(".", "_"): original
                                    for original, _, _ in table.values()})
    checked = 0
    for module, (original, row, rows) in table.items():
        a, b = peft.get(f"transformer.{module}.lora_A.weight"), peft.get(f"transformer.{module}.lora_B.weight")
        if original not in deltas:
            assert a is None, f"{module} trained but {original} is missing from the kohya file"
            continue
        got = deltas[original][row:row + (rows or deltas[original].shape[0])]
        want = scale * (b @ a) if a is not None else torch.zeros_like(got)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        checked += a is not None
    assert checked == len(trained)


# ------------------------------------------------------------------ joint-attention layouts (FLUX.1, FLUX.2, SD3)


def fused_qkv_targets(block: str, img_qkv: str, txt_qkv: str, h: int) -> dict[str, tuple[str, int, int]]:
    """diffusers' separate q, k and v of a joint-attention block's two streams -> the `h`-row thirds of each
    stream's fused original qkv weight (BFL's double blocks, SD3's joint blocks)."""
    table = {}
    for j, (img, txt) in enumerate([("to_q", "add_q_proj"), ("to_k", "add_k_proj"), ("to_v", "add_v_proj")]):
        table[block + "attn." + img] = (img_qkv, j * h, h)
        table[block + "attn." + txt] = (txt_qkv, j * h, h)
    return table


def bfl_block_names(i: int) -> set[str]:
    """kohya names of the modules a real FLUX LoRA has in double and single block `i` (less modulation)."""
    double = ("img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2", "txt_attn_qkv", "txt_attn_proj",
              "txt_mlp_0", "txt_mlp_2")
    return ({f"lora_unet_double_blocks_{i}_{m}" for m in double}
            | {f"lora_unet_single_blocks_{i}_linear1", f"lora_unet_single_blocks_{i}_linear2"})


def bfl_double_block_targets(n: int, h: int, mlp_in: str, mlp_out: str) -> dict[str, tuple[str, int, int | None]]:
    """diffusers Linear -> (BFL weight, first row, rows) for `n` double blocks of width `h`, whose MLPs
    name their layers `mlp_in` and `mlp_out` in diffusers: q, k and v fuse into each stream's qkv."""
    table = {}
    for i in range(n):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        table.update(fused_qkv_targets(d, b + "img_attn.qkv", b + "txt_attn.qkv", h))
        for ours, bfl in [("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
                          (f"ff.{mlp_in}", "img_mlp.0"), (f"ff.{mlp_out}", "img_mlp.2"),
                          (f"ff_context.{mlp_in}", "txt_mlp.0"), (f"ff_context.{mlp_out}", "txt_mlp.2")]:
            table[d + ours] = (b + bfl, 0, None)
    return table


def patience_rule(rows, patience: int, min_delta: float, higher: bool = False):
    """The step at which `patience` validations in a row have not improved on the reference by more than
    min_delta in the better direction (the reference moving to each value that did), or None: early
    stopping's rule written out plainly, to check the trainer's against."""
    sign, reference, since = (1 if higher else -1), None, 0
    for step, value in rows:
        if reference is None or sign * (value - reference) > min_delta:
            reference, since = value, 0
        else:
            since += 1
            if since >= patience:
                return step
    return None


def png_chunks(data: bytes):
    """(offset, type, body) of each chunk of a PNG file's bytes."""
    pos = 8
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        yield pos, data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        pos += 12 + n
