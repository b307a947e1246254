"""What a training method must provide to the loop.

- `Config`: its recipe section (a `Section` with a `type` literal naming the method);
- `setup(c)`: freeze what stays fixed, add adapters, return optimizer parameter groups;
- `trainable_modules(c)`: the modules that hold trained parameters (for accelerate and checkpointing);
- `trains_text_encoder`: whether prompts must be encoded with gradients (no caching then);
- `prepare_caption(caption)`: rewrite a training caption (e.g. expand a multi-vector token);
- `after_step(c)`: called after every optimizer step (e.g. restore rows that must not change);
- `state_dict()` / `load_state_dict(state, c)`: the method's own counters, JSON-able, for resume;
- `save(c, folder, output, name)`: write the method's artifacts, returning the files written;
- `describe_file(path)` and `usage(...)`: what the model card says about those files, and the
  Python lines that load them into a pipeline `pipe` (a test runs every card's code).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

# torch is imported inside the functions that run it: validating a recipe imports every plug-in
# module, and must not pay for torch (seconds, hundreds of MB) when no model is involved.
if TYPE_CHECKING:
    import torch



class Method:
    Config: ClassVar[type]

    def __init__(self, cfg, family, training):
        self.cfg = cfg
        self.family = family
        self.training = training

    @property
    def trains_text_encoder(self) -> bool:
        return False

    def setup(self, c) -> list[dict]:
        raise NotImplementedError

    def trainable_modules(self, c) -> list[torch.nn.Module]:
        raise NotImplementedError

    def trainable_parameter_count(self, groups: list[dict]) -> int:
        return sum(p.numel() for g in groups for p in g["params"])

    def prepare_caption(self, caption: str) -> str:
        return caption

    def after_step(self, c) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, c) -> None:
        pass

    def save(self, c, folder: Path, output, name: str) -> list[Path]:
        raise NotImplementedError

    def describe_file(self, path: Path) -> str:
        return ""

    def usage(self, pipeline_class: str, load_base: str, run_dir: Path, files: list[Path]) -> list[str]:
        """Python lines that load the result into a diffusers pipeline named `pipe` (the model card
        adds the line that makes an image)."""
        return [f"from diffusers import {pipeline_class}", load_base]
