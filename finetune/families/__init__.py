"""Model families: everything that differs between SD1.x, SDXL, FLUX, ... lives in one module each."""

from pathlib import Path

from ..registry import Registry
from .base import Components, Family

FAMILIES: Registry[type[Family]] = Registry("model family", __name__)
register_family = FAMILIES.register


def get_family(name: str) -> Family:
    return FAMILIES.get(name)()


def detect_family(model_index: dict) -> Family:
    """The family whose pipeline class matches a diffusers model_index.json."""
    from ..errors import FinetuneError

    for name, cls in FAMILIES.items():
        if cls.matches(model_index):
            return cls()
    raise FinetuneError(
        f"model family not recognised (pipeline class {model_index.get('_class_name')!r}); "
        f"set model.family to one of: {', '.join(FAMILIES.names())}")


def pipeline_family(pipe) -> Family | None:
    """The family whose diffusers pipeline `pipe` is; None for any other pipeline."""
    name = type(pipe).__name__
    return next((cls() for _, cls in FAMILIES.items() if name in cls.pipeline_class_names), None)


def known_family(model_cfg) -> Family | None:
    """The family a recipe's `model` section will load, found without loading or building anything:
    `model.family`, a built-in model's, or the pipeline class in a local folder's or the hub cache's
    model_index.json; None when only loading would tell (a single file, a hub id not yet downloaded)."""
    from ..tiny_models import BUILTIN_FAMILIES, BUILTIN_PREFIX
    from .base import PICKLE_SUFFIXES, ModelSource, base_problem, model_file, read_json

    if model_cfg.family != "auto":
        return get_family(model_cfg.family)
    base = model_cfg.base
    if base.startswith(BUILTIN_PREFIX):
        name = BUILTIN_FAMILIES.get(base[len(BUILTIN_PREFIX):])
        return get_family(name) if name else None
    if base_problem(base, model_cfg.allow_pickle, offline_cache=False):
        return None
    # A single file's configs are model.config's, if it names them.
    where = model_cfg.config if Path(base).suffix in (".safetensors", *PICKLE_SUFFIXES) else base
    local = Path(where).expanduser() if where else None
    source = None if where is None else ModelSource("folder", str(local), where) if local.is_dir() else \
        ModelSource("hub", where, where)
    index = read_json(model_file(source, "model_index.json", model_cfg.revision)) if source else None
    owner = next((cls for _, cls in FAMILIES.items() if index and cls.matches(index)), None)
    return owner() if owner else None


__all__ = ["Components", "Family", "FAMILIES", "register_family", "get_family", "detect_family"]
