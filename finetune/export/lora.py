"""LoRA files: the kohya/webui format (ComfyUI, AUTOMATIC1111, Forge) and diffusers' own format.

Inputs are what `peft.get_peft_model_state_dict(model)` returns for the UNet and for each text
encoder: `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`, and
`encoder.layers.0.self_attn.q_proj.lora_A.weight` (transformers 5.x, no `text_model.` level) or
`text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight` (older transformers).

Kohya names (SD1.x/2.x): `lora_unet_<diffusers module path, "." -> "_">` and
`lora_te_text_model_encoder_layers_<i>_<self_attn_q_proj|...|mlp_fc2>`, each with `.lora_down.weight`,
`.lora_up.weight` and a scalar `.alpha`; the effective scale is alpha / rank, as in peft.
diffusers' `convert_state_dict_to_kohya` does the renaming; two of its choices are wrong for us and
are corrected here: it calls the first text encoder `lora_te1` (SDXL's name; SD1.x/2.x files say
`lora_te`), and it writes alpha = rank whatever the real `lora_alpha` was (which would silently
change the LoRA's strength by alpha/rank in every loader).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_save_safetensors, write_atomically

KOHYA_NETWORK_MODULE = "networks.lora"
UNET_PREFIX = "lora_unet"
DEFAULT_TEXT_ENCODER_PREFIXES = {"text_encoder": "lora_te"}
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

_PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
_KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale", ".hada_w1_a", ".hada_w1_b",
                   ".hada_w2_a", ".hada_w2_b", ".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a",
                   ".lokr_w2_b")
# Top-level children of transformers' CLIPTextTransformer. In transformers 5.x CLIPTextModel holds
# them directly; kohya names (made on transformers 4.x) always carry the `text_model.` level.
_CLIP_TEXT_MODEL_CHILDREN = ("embeddings.", "encoder.", "final_layer_norm.")

# kohya's `ss_base_model_version` -> SAI ModelSpec architecture and default resolution.
_MODELSPEC = {
    "sd_v1": ("stable-diffusion-v1/lora", "512x512", "epsilon"),
    "sd_v2": ("stable-diffusion-v2-512/lora", "512x512", "epsilon"),
    "sd_v2_v": ("stable-diffusion-v2-768-v/lora", "768x768", "v"),
    "sdxl_base_v1-0": ("stable-diffusion-xl-v1-base/lora", "1024x1024", "epsilon"),
    "flux1": ("flux-1-dev/lora", "1024x1024", None),  # kohya writes no prediction type for FLUX
}


# --------------------------------------------------------------------------------------------
# peft -> kohya


def kohya_alpha(config) -> float:
    """The alpha to write in a kohya file for a peft `LoraConfig`, so that alpha / rank equals
    peft's scale. rsLoRA scales by alpha / sqrt(rank), so its kohya alpha is lora_alpha * sqrt(r).
    Per-module rank/alpha patterns and DoRA have no single kohya alpha: refused."""
    if getattr(config, "use_dora", False):
        raise ValueError("DoRA adapters cannot be written as a plain kohya LoRA")
    if getattr(config, "rank_pattern", None) or getattr(config, "alpha_pattern", None):
        raise ValueError("per-module rank_pattern/alpha_pattern is not supported by the kohya export")
    alpha = float(config.lora_alpha)
    if getattr(config, "use_rslora", False):
        alpha *= math.sqrt(config.r)
    return alpha


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    for p in prefixes:
        if key.startswith(p):
            return key[len(p):]
    return key


def _check_peft_keys(state: Mapping[str, torch.Tensor], component: str) -> None:
    bad = [k for k in state if not k.endswith(_PEFT_SUFFIXES)]
    if bad:
        raise ValueError(
            f"{component}: only plain LoRA weights (.lora_A/.lora_B) can be exported to kohya; "
            f"unexpected keys such as {bad[:3]} (DoRA magnitudes, LoRA biases or an adapter name "
            f"left in the keys are not supported)")
    modules = {k.rsplit(".", 2)[0] for k in state}
    for m in modules:
        a, b = state.get(f"{m}.lora_A.weight"), state.get(f"{m}.lora_B.weight")
        if a is None or b is None:
            raise ValueError(f"{component}: {m} has only one of lora_A/lora_B")
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"{component}: {m} lora_A rank {a.shape[0]} != lora_B rank {b.shape[1]}")


def _component_to_kohya(state: Mapping[str, torch.Tensor], alpha: float, prefix: str,
                        is_text_encoder: bool) -> dict[str, torch.Tensor]:
    from diffusers.utils import convert_state_dict_to_kohya

    component = prefix
    state = {_strip(k, ("base_model.model.",)): v for k, v in state.items()}
    if is_text_encoder:
        state = {_strip(k, ("text_encoder.", "text_encoder_2.")): v for k, v in state.items()}
        # transformers 5.x dropped the `text_model.` level that real kohya files keep.
        state = {("text_model." + k if k.startswith(_CLIP_TEXT_MODEL_CHILDREN) else k): v
                 for k, v in state.items()}
    else:
        state = {_strip(k, ("unet.",)): v for k, v in state.items()}
    from .lycoris import PER_MODULE, variant_to_kohya

    if alpha == PER_MODULE:  # LoHa, LoKr, DoRA or LoCon: `<module>.alpha` keys from lycoris.with_alphas
        return variant_to_kohya(state, prefix)
    _check_peft_keys(state, component)
    if not state:
        return {}

    # diffusers picks the kohya head from the component prefix: "unet." -> "lora_unet",
    # "text_encoder." -> "lora_te1" (renamed to the real prefix below).
    head_in = "text_encoder." if is_text_encoder else "unet."
    head_out = "lora_te1_" if is_text_encoder else "lora_unet_"
    converted = convert_state_dict_to_kohya({head_in + k: v for k, v in state.items()})

    out: dict[str, torch.Tensor] = {}
    for key, value in converted.items():
        if not key.startswith(head_out):
            raise ValueError(f"unexpected key from convert_state_dict_to_kohya: {key}")
        name, suffix = key.split(".", 1)
        name = prefix + "_" + name[len(head_out):]
        if suffix == "alpha":
            # diffusers writes alpha = rank; the real alpha is what sets the strength.
            value = torch.tensor(float(alpha), dtype=torch.float32)
        out[f"{name}.{suffix}"] = value
    return out


def peft_to_kohya(
    unet_state: Mapping[str, torch.Tensor] | None,
    text_encoder_states: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    unet_alpha: float | None = None,
    text_encoder_alphas: Mapping[str, float] | None = None,
    text_encoder_prefixes: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """peft LoRA state dicts -> one kohya/webui state dict.

    `unet_state`: `get_peft_model_state_dict(unet)`; `text_encoder_states`: component name
    ("text_encoder", "text_encoder_2") -> `get_peft_model_state_dict(text_encoder)`. Alphas are the
    peft `lora_alpha` values (see `kohya_alpha` for rsLoRA). `text_encoder_prefixes` maps component
    names to kohya prefixes: `{"text_encoder": "lora_te"}` for SD1.x/2.x (default),
    `{"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}` for SDXL. Tensors keep their shapes
    (1x1 conv LoRA stays 4-D) and dtypes; `save_kohya_lora` casts.
    """
    text_encoder_states = text_encoder_states or {}
    text_encoder_alphas = text_encoder_alphas or {}
    prefixes = dict(DEFAULT_TEXT_ENCODER_PREFIXES if text_encoder_prefixes is None else text_encoder_prefixes)

    out: dict[str, torch.Tensor] = {}
    if unet_state:
        if unet_alpha is None:
            raise ValueError("unet_alpha is required (the peft lora_alpha of the UNet adapter)")
        out.update(_component_to_kohya(unet_state, unet_alpha, UNET_PREFIX, is_text_encoder=False))
    for name, state in text_encoder_states.items():
        if not state:
            continue
        if name not in prefixes:
            raise ValueError(f"no kohya prefix for text encoder {name!r}; known: {sorted(prefixes)}")
        if name not in text_encoder_alphas:
            raise ValueError(f"text_encoder_alphas has no alpha for {name!r}")
        part = _component_to_kohya(state, text_encoder_alphas[name], prefixes[name], is_text_encoder=True)
        clash = out.keys() & part.keys()
        if clash:
            raise ValueError(f"duplicate kohya keys, e.g. {sorted(clash)[:3]}")
        out.update(part)
    if not out:
        raise ValueError("nothing to export: all LoRA state dicts are empty")
    return out


def kohya_module_names(state: Mapping[str, Any]) -> list[str]:
    """The module base names of a kohya state dict (`lora_unet_..._to_q`), sorted."""
    return sorted({k.split(".", 1)[0] for k in state})


def peft_lora_pairs(state: Mapping[str, torch.Tensor], component: str = "LoRA") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name -> (lora_A, lora_B) of a peft LoRA state dict (`base_model.model.` stripped),
    refusing what a kohya file cannot hold (DoRA magnitudes, LoRA biases, half pairs)."""
    state = {_strip(k, ("base_model.model.",)): v for k, v in state.items()}
    _check_peft_keys(state, component)
    return {m: (state[f"{m}.lora_A.weight"], state[f"{m}.lora_B.weight"])
            for m in sorted({k.rsplit(".", 2)[0] for k in state})}


