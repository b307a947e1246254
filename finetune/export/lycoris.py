"""LoHa, LoKr, DoRA and LoCon adapters in the kohya layout with LyCORIS's keys: what ComfyUI, AUTOMATIC1111
and Forge load (`lora_unet_<module>` / `lora_te_<module>` plus the suffixes below).

diffusers has no exporter for these (its `convert_state_dict_to_kohya` renames `lora_A`/`lora_B` only), so
the renaming is here. Per module, what ComfyUI's loader reads (comfy/lora.py `load_lora`, and
comfy/weight_adapter/{lora,loha,lokr,base}.py), each with `<name>.alpha`:

- LoRA / LoCon: `lora_down.weight`, `lora_up.weight` (a conv's down is the kernel, its up 1x1); delta =
  alpha / rank * up @ down, rank = lora_down's rows.
- DoRA: the LoRA keys and `dora_scale`, the magnitude, shaped [out, 1] ([out, 1, 1, 1] for a conv): 2-D,
  because ComfyUI divides it by a [out, 1] norm and a 1-D one would broadcast to [out, out] (ComfyUI #12938).
- LoHa: `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`; delta = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha /
  rank, rank = hada_w1_b's rows. peft's LoHa has LyCORIS's names, shapes and scale: only the module renames.
- LoKr: `lokr_w1` or `lokr_w1_a`+`lokr_w1_b`, `lokr_w2` or `lokr_w2_a`+`lokr_w2_b`; delta = kron(w1, w2)
  times alpha / rank where a factor is a low-rank pair (rank = that pair's inner size), times 1 where both
  are full matrices. peft scales by alpha / r in both cases, so for full/full modules the scale is folded
  into lokr_w1 and no alpha is written (what diffusers' own LoKr reader, `_bake_lokr_alpha_`, assumes too).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

_LORA = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight", "lora_magnitude_vector": "dora_scale"}
_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
SUFFIXES = (*_LORA.values(), *_LOHA, *_LOKR, "alpha")


PER_MODULE = "per-module"  # the alpha argument of peft_to_kohya when the state carries `<module>.alpha` keys


def _split(key: str) -> tuple[str, str]:
    """(module path, parameter name) of a peft state-dict key (or of an `alpha` added by with_alphas)."""
    for suffix in (*_LORA, *_LOHA, *_LOKR, "alpha"):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    raise ValueError(f"{key}: not a LoRA, DoRA, LoHa or LoKr parameter peft writes (a bias or an adapter name "
                     "left in the key?)")


def _modules(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, param = _split(key)
        modules.setdefault(module, {})[param] = value
    return modules


def with_alphas(state: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """The peft state with each module's alpha as a `<module>.alpha` key, judged by the config's rank/alpha
    patterns on diffusers' module names, so it travels through any renaming (SDXL's original layout). LoKr
    modules whose factors are both full get their alpha / rank folded into lokr_w1 and no alpha."""
    from ..methods.adapters import module_rank_alpha

    out: dict[str, torch.Tensor] = {}
    for module, params in _modules(state).items():
        rank, alpha = module_rank_alpha(config, module.removeprefix("base_model.model."))
        params = dict(params)
        if "lokr_w1" in params and "lokr_w2" in params:
            params["lokr_w1"] = params["lokr_w1"] * (alpha / rank)  # both factors full: readers apply no alpha
        else:
            params["alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
        out.update({f"{module}.{k}": v for k, v in params.items()})
    return out


def variant_to_kohya(state: Mapping[str, torch.Tensor], prefix: str, known=None) -> dict[str, torch.Tensor]:
    """A `with_alphas` state of one component (module paths already in the layout the apps name) ->
    `<prefix>_<module path with _>.<suffix>` keys. `known(module)`: whether ComfyUI maps that module's name;
    a module it does not is refused, not written for it to skip."""
    out: dict[str, torch.Tensor] = {}
    for module, params in sorted(_modules(state).items()):
        if known is not None and not known(module):
            raise ValueError(f"{module}: ComfyUI maps no `{prefix}_` name to it, so a LoHa, LoKr or DoRA there would "
                             "not load; leave it out of method.target_modules")
        name = prefix + "_" + module.replace(".", "_")
        for param, value in _lycoris_keys(params).items():
            out[f"{name}.{param}"] = value
    return out


def _lycoris_keys(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if "lora_A.weight" not in params:
        return params  # LoHa and LoKr: peft's names are LyCORIS's
    out = {_LORA.get(k, k): v for k, v in params.items()}
    if "dora_scale" in out:
        ndim = params["lora_A.weight"].ndim
        out["dora_scale"] = out["dora_scale"].reshape(-1, *[1] * (ndim - 1))
    return out
