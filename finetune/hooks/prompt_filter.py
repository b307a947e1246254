"""A prompt filter: block lists and regular expressions, matched without regard to case or spacing
("N S F W", "n-s-f-w" and "nsfw" are the same word to it). A blocked prompt is refused before any
image is generated; the manifest records why."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from . import register_hook
from .base import Hook, HookConfig, Provenance


class PromptFilterConfig(HookConfig):
    type: Literal["prompt_filter"] = "prompt_filter"
    block: list[str] = Field(default_factory=list, description="Words or phrases; matched ignoring case, spaces and punctuation.")
    patterns: list[str] = Field(default_factory=list, description="Regular expressions, matched case-insensitively.")
    check_negative: bool = Field(False, description="Also filter the negative prompt.")

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, v):
        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"{p!r} is not a valid regular expression ({e})") from None
        return v


def squash(text: str) -> str:
    """Lowercase letters and digits only: what spacing and punctuation tricks cannot hide."""
    return re.sub(r"[\W_]+", "", text.lower())


@register_hook("prompt_filter")
class PromptFilterHook(Hook):
    name = "prompt_filter"
    Config = PromptFilterConfig
    screens_content = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self._words = [(w, squash(w)) for w in cfg.block if squash(w)]
        self._patterns = [re.compile(p, re.IGNORECASE) for p in cfg.patterns]

    def check_prompt(self, provenance: Provenance) -> str | None:
        texts = [provenance.prompt] + ([provenance.negative_prompt] if self.cfg.check_negative and provenance.negative_prompt else [])
        for text in texts:
            flat = squash(text)
            for word, needle in self._words:
                if needle in flat:
                    return f"blocked term {word!r}"
            for pattern in self._patterns:
                if pattern.search(text) or pattern.search(" ".join(text.split())):
                    return f"matches pattern {pattern.pattern!r}"
        return None