def fuse_lora(parts: list[tuple[torch.Tensor, torch.Tensor, int]], out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA on a fused weight (BFL's qkv, FLUX's single-block linear1) from LoRAs on row blocks of it.

    `parts`: (lora_A [r_i, in], lora_B [rows_i, r_i], first row of that block in the fused weight).
    Returns (lora_down [sum r_i, in], lora_up [out_features, sum r_i]): the A's stacked and the B's
    placed block-diagonally, so up @ down holds B_i @ A_i in block i's rows and zeros elsewhere (a
    block no LoRA covers stays unchanged). The parts must share one scale s = alpha / r; loaders
    scale by alpha / rank with rank = rows of lora_down, so the fused file's alpha is s * sum r_i."""
    if not parts:
        raise ValueError("fuse_lora: no parts")
    down = torch.cat([a for a, _, _ in parts], dim=0)
    up = torch.zeros(out_features, down.shape[0], dtype=parts[0][1].dtype, device=parts[0][1].device)
    col = 0
    for a, b, row in parts:
        if b.shape[1] != a.shape[0] or row < 0 or row + b.shape[0] > out_features:
            raise ValueError(f"fuse_lora: a block of {b.shape[0]} rows at row {row} does not fit {out_features} rows "
                             f"(or its lora_A/lora_B ranks differ)")
        up[row:row + b.shape[0], col:col + a.shape[0]] = b
        col += a.shape[0]
    return down, up


