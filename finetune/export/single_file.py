"""Full models as one .safetensors file in the original Stable Diffusion (LDM) layout.

This is the file AUTOMATIC1111/Forge and ComfyUI load as a "checkpoint", and that diffusers reads
back with `StableDiffusionPipeline.from_single_file`. diffusers only converts original -> diffusers;
this module goes the other way.

Layout written (prefixes of the original `LatentDiffusion` model):

- UNet -> `model.diffusion_model.`: `time_embed.{0,2}`, `input_blocks.N.{0,1}` (resnet, transformer;
  `input_blocks.0.0` is conv_in, a downsampler is `input_blocks.N.0.op`), `middle_block.{0,1,2}`,
  `output_blocks.N.{0,1,2}` (resnet, transformer, upsampler `.conv`), `out.{0,2}`. Resnets are
  renamed (`norm1` -> `in_layers.0`, `conv1` -> `in_layers.2`, `time_emb_proj` -> `emb_layers.1`,
  `norm2` -> `out_layers.0`, `conv2` -> `out_layers.3`, `conv_shortcut` -> `skip_connection`);
  transformer internals keep their names. The block numbering is derived from the model itself
  (levels, resnets per level, which levels have attention / down- / upsamplers), so any
  SD1.x/SD2.x-shaped UNet maps, the tiny test model included.
- VAE -> `first_stage_model.`: `encoder.down.I.block.J`, `encoder.down.I.downsample.conv`,
  `encoder.mid.{block_1,attn_1,block_2}`, `encoder.norm_out`; the decoder's `up` levels are numbered
  in reverse of diffusers' `up_blocks`; `conv_shortcut` -> `nin_shortcut`; the mid attention is a
  1x1-conv block (`norm`, `q`, `k`, `v`, `proj_out`, weights [C, C, 1, 1]) where diffusers has
  Linear layers (`group_norm`, `to_q`, `to_k`, `to_v`, `to_out.0`).
- Text encoder:
  * SD1.x (OpenAI CLIP, `hidden_act="quick_gelu"`): `cond_stage_model.transformer.text_model.`
    + the transformers names (`embeddings.token_embedding.weight`, `encoder.layers.0.self_attn.q_proj
    .weight`, ...), plus the `embeddings.position_ids` buffer real SD1.x checkpoints carry.
    transformers >= 5.6 `CLIPTextModel` has no `text_model.` level in its own state dict; it is added.
  * SD2.x (OpenCLIP ViT-H, `hidden_act="gelu"`): `cond_stage_model.model.` with OpenCLIP names
    (`token_embedding.weight`, `positional_embedding`, `transformer.resblocks.I.{ln_1, attn.in_proj_weight
    (q, k, v concatenated), attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`, `ln_final`). diffusers' SD2
    text encoder holds only the 23 layers SD2 uses (it reads the penultimate layer); the unused 24th
    layer and `text_projection` are not in the diffusers model and are not written (webui and
    ComfyUI load checkpoints non-strictly and never run them). The file carries no prediction-type
    marker: whether an SD2 v-prediction model is run as one is up to the loader's own detection
    (or the user's choice of config there); say so in the model card.

SDXL (`sdxl_single_file_state_dict`): the same UNet and VAE mapping (plus `label_emb.0`, the
added size/pooled-text embedding) and the `conditioner.embedders` text encoders: `0.transformer.
text_model.*` (CLIP ViT-L, transformers names) and `1.model.*` (OpenCLIP bigG layout as above,
with `text_projection` stored [hidden, proj] as OpenCLIP does).

Not covered (refused with a clear error): SD3/FLUX, inpainting/upscaler extras such as class
embeddings; any parameter the mapping does not place makes the export fail rather than silently
drop weights.

A model carrying peft adapter layers is refused: merge them first (peft's `merge_and_unload`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..files import atomic_save_safetensors

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


# Names peft gives what it wraps (LoRA layers, modules_to_save): none is in an original checkpoint.
_PEFT_MARKERS = (".base_layer.", ".lora_", ".original_module.", ".modules_to_save.")


class SingleFileExportError(ValueError):
    """The model cannot be written in the original single-file layout."""


# --------------------------------------------------------------------------------------------
# plain state dicts


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # torch.compile wraps the module; its parameters live under `_orig_mod.`.
    return getattr(model, "_orig_mod", model)


def plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()`, refusing peft adapter layers: the original layout keeps transformer
    blocks' inner names, so their `base_layer`/`lora_A` keys would otherwise pass into the file."""
    state = {key: value.detach() for key, value in _unwrap(model).state_dict().items()}
    adapted = [key for key in state if any(marker in key for marker in _PEFT_MARKERS)]
    if adapted:
        raise SingleFileExportError(
            f"{adapted[0]}: the model carries peft adapter layers; merge them (peft's merge_and_unload()) "
            "before exporting a single file")
    return state


