"""Where `plan` finds the shapes of a recipe's base model, without its weights.

In order: the configs shipped with finetune for the public bases the recipes name (so `plan` works
offline, and before a multi-GB download); a local diffusers folder; the hub cache; and online, only
the config files of any other hub id. A single `.safetensors` file is described by `model.config`
(or, without it, by the family's public base: the shapes of SD1.5, SDXL or FLUX.1 [dev]).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import FinetuneError
from ..families.base import PICKLE_SUFFIXES, ModelSource, model_file, read_json

CONFIGS = Path(__file__).parent / "configs"
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "vae")
# The built-in random-weight models are the public bases' shapes (finetune/tiny_models).
BUILTIN_SHAPES = {"sd15-full-random": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                  "sdxl-full-random": "stabilityai/stable-diffusion-xl-base-1.0",
                  "flux-full-random": "black-forest-labs/FLUX.1-dev"}
# A single file without model.config: the family's public base describes it.
FAMILY_DEFAULTS = {"sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                   "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
                   "flux": "black-forest-labs/FLUX.1-dev"}


@dataclass
class ModelSpec:
    family: object  # a finetune.families.Family
    source: ModelSource  # where model_index.json and <component>/config.json are read
    index: dict
    label: str  # the base, and where its configs came from
    revision: str | None = None


def shipped(hub_id: str) -> Path | None:
    """The folder of configs shipped for `hub_id`, if finetune ships it."""
    folder = CONFIGS / hub_id.replace("/", "__")
    return folder if "/" in hub_id and (folder / "model_index.json").is_file() else None


def resolve_model(model_cfg) -> ModelSpec:
    """The family, configs and description of a recipe's `model` section's base model."""
    source, label = _configs_for(model_cfg.base, model_cfg)
    revision = model_cfg.revision if source.kind == "hub" else None
    index = read_json(model_file(source, "model_index.json", revision))
    if index is None:
        raise FinetuneError(f"model.base: no model_index.json for {model_cfg.base} ({label})")
    from ..families import detect_family, get_family

    family = get_family(model_cfg.family) if model_cfg.family != "auto" else detect_family(index)
    return ModelSpec(family=family, source=source, index=index, label=label, revision=revision)


def _configs_for(base: str, model_cfg) -> tuple[ModelSource, str]:
    from ..tiny_models import BUILTIN_PREFIX, resolve_builtin

    if base.startswith(BUILTIN_PREFIX):
        name = base[len(BUILTIN_PREFIX):]
        if name in BUILTIN_SHAPES:
            return _shipped_source(BUILTIN_SHAPES[name], f"{base}: the shapes of {BUILTIN_SHAPES[name]}")
        return ModelSource("folder", str(resolve_builtin(name)), base), f"{base} (built locally, tiny)"
    path = Path(base).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FinetuneError(f"model.base: {base} is a folder but not a diffusers model (no model_index.json)")
        return ModelSource("folder", str(path), base), f"{base} (local folder)"
    if path.suffix in (".safetensors", *PICKLE_SUFFIXES):
        return _single_file(base, model_cfg)
    if base.startswith((".", "/", "~")) or base.count("/") != 1:
        raise FinetuneError(f"model.base: {base} is neither an existing folder/file nor a hub id (owner/name)")
    if shipped(base):
        return _shipped_source(base, f"{base} (configs shipped with finetune)")
    return _hub_configs(base, model_cfg.revision), f"{base} (configs from the hub)"


def _shipped_source(hub_id: str, label: str) -> tuple[ModelSource, str]:
    return ModelSource("folder", str(shipped(hub_id)), hub_id), label


def _single_file(base: str, model_cfg) -> tuple[ModelSource, str]:
    if model_cfg.config:
        source, label = _configs_for(model_cfg.config, model_cfg)
        return source, f"{base} with the configs of {label}"
    family = model_cfg.family if model_cfg.family != "auto" else "sd1"
    default = FAMILY_DEFAULTS.get(family)
    if default is None:
        raise FinetuneError(f"model.config: plan needs the configs of {base}; set model.config to a diffusers "
                            "folder or hub id")
    return _shipped_source(default, f"{base}, assumed shaped like {default} (set model.config if not)")


def _hub_configs(hub_id: str, revision: str | None) -> ModelSource:
    """A hub id's configs from the local cache, or (online) downloaded: only model_index.json and
    each component's config.json, a few KB; never weights."""
    source = ModelSource("hub", hub_id, hub_id)
    if model_file(source, "model_index.json", revision) is not None:
        return source
    from huggingface_hub import constants, hf_hub_download

    if constants.HF_HUB_OFFLINE:
        raise FinetuneError(f"model.base: finetune ships no configs for {hub_id}, it is not in the hub cache, and "
                            "HF_HUB_OFFLINE is set; go online once (plan downloads only its config files) or "
                            "use a local diffusers folder")
    try:
        index = json.loads(Path(hf_hub_download(hub_id, "model_index.json", revision=revision)).read_text())
        for name in COMPONENTS:
            if name in index:
                hf_hub_download(hub_id, f"{name}/config.json", revision=revision)
    except Exception as e:  # the hub's errors are many kinds (gated, missing, offline); one line each
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FinetuneError(f"model.base: cannot read the configs of {hub_id} from the hub: {first}") from e
    return source