def fused_kohya(state, alpha: float, locate, layout: str, fold_alpha=None) -> dict[str, torch.Tensor]:
    """A peft LoRA of a transformer -> kohya keys on its original checkpoint's modules
    (`lora_unet_<module with "." -> "_">`), the layout ComfyUI (and kohya, musubi-tuner) use for the
    transformer families.

    `locate(name, lora_A, lora_B)` places each diffusers Linear: (original module, first row, rows of
    the fused original weight or None when not fused, whether its two output halves swap), or None for
    a module `layout` (e.g. "FLUX.1") has no counterpart for. LoRAs on parts of one fused weight (q, k,
    v; FLUX.1's MLP input) become one LoRA on it (`fuse_lora`); its rank is the parts' summed ranks, so
    its alpha is alpha x parts and every part keeps peft's alpha / r. `fold_alpha(module)`: modules whose
    reader ignores alpha get the scale folded into lora_up (alpha written = rank)."""
    import re

    pairs = peft_lora_pairs({re.sub(r"^transformer\.", "", k): v for k, v in state.items()}, "transformer LoRA")
    groups: dict[str, list] = {}
    rows: dict[str, int] = {}
    for module, (a, b) in pairs.items():
        target = locate(module, a, b)
        if target is None:
            raise ValueError(f"transformer LoRA: {module} has no counterpart in the original {layout} layout that "
                             "ComfyUI loads; leave it out of method.target_modules")
        original, row, fused_rows, swap = target
        if swap:  # diffusers' AdaLayerNormContinuous emits (scale, shift); the originals (shift, scale)
            b = torch.cat(b.chunk(2, dim=0)[::-1])
        groups.setdefault(original, []).append((a, b, row))
        rows[original] = fused_rows or b.shape[0]
    out: dict[str, torch.Tensor] = {}
    for original, parts in sorted(groups.items()):
        parts.sort(key=lambda p: p[2])
        rank = parts[0][0].shape[0]
        if any(a.shape[0] != rank for a, _, _ in parts):
            raise ValueError(f"transformer LoRA: the parts of {original} have different ranks; one kohya alpha "
                             "cannot hold them")
        down, up = fuse_lora(parts, rows[original])
        written = float(alpha) * len(parts)
        if fold_alpha and fold_alpha(original):
            up, written = up * (float(alpha) / rank), float(rank)
        name = "lora_unet_" + original.replace(".", "_")
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(written, dtype=torch.float32)
    return out