# --------------------------------------------------------------------------------------------
# module-prefix mapping


def _rename(state: Mapping[str, torch.Tensor], modules: Mapping[str, tuple[str, Mapping[str, str] | None]],
            component: str) -> dict[str, tuple[str, str | None]]:
    """Map each key to (new key, inner-rename kind) by its longest module prefix in `modules`.

    `modules` maps a diffusers module path to (original module path, inner renames or None). Keys
    are matched on whole dotted components; a key no entry covers raises.
    """
    out: dict[str, tuple[str, str | None]] = {}
    unmapped = []
    for key in state:
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:n])
            if prefix in modules:
                target, inner = modules[prefix]
                rest = ".".join(parts[n:])
                if inner is not None:
                    for src, dst in inner.items():
                        if rest.startswith(src + "."):
                            rest = dst + rest[len(src):]
                            break
                    else:
                        unmapped.append(key)
                        break
                out[key] = f"{target}.{rest}" if target else rest
                break
        else:
            unmapped.append(key)
    if unmapped:
        shown = ", ".join(unmapped[:8]) + (f" (+{len(unmapped) - 8} more)" if len(unmapped) > 8 else "")
        raise SingleFileExportError(
            f"{component}: {len(unmapped)} parameter(s) have no place in the original SD layout: {shown}")
    return out


def _unet_modules(unet) -> dict[str, tuple[str, Mapping[str, str] | None]]:
    config = unet.config
    if getattr(config, "addition_embed_type", None) is not None:
        raise SingleFileExportError(
            f"UNet has addition_embed_type={config.addition_embed_type!r} (SDXL-style); only SD1.x/SD2.x "
            "UNets can be written as an original SD single file")
    if getattr(config, "class_embed_type", None) is not None or getattr(config, "num_class_embeds", None):
        raise SingleFileExportError("UNet has class embeddings; only SD1.x/SD2.x UNets are supported")
    return unet_module_map(unet)


def rename_modules(state: Mapping[str, torch.Tensor], modules, component: str) -> dict[str, torch.Tensor]:
    """`state` with each key's module path replaced by its original-layout one (see `unet_module_map`)."""
    names = _rename(state, modules, component)
    return {names[k]: v for k, v in state.items()}


