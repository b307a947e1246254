"""A FLUX.1 transformer as one .safetensors file in Black Forest Labs' original layout.

This is what `flux1-dev.safetensors` holds (the transformer only, keys without a prefix): the file
ComfyUI loads with "Load Diffusion Model" from `models/diffusion_models`, Forge from its model
folder (with the VAE and text encoders picked beside it), and diffusers reads with
`FluxTransformer2DModel.from_single_file(file, config=<FLUX folder or hub id>, subfolder="transformer")`.
diffusers converts only BFL -> diffusers (`single_file_utils.convert_flux_transformer_checkpoint_to_diffusers`);
this module is the inverse, from the same module map as the kohya LoRA export (`families.flux.bfl_module`):

- q, k, v of each stream (double blocks) -> one `img_attn.qkv` / `txt_attn.qkv` weight and bias, rows in
  q, k, v order; single blocks' q, k, v and MLP input -> one `linear1` (rows q, k, v, mlp);
- RMSNorm weights `attn.norm_q` / `norm_k` (`norm_added_q` / `norm_added_k` for the text stream) ->
  `...norm.query_norm.scale` / `key_norm.scale`;
- the final AdaLN projection swaps its two output halves: diffusers' AdaLayerNormContinuous emits
  (scale, shift), BFL's final layer (shift, scale);
- every other Linear keeps its weight and bias under its BFL name (`img_mod.lin`, `linear2`, `time_in.in_layer`, ...).

A parameter the map does not place fails the export rather than being dropped, and a model still
carrying peft adapter layers is refused (merge first), as for the SD single files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..families.flux import bfl_module
from .single_file import SingleFileExportError, plain_state_dict, save_single_file_state

# diffusers RMSNorm (a `weight`) -> BFL QKNorm (a `scale`), per attention stream.
_DOUBLE_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                 "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
_SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}


def _norm_key(module: str) -> str | None:
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module)
    if m and m.group(2) in _DOUBLE_NORMS:
        return f"double_blocks.{m.group(1)}.{_DOUBLE_NORMS[m.group(2)]}.scale"
    m = re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", module)
    if m and m.group(2) in _SINGLE_NORMS:
        return f"single_blocks.{m.group(1)}.{_SINGLE_NORMS[m.group(2)]}.scale"
    return None


def flux_bfl_state_dict(state: Mapping[str, torch.Tensor], inner: int) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel state dict -> the original (BFL) one. `inner` is the model
    width (attention heads x head dim)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[tuple[int, torch.Tensor]]] = {}  # BFL key -> (first row, part)
    fused_rows: dict[str, int] = {}
    for key, value in state.items():
        module, param = key.rsplit(".", 1)
        norm = _norm_key(module) if param == "weight" else None
        if norm:
            out[norm] = value
            continue
        target = bfl_module(module, inner)
        if target is None or param not in ("weight", "bias"):
            raise SingleFileExportError(f"{key}: no place for it in the original FLUX.1 layout")
        bfl, row, rows, swap = target
        if swap:
            value = torch.cat(value.chunk(2, dim=0)[::-1])
        if rows is None:
            out[f"{bfl}.{param}"] = value
        else:
            fused.setdefault(f"{bfl}.{param}", []).append((row, value))
            fused_rows[f"{bfl}.{param}"] = rows
    for key, parts in fused.items():
        parts.sort(key=lambda p: p[0])
        starts = [row for row, _ in parts]
        ends = [row + part.shape[0] for row, part in parts]
        # Every part must sit where diffusers' converter will cut it: no gap, no overlap, none missing.
        if starts != [0, *ends[:-1]] or ends[-1] != fused_rows[key]:
            raise SingleFileExportError(
                f"{key}: its parts cover rows {list(zip(starts, ends))} of {fused_rows[key]}; the fused original "
                "weight needs all of them (q, k, v and, in single blocks, an MLP of 4x the width)")
        out[key] = torch.cat([part for _, part in parts])
    return out


def save_flux_single_file(path: str | os.PathLike, transformer, dtype: torch.dtype | None = torch.bfloat16,
                          metadata: Mapping[str, str] | None = None) -> Path:
    """Write `transformer` (a FluxTransformer2DModel, no adapters) at `path` in the original layout,
    floating-point tensors in `dtype` (None: as they are), atomically (temporary file, fsync, rename)."""
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    # Each tensor to the CPU in the file's dtype before fusing: fusing on the GPU would need another
    # copy of every q/k/v and linear1 weight there (14 GB for FLUX.1's fp32 master weights) at the end
    # of a run whose optimizer still holds its memory.
    state = {key: value.to("cpu", dtype) if dtype is not None and value.is_floating_point() else value.to("cpu")
             for key, value in plain_state_dict(transformer).items()}
    return save_single_file_state(path, flux_bfl_state_dict(state, inner), dtype, metadata)
