"""Training methods (LoRA, ...): which parameters train and what gets saved, one module each."""

from ..registry import Registry
from .base import Method

METHODS: Registry[type[Method]] = Registry("method", __name__)
register_method = METHODS.register


def get_method(cfg, family, training) -> Method:
    return METHODS.get(cfg.type)(cfg, family, training)


__all__ = ["Method", "METHODS", "register_method", "get_method"]
