"""Everything about a run that can be known before a model loads, checked before it loads: the
hardware, what a quantized base needs (`memory.quantize_base`), every number finite, the VAE and
output folders, the family against the model folder, and LoRA target modules against the denoiser
built from its config on the meta device. A problem found here costs a second, not the minutes of
loading a model; each is one `key.path: ...` line."""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path

from ..errors import RecipeError, safe_name
from ..families.base import ModelSource, base_problem, meta_component, model_file, read_json, vae_problem

# What peft's LoRA can wrap (peft.tuners.lora.model dispatches on these).
_LORA_LAYERS = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Embedding", "MultiheadAttention", "Conv1D")


def preflight(recipe) -> None:
    """Raise one RecipeError listing every problem found, or return."""
    from .tracking import tracker_problems

    problems = [*_hardware_problems(recipe.training), *_quantize_problems(recipe), *_non_finite(recipe),
                *_folder_problems(recipe), *tracker_problems(recipe.output.trackers), *_model_problems(recipe)]
    if problems:
        raise RecipeError(problems)


def _hardware_problems(training) -> list[str]:
    import torch

    mp = training.mixed_precision
    if mp == "fp16" and not torch.cuda.is_available():
        return ["training.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on this machine"]
    if mp == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return ["training.mixed_precision: this GPU does not support bf16; use fp16"]
    return []


def _quantize_problems(recipe) -> list[str]:
    """`memory.quantize_base` against the method and this machine (its package, its device)."""
    from ..families.quantize import KEY, SINGLE_FILE, problem

    kind = recipe.memory.quantize_base
    if kind == "none":
        return []
    if recipe.method.type == "dreambooth":
        return [f"{KEY}: DreamBooth trains the denoiser's own weights, which cannot be quantized; use {kind} "
                "with lora, pivotal or textual_inversion, or set memory.quantize_base=none"]
    if why := problem(kind):
        return [why]
    return [SINGLE_FILE] if Path(recipe.model.base).expanduser().is_file() else []


def _non_finite(section, prefix: str = "") -> list[str]:
    # The schema refuses inf and nan; a recipe built or changed in Python skips the schema.
    from pydantic import BaseModel

    problems = []
    for name in type(section).model_fields:
        value, key = getattr(section, name), f"{prefix}{name}"
        if isinstance(value, BaseModel):
            problems += _non_finite(value, f"{key}.")
        elif any(isinstance(v, float) and not math.isfinite(v)
                 for v in (value if isinstance(value, (list, tuple)) else [value])):
            problems.append(f"{key}: {value} is not a finite number")
    return problems


def _folder_problems(recipe) -> list[str]:
    problems = []
    if recipe.model.vae and (why := vae_problem(recipe.model.vae)):
        problems.append(f"model.vae: {why}")
    if why := _not_writable(recipe.output.dir):
        problems.append(f"output.dir: {why}")
    pp = recipe.prior_preservation
    if pp.enabled and pp.class_data_dir and (why := _not_writable(pp.class_data_dir)):
        problems.append(f"prior_preservation.class_data_dir: {why}")
    return problems


