"""Model families: everything that differs between SD1.x, SDXL, FLUX, ... lives in one module each."""

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


__all__ = ["Components", "Family", "FAMILIES", "register_family", "get_family", "detect_family"]