def unet_module_map(unet) -> dict[str, tuple[str, Mapping[str, str] | None]]:
    """diffusers UNet module path -> (original LDM/SGM module path, inner renames), derived from the
    model's own blocks; SDXL's added time/text embedding included (`label_emb.0`)."""
    ident: Mapping[str, str] | None = None
    m: dict[str, tuple[str, Mapping[str, str] | None]] = {
        "add_embedding.linear_1": ("label_emb.0.0", ident),
        "add_embedding.linear_2": ("label_emb.0.2", ident),
        "conv_in": ("input_blocks.0.0", ident),
        "time_embedding.linear_1": ("time_embed.0", ident),
        "time_embedding.linear_2": ("time_embed.2", ident),
        "conv_norm_out": ("out.0", ident),
        "conv_out": ("out.2", ident),
    }
    idx = 1
    for i, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            m[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{idx}.0", _UNET_RESNET)
            if attentions is not None and j < len(attentions):
                m[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{idx}.1", ident)
            idx += 1
        if getattr(block, "downsamplers", None):
            m[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{idx}.0.op", ident)
            idx += 1

    mid = unet.mid_block
    if mid is None:
        raise SingleFileExportError("UNet has no mid block; not an SD-shaped UNet")
    idx = 0
    mid_attn = getattr(mid, "attentions", None) or []
    for k in range(len(mid.resnets)):
        m[f"mid_block.resnets.{k}"] = (f"middle_block.{idx}", _UNET_RESNET)
        idx += 1
        if k < len(mid_attn):
            m[f"mid_block.attentions.{k}"] = (f"middle_block.{idx}", ident)
            idx += 1

    idx = 0
    for i, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None)
        n = len(block.resnets)
        for j in range(n):
            m[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{idx}.0", _UNET_RESNET)
            sub = 1
            if attentions is not None and j < len(attentions):
                m[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{idx}.1", ident)
                sub = 2
            if j == n - 1 and getattr(block, "upsamplers", None):
                m[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{idx}.{sub}.conv", ident)
            idx += 1
    return m


def _vae_modules(vae) -> dict[str, tuple[str, Mapping[str, str] | None]]:
    if getattr(vae, "quant_conv", None) is None or getattr(vae, "post_quant_conv", None) is None:
        raise SingleFileExportError("VAE has no quant_conv/post_quant_conv (use_quant_conv=False); "
                                    "SD1.x/SD2.x checkpoints always carry them")
    m: dict[str, tuple[str, Mapping[str, str] | None]] = {
        "quant_conv": ("quant_conv", None),
        "post_quant_conv": ("post_quant_conv", None),
    }
    for part in ("encoder", "decoder"):
        coder = getattr(vae, part)
        m[f"{part}.conv_in"] = (f"{part}.conv_in", None)
        m[f"{part}.conv_norm_out"] = (f"{part}.norm_out", None)
        m[f"{part}.conv_out"] = (f"{part}.conv_out", None)
        for k in range(len(coder.mid_block.resnets)):
            m[f"{part}.mid_block.resnets.{k}"] = (f"{part}.mid.block_{k + 1}", _VAE_RESNET)
        for k in range(len(coder.mid_block.attentions or [])):
            if k > 0:
                raise SingleFileExportError("VAE mid block has more than one attention; not an SD VAE")
            m[f"{part}.mid_block.attentions.{k}"] = (f"{part}.mid.attn_1", _VAE_ATTENTION)
    for i, block in enumerate(vae.encoder.down_blocks):
        for j in range(len(block.resnets)):
            m[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", _VAE_RESNET)
        if getattr(block, "downsamplers", None):
            m[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", None)
    levels = len(vae.decoder.up_blocks)
    for i, block in enumerate(vae.decoder.up_blocks):
        level = levels - 1 - i  # the original numbers decoder levels from the lowest resolution up
        for j in range(len(block.resnets)):
            m[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{level}.block.{j}", _VAE_RESNET)
        if getattr(block, "upsamplers", None):
            m[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{level}.upsample.conv", None)
    return m


def _text_encoder_is_open_clip(text_encoder, text_encoder_format: str) -> bool:
    if text_encoder_format == "clip":
        return False
    if text_encoder_format == "open_clip":
        return True
    if text_encoder_format != "auto":
        raise ValueError(f"text_encoder_format must be 'auto', 'clip' or 'open_clip', not {text_encoder_format!r}")
    # SD1.x's OpenAI CLIP ViT-L uses quick_gelu; SD2.x's OpenCLIP ViT-H uses gelu.
    return getattr(text_encoder.config, "hidden_act", "quick_gelu") == "gelu"


def _clip_state(text_encoder, state: Mapping[str, torch.Tensor], prefix: str = CLIP_PREFIX) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("text_projection."):
            raise SingleFileExportError(
                "text encoder has a text_projection (CLIPTextModelWithProjection, SDXL-style); "
                "SD1.x checkpoints hold a plain CLIPTextModel")
        key = key.removeprefix("text_model.")
        if not key.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
            raise SingleFileExportError(f"text encoder: unexpected parameter {key!r}")
        out[prefix + key] = value
    # Real SD1.x checkpoints carry this buffer; some loaders expect it (transformers 5 does not save it).
    pid = prefix + "embeddings.position_ids"
    if pid not in out:
        n = text_encoder.config.max_position_embeddings
        out[pid] = torch.arange(n, dtype=torch.int64).unsqueeze(0)
    return out


def _open_clip_state(state: Mapping[str, torch.Tensor], prefix: str = OPEN_CLIP_PREFIX) -> dict[str, torch.Tensor]:
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    state.pop("embeddings.position_ids", None)
    out: dict[str, torch.Tensor] = {}
    if "text_projection.weight" in state:  # SDXL's bigG: OpenCLIP keeps the projection as [hidden, proj]
        out[prefix + "text_projection"] = state.pop("text_projection.weight").T
    fixed = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    used = set()
    for src, dst in fixed.items():
        if src in state:
            out[prefix + dst] = state[src]
            used.add(src)
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for i in layers:
        src = f"encoder.layers.{i}."
        dst = f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [f"{src}self_attn.{p}_proj.{kind}" for p in "qkv"]
            if all(k in state for k in qkv):
                out[f"{dst}attn.in_proj_{kind}"] = torch.cat([state[k] for k in qkv], dim=0)
                used.update(qkv)
        for a, b in _OPEN_CLIP_LAYER.items():
            for kind in ("weight", "bias"):
                k = f"{src}{a}.{kind}"
                if k in state:
                    out[f"{dst}{b}.{kind}"] = state[k]
                    used.add(k)
    left = [k for k in state if k not in used]
    if left:
        raise SingleFileExportError(
            f"text encoder (OpenCLIP layout): parameter(s) with no place in the original layout: {left[:8]}")
    return out


def sd1_single_file_state_dict(unet, vae, text_encoder, *, text_encoder_format: str = "auto"
                               ) -> dict[str, torch.Tensor]:
    """The original (LDM) state dict of an SD1.x or SD2.x pipeline's UNet, VAE and text encoder.

    Keys are those of a real SD checkpoint (`model.diffusion_model.*`, `first_stage_model.*`,
    `cond_stage_model.transformer.text_model.*` for SD1.x, `cond_stage_model.model.*` for SD2.x).
    `text_encoder_format`: "auto" (OpenCLIP/SD2 if the text encoder uses `gelu`, else CLIP/SD1),
    "clip" or "open_clip". Tensors keep their dtype and device. Raises `SingleFileExportError` for anything that does not fit.
    """
    result = _unet_vae_state(unet, vae, _unet_modules(_unwrap(unet)))
    te_state = plain_state_dict(text_encoder)
    if _text_encoder_is_open_clip(_unwrap(text_encoder), text_encoder_format):
        result.update(_open_clip_state(te_state))
    else:
        result.update(_clip_state(_unwrap(text_encoder), te_state))
    return result


def sdxl_single_file_state_dict(unet, vae, text_encoder, text_encoder_2) -> dict[str, torch.Tensor]:
    """The original (SGM) state dict of an SDXL pipeline: `model.diffusion_model.*` (with
    `label_emb.0.*`, the size/pooled-text embedding), `first_stage_model.*`,
    `conditioner.embedders.0.transformer.text_model.*` (CLIP ViT-L) and
    `conditioner.embedders.1.model.*` (OpenCLIP bigG, `text_projection` included)."""
    result = _unet_vae_state(unet, vae, unet_module_map(_unwrap(unet)))
    result.update(_clip_state(_unwrap(text_encoder), plain_state_dict(text_encoder),
                              prefix="conditioner.embedders.0.transformer.text_model."))
    result.update(_open_clip_state(plain_state_dict(text_encoder_2), prefix="conditioner.embedders.1.model."))
    return result


def _unet_vae_state(unet, vae, unet_map) -> dict[str, torch.Tensor]:
    result: dict[str, torch.Tensor] = {}
    unet_state = plain_state_dict(unet)
    for key, new in _rename(unet_state, unet_map, "UNet").items():
        result[UNET_PREFIX + new] = unet_state[key]

    vae_state = plain_state_dict(vae)
    vae_map = _rename(vae_state, _vae_modules(_unwrap(vae)), "VAE")
    for key, new in vae_map.items():
        value = vae_state[key]
        if ".mid.attn_1." in new and value.ndim == 2:  # Linear [out, in] -> 1x1 conv [out, in, 1, 1]
            value = value.reshape(*value.shape, 1, 1)
        result[VAE_PREFIX + new] = value
    return result


# --------------------------------------------------------------------------------------------
# writing


def save_sd1_single_file(path: str | os.PathLike, unet, vae, text_encoder, dtype: torch.dtype | None = torch.float16,
                         metadata: Mapping[str, str] | None = None, *, text_encoder_format: str = "auto") -> Path:
    """Write the pipeline as one original-layout `.safetensors` checkpoint at `path`; return the path.

    Floating-point tensors are cast to `dtype` (None keeps each tensor's dtype); integer buffers
    (`position_ids`) stay int64. The file is written to a temporary file in the same folder,
    fsynced and renamed over `path`, so a crash never leaves a truncated checkpoint. `metadata`
    (str -> str) goes into the safetensors header.
    """
    state = sd1_single_file_state_dict(unet, vae, text_encoder, text_encoder_format=text_encoder_format)
    return save_single_file_state(path, state, dtype, metadata)


def save_sdxl_single_file(path: str | os.PathLike, unet, vae, text_encoder, text_encoder_2,
                          dtype: torch.dtype | None = torch.float16, metadata: Mapping[str, str] | None = None) -> Path:
    state = sdxl_single_file_state_dict(unet, vae, text_encoder, text_encoder_2)
    return save_single_file_state(path, state, dtype, metadata)


def save_single_file_state(path: str | os.PathLike, state: Mapping[str, torch.Tensor], dtype: torch.dtype | None,
                           metadata: Mapping[str, str] | None = None) -> Path:
    """Write an original-layout state dict atomically (see `save_sd1_single_file`)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise SingleFileExportError(f"{path}: the single-file checkpoint must end in .safetensors")
    meta = {"format": "pt"}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"safetensors metadata must map str to str; got {k!r}: {type(v).__name__}")
        meta[k] = v
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, value in state.items():
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        value = value.contiguous()
        ptr = value.untyped_storage().data_ptr()
        if ptr in storages:  # tied weights: safetensors refuses tensors that share storage
            value = value.clone()
        storages.add(value.untyped_storage().data_ptr())
        tensors[key] = value
    atomic_save_safetensors(path, tensors, meta)
    return path