def _not_writable(folder: str) -> str | None:
    """Why `folder` cannot be (created and) written in, or None. The kernel decides, through
    os.access: root passes a chmod'ed folder but not a read-only file system."""
    path = Path(folder).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    shown = safe_name(folder)
    if existing.exists() and not existing.is_dir():
        where = "" if existing == path else f", so {shown} cannot be made in it"
        return f"{safe_name(existing)} is a file{where}; expected a folder (created if missing)"
    if not os.access(existing, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        return f"{safe_name(existing)} is not writable by this account; choose a folder you can write in"
    return None


def _model_problems(recipe) -> list[str]:
    """The family against the model folder and LoRA targets against its denoiser, from the configs
    of a local folder or the hub cache (a hub model not yet downloaded is checked when it loads)."""
    from ..families.base import resolve_source

    m = recipe.model
    if why := base_problem(m.base, m.allow_pickle):
        return [f"model.base: {why}"]
    source = _configs_source(resolve_source(m.base, m.allow_pickle), m.config)
    index = read_json(model_file(source, "model_index.json", m.revision)) if source else None
    key = "model.base" if source is None or source.label == m.base else "model.config"
    if index is None:
        return _unreadable_index(source, key)
    problems = _missing_components(source, index, key, skip={"vae"} if m.vae else set())
    family, more = _family(m, index)
    problems += more
    if family is None or problems:
        return problems
    return _target_problems(recipe.method, family, source, index, m.revision)


def _unreadable_index(source: ModelSource | None, key: str) -> list[str]:
    index = model_file(source, "model_index.json") if source and source.kind == "folder" else None
    return [f"{key}: {safe_name(index)} is not a JSON object; the folder is not a usable diffusers model"] \
        if index else []


# The parts training loads (the safety checker, feature extractor and the like are never loaded).
_LOADED = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def _missing_components(source: ModelSource, index: dict, key: str, skip: set[str]) -> list[str]:
    """Parts model_index.json lists that a local folder lacks: diffusers' error for one does not
    say which."""
    if source.kind != "folder":
        return []
    missing = [name for name in _LOADED if name not in skip and isinstance(index.get(name), list)
               and None not in index[name] and not (Path(source.location) / name).is_dir()]
    return [f"{key}: {safe_name(source.label)} has no {name}/ folder, which its model_index.json lists"
            for name in missing]


def _configs_source(source: ModelSource, config: str | None) -> ModelSource | None:
    """Where the model's configs are: the model itself, or for a single file, `model.config`."""
    if source.kind != "single_file":
        return source
    if not config:
        return None
    local = Path(config).expanduser()
    return ModelSource("folder", str(local), config) if local.is_dir() else ModelSource("hub", config, config)


def _family(m, index: dict):
    """(the family that will load the model or None, problems)."""
    from ..families import FAMILIES, get_family

    pipeline = index.get("_class_name")
    owner = next((cls for _, cls in FAMILIES.items() if cls.matches(index)), None)
    if m.family == "auto":
        if owner is None:
            return None, [f"model.family: auto does not know {safe_name(m.base)}'s pipeline class {pipeline!r}; "
                          f"set model.family to one of: {', '.join(FAMILIES.names())}"]
        return owner(), []
    if owner is not None and owner.name != m.family:
        return None, [f"model.family: {m.family} does not fit {safe_name(m.base)}, a {pipeline} ({owner.name}); "
                      f"set model.family={owner.name} or auto"]
    return get_family(m.family), []


def _target_problems(method, family, source, index, revision) -> list[str]:
    problems = []
    targets = getattr(method, "target_modules", None)
    if targets:
        denoiser = meta_component(source, index, family.denoiser_component, revision)
        problems += _unmatched("method.target_modules", targets, [denoiser], family.denoiser_component,
                               family.lora_targets)
        problems += _unmapped_for_variants(method, family, targets, denoiser)
    te_targets = getattr(method, "text_encoder_target_modules", None)
    if te_targets and getattr(method, "train_text_encoder", False):
        names = [n for n in family.adaptable_text_encoders() if index.get(n)]
        encoders = [meta_component(source, index, n, revision) for n in names]
        problems += _unmatched("method.text_encoder_target_modules", te_targets, encoders, " / ".join(names),
                               family.text_encoder_lora_targets)
    return problems


def _unmapped_for_variants(method, family, targets: list[str], denoiser) -> list[str]:
    """A LoHa, LoKr or DoRA on a module the family's apps map no name to would be dropped by them: one
    line per target that reaches such a module."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from ..methods.adapters import is_plain

    if family.variant_modules is None or denoiser is None or not hasattr(method, "variant") or is_plain(method):
        return []
    wrapped = [name for name, module in denoiser.named_modules() if type(module).__name__ in _LORA_LAYERS]
    problems = []
    for target in targets:
        config = LoraConfig(target_modules=[target])
        off = [n for n in wrapped if check_target_module_exists(config, n) and not family.variant_modules.fullmatch(n)]
        if off:
            more = f" and {len(off) - 1} more" if len(off) > 1 else ""
            problems.append(f"method.target_modules: {safe_name(target)!r} reaches {off[0]}{more}, which "
                            f"{family.title}'s apps (ComfyUI) map no LoHa, LoKr or DoRA name to; leave it out")
    return problems


def _unmatched(key: str, targets: list[str], models: list, what: str, defaults) -> list[str]:
    """One line per target that names no module LoRA can wrap, as peft matches names (a whole
    module name, or its dotted suffix)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    if any(model is None for model in models):
        return []  # a config not at hand: peft says it when the model loads
    modules = [(name, type(module).__name__) for model in models for name, module in model.named_modules() if name]
    problems = []
    for target in targets:
        config = LoraConfig(target_modules=[target])
        kinds = {kind for name, kind in modules if check_target_module_exists(config, name)}
        if not kinds:
            problems.append(f"{key}: {safe_name(target)!r} names no module of the {what}"
                            f"{_suggest(target, modules, defaults)}")
        elif not kinds & set(_LORA_LAYERS):
            problems.append(f"{key}: {safe_name(target)!r} names only {', '.join(sorted(kinds))} modules, which LoRA "
                            f"cannot wrap; name Linear or Conv layers{_suggest(target, modules, defaults)}")
    return problems


def _suggest(target: str, modules: list[tuple[str, str]], defaults) -> str:
    """'; did you mean ...' from the dotted suffixes (up to three parts) of LoRA-able module names,
    else the family's defaults."""
    suffixes = {".".join(name.split(".")[-k:]) for name, kind in modules if kind in _LORA_LAYERS for k in (1, 2, 3)}
    close = difflib.get_close_matches(target, sorted(suffixes), n=3)
    if close:
        return f"; did you mean {' or '.join(repr(c) for c in close)}?"
    if isinstance(defaults, (list, tuple)):
        return f"; unset, it is {', '.join(defaults)}"
    return ""
