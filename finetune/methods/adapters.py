"""The adapter a LoRA-style method injects: plain LoRA, DoRA, LoHa or LoKr, on the attention and projection
layers and, with `conv_rank`, on the convolutions too (LoCon), all through peft.

peft, not LyCORIS, trains them: it is already how every method here adds, saves, checkpoints and resumes
adapters, diffusers loads its LoRA, DoRA and LoKr files, and its LoHa/LoKr parameters carry LyCORIS's own
names (`hada_w1_a`, `lokr_w1`, ...; peft ported them from LyCORIS), so the ComfyUI/webui file is the same
module renaming as for a LoRA (finetune/export/lycoris.py).
"""

from __future__ import annotations

VARIANTS = ("lora", "loha", "lokr")


def features(cfg) -> list[tuple[str, str]]:
    """(feature, recipe key) of what `cfg` asks beyond a plain LoRA: loha, lokr, dora, locon."""
    out = []
    if cfg.variant != "lora":
        out.append((cfg.variant, "method.variant"))
    if cfg.dora:
        out.append(("dora", "method.dora"))
    if cfg.conv_rank:
        out.append(("locon", "method.conv_rank"))
    return out


def is_plain(cfg) -> bool:
    """A plain LoRA on linear (and 1x1) layers: the file layout kohya's own LoRA writes."""
    return not features(cfg)


def adapter_config(cfg, rank: int, alpha: float | None, targets: list[str], conv_targets: list[str] = (),
                   init: str = "default"):
    """The peft config of `cfg.variant` over `targets` (+ `conv_targets` at conv_rank/conv_alpha)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    targets = list(targets) if isinstance(targets, (list, tuple)) else targets
    patterns = {}
    if conv_targets and cfg.conv_rank:
        targets = [*targets, *conv_targets] if isinstance(targets, list) else targets
        conv_alpha = cfg.conv_alpha or cfg.conv_rank
        patterns = {"rank_pattern": {t: cfg.conv_rank for t in conv_targets},
                    "alpha_pattern": {t: conv_alpha for t in conv_targets}}
    alpha = alpha or rank
    if cfg.variant == "loha":
        return LoHaConfig(r=rank, alpha=alpha, target_modules=targets, **patterns)
    if cfg.variant == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, target_modules=targets, decompose_both=cfg.decompose_both,
                          decompose_factor=cfg.lokr_factor, **patterns)
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=cfg.dropout, target_modules=targets,
                      use_dora=cfg.dora, init_lora_weights="gaussian" if init == "gaussian" else True, **patterns)


def module_rank_alpha(config, module: str) -> tuple[int, float]:
    """(rank, alpha) of one adapted module, after the config's rank/alpha patterns (peft's own matching)."""
    from peft.utils.other import get_pattern_key

    rank, alpha = config.r, getattr(config, "lora_alpha", None) or getattr(config, "alpha", None) or config.r
    ranks, alphas = getattr(config, "rank_pattern", None) or {}, getattr(config, "alpha_pattern", None) or {}
    key = get_pattern_key(ranks.keys(), module)
    rank = ranks.get(key, rank)
    key = get_pattern_key(alphas.keys(), module)
    return rank, float(alphas.get(key, alpha))


def kohya_network(cfg) -> dict:
    """`ss_network_module` / `ss_network_args` as LyCORIS writes them (civitai and webui show them)."""
    if is_plain(cfg):
        return {}
    args = {"algo": "locon" if cfg.variant == "lora" and cfg.conv_rank else cfg.variant}
    if cfg.conv_rank:
        args.update(conv_dim=str(cfg.conv_rank), conv_alpha=str(cfg.conv_alpha or cfg.conv_rank))
    if cfg.variant == "lokr":
        args.update(factor=str(cfg.lokr_factor), decompose_both=str(cfg.decompose_both))
    if cfg.dora:
        args["dora_wd"] = "True"
    return {"network_module": "lycoris.kohya", "network_args": args}


def title(cfg) -> str:
    """What the adapter is, in a few words (model cards, logs)."""
    name = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}[cfg.variant]
    if cfg.dora:
        name = "DoRA"
    return name + (" with conv layers (LoCon)" if cfg.conv_rank else "")