# --------------------------------------------------------------------------------------------
# metadata


def _num(x: float) -> str:
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)


def _modelspec(base_model_version: str, output_name: str | None, given=None) -> dict[str, str]:
    """The SAI ModelSpec keys webui and ComfyUI show (`given`, or by kohya's version name); none for a
    family ModelSpec has no name for."""
    arch, resolution, prediction = given or _MODELSPEC.get(base_model_version, (None, None, None))
    if arch is None:
        return {}
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch,
        "modelspec.implementation": "diffusers",
        "modelspec.title": output_name or "LoRA",
        "modelspec.resolution": resolution,
        "modelspec.date": datetime.fromtimestamp(int(time.time()), tz=timezone.utc).isoformat(),
    }
    if prediction:
        meta["modelspec.prediction_type"] = prediction
    return meta


def kohya_metadata(
    *,
    rank: int,
    alpha: float,
    base_model_version: str = "sd_v1",
    output_name: str | None = None,
    trains_text_encoder: bool | None = None,
    base_model_name: str | None = None,
    training: Mapping[str, Any] | None = None,
    modelspec: tuple[str, str, str | None] | None = None,
) -> dict[str, str]:
    """The string metadata kohya's sd-scripts puts in a LoRA .safetensors, limited to what we know.

    Always: `ss_network_module` ("networks.lora"), `ss_network_dim`, `ss_network_alpha`, `ss_v2`,
    `ss_base_model_version` ("sd_v1", "sd_v2", "sd_v2_v", "sdxl_base_v1-0"), the SAI ModelSpec
    `modelspec.*` keys (architecture, implementation, title, resolution, date, prediction type).
    When given: `ss_output_name`, `ss_sd_model_name` (the base model's file or folder name, as
    kohya writes it), and `training` entries such as {"learning_rate": 1e-4, "seed": 0} written as
    `ss_<key>` (kohya's names: learning_rate, unet_lr, text_encoder_lr, max_train_steps, num_epochs,
    seed, mixed_precision, lr_scheduler, ...; dicts and lists are JSON-encoded); `modelspec`
    (architecture, resolution, prediction type) for a family the version table does not name. Nothing is written
    as "None". The file hash (`sshs_model_hash`) is added by `save_kohya_lora`, which sees the tensors.
    """
    meta: dict[str, str] = {
        "ss_network_module": KOHYA_NETWORK_MODULE,
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": _num(alpha),
        "ss_base_model_version": base_model_version,
        "ss_v2": str(base_model_version.startswith("sd_v2")),
    }
    if output_name:
        meta["ss_output_name"] = output_name
    if base_model_name:
        meta["ss_sd_model_name"] = base_model_name
    for key, value in (training or {}).items():
        if value is None:
            continue
        key = key if key.startswith("ss_") else f"ss_{key}"
        meta[key] = json.dumps(value) if isinstance(value, (dict, list, tuple)) else str(value)
    meta.update(_modelspec(base_model_version, output_name, modelspec))
    if trains_text_encoder is not None:
        meta["finetune.trains_text_encoder"] = str(bool(trains_text_encoder))
    try:
        from .. import __version__

        meta["finetune.version"] = __version__
    except ImportError:  # pragma: no cover
        pass
    return meta


# --------------------------------------------------------------------------------------------
# writing


def _to_save_dtype(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None,
                   keep_float32: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        t = value.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(torch.float32 if key.endswith(keep_float32) else dtype)
        out[key] = t.contiguous().clone()
    return out


def _tensor_data_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the tensor-data section of the safetensors serialization (what kohya and the
    webui additional-networks extension call the model hash). The data section does not depend on
    the header, so metadata can carry the hash of the file it is written into."""
    from safetensors.torch import save

    blob = save(dict(state))
    n = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + n:]).hexdigest()


def save_kohya_lora(path: str | os.PathLike, state: Mapping[str, torch.Tensor],
                    metadata: Mapping[str, Any] | None = None, dtype: torch.dtype | None = torch.float16,
                    add_hash: bool = True) -> Path:
    """Write a kohya state dict (from `peft_to_kohya`) as .safetensors, atomically (temp file in
    the same folder, then `os.replace`). LoRA weights are cast to `dtype`; `.alpha` scalars stay
    float32 so a non-integer alpha is not rounded. Adds `sshs_model_hash` unless `add_hash=False`."""
    bad = [k for k in state if not k.endswith(_KOHYA_SUFFIXES)]
    if bad:
        raise ValueError(f"not kohya LoRA keys: {bad[:3]}")
    tensors = _to_save_dtype(state, dtype, keep_float32=(".alpha",))
    meta = {str(k): str(v) for k, v in (metadata or {}).items() if v is not None}
    if add_hash:
        meta["sshs_model_hash"] = _tensor_data_sha256(tensors)
    return atomic_save_safetensors(Path(path), tensors, meta)


def _adapter_metadata(config) -> dict | None:
    if config is None:
        return None
    meta = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    base = meta.get("base_model_name_or_path")
    if base and os.path.isabs(str(base)):
        meta["base_model_name_or_path"] = None  # a local folder of this machine: not for a shared file
    return meta


def save_diffusers_lora(
    folder: str | os.PathLike,
    pipeline_cls,
    unet_state: Mapping[str, torch.Tensor] | None,
    text_encoder_states: Mapping[str, Mapping[str, torch.Tensor]] | None,
    unet_config,
    text_encoder_configs: Mapping[str, Any] | None,
    dtype: torch.dtype | None = torch.float16,
    weight_name: str = DIFFUSERS_WEIGHT_NAME,
    denoiser_component: str = "unet",
) -> Path:
    """Write the diffusers LoRA file with `pipeline_cls.save_lora_weights`, each peft `LoraConfig`
    stored as adapter metadata so that `pipe.load_lora_weights(folder)` restores lora_alpha (and
    any rank/alpha patterns, rsLoRA) instead of assuming alpha = rank. Tensors are cast to `dtype`.

    Keys stay in peft form (`unet.<module>.lora_A.weight`), which `load_lora_weights` reads
    directly. `convert_state_dict_to_diffusers` is deliberately not applied: on peft input it
    renames only some modules (attention to `.lora.down`, CLIP q/k/v/out to `.lora_linear_layer`,
    proj/ff/fc left as `lora_A`), giving a mixed file for no loader's benefit."""
    folder = Path(folder)
    text_encoder_states = text_encoder_states or {}
    text_encoder_configs = text_encoder_configs or {}
    params = inspect.signature(pipeline_cls.save_lora_weights).parameters
    kwargs: dict[str, Any] = {}

    def add(component: str, state, config):
        if not state:
            return
        layers_arg, meta_arg = f"{component}_lora_layers", f"{component}_lora_adapter_metadata"
        if layers_arg not in params or meta_arg not in params:
            raise ValueError(f"{pipeline_cls.__name__}.save_lora_weights has no {layers_arg}/{meta_arg}")
        if config is None:
            raise ValueError(f"no LoraConfig given for {component}")
        state = {_strip(k, ("base_model.model.",)): v for k, v in state.items()}
        kwargs[layers_arg] = _to_save_dtype(state, dtype)
        kwargs[meta_arg] = _adapter_metadata(config)

    add(denoiser_component, unet_state, unet_config)
    for name, state in text_encoder_states.items():
        add(name, state, text_encoder_configs.get(name))
    if not kwargs:
        raise ValueError("nothing to export: all LoRA state dicts are empty")

    def write(tmp: Path) -> None:
        # diffusers writes `folder/weight_name`; named after the temporary file, it writes that.
        pipeline_cls.save_lora_weights(tmp.parent, weight_name=tmp.name, safe_serialization=True, **kwargs)
        if not tmp.stat().st_size:
            raise RuntimeError(f"{pipeline_cls.__name__}.save_lora_weights did not write {weight_name}")

    return write_atomically(folder / weight_name, write, durable=True)


__all__ = [
    "DIFFUSERS_WEIGHT_NAME",
    "KOHYA_NETWORK_MODULE",
    "fuse_lora",
    "kohya_alpha",
    "kohya_metadata",
    "kohya_module_names",
    "peft_lora_pairs",
    "peft_to_kohya",
    "save_diffusers_lora",
    "save_kohya_lora",
]
