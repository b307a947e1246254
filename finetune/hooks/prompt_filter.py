"""A prompt filter: block lists and regular expressions, matched without regard to case or spacing
("N S F W", "n-s-f-w" and "nsfw" are the same word to it), nor to the look of the letters: text
is folded first (`fold`), so "gоre" with a Cyrillic о, "ｇｏｒｅ", "𝐠𝐨𝐫𝐞", "g<zero-width space>ore"
and "göre" all read "gore". A blocked prompt is refused before any image is generated; the
terminal and the manifest say why."""

from __future__ import annotations

import re
import unicodedata
from typing import Literal

from pydantic import Field, field_validator

from . import register_hook
from .base import Hook, HookConfig, Provenance


class PromptFilterConfig(HookConfig):
    type: Literal["prompt_filter"] = "prompt_filter"
    block: list[str] = Field(default_factory=list, description=(
        "Words or phrases; matched ignoring case, spaces, punctuation, accents, zero-width characters and "
        "look-alike letters of other scripts."))
    patterns: list[str] = Field(default_factory=list, description=(
        "Regular expressions, matched case-insensitively, on the prompt as written and as folded."))
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


# Letters of other scripts drawn like a Latin one (after Unicode's confusables list), each pair
# "look-alike, Latin": NFKC leaves them alone because they are different letters. Both cases are
# listed and mapped before lower-casing, because they differ (Greek Η looks like H, η like n).
# The rows: Cyrillic, Greek, then Armenian and Latin letters outside ASCII that do not decompose.
_LOOKALIKES = str.maketrans(dict(pair for pair in """
    АA ВB ЕE ЅS ІI ЈJ КK МM НH ОO РP СC ТT ХX УY ҮY ҺH ӀI ԚQ ԜW
    аa вb еe ѕs іi јj кk мm нh оo рp сc тt хx уy үy һh ӏl ԛq ԝw ԁd пn ьb
    ΑA ΒB ΕE ΖZ ΗH ΙI ΚK ΜM ΝN ΟO ΡP ΤT ΥY ΧX
    αa γy εe ιi ηn κk μu νv οo πn ρp σo ςc τt υu χx ωw
    օo սu ցg հh ոn ıi ȷj ɡg ɑa ɩi ʋu łl øo đd ħh
""".split()))
_INVISIBLE = {"Cf", "Mn", "Me"}  # zero-width and bidi controls, soft hyphens; combining accents


def fold(text: str) -> str:
    """What a prompt reads as: compatibility forms (full-width, mathematical, circled letters) as
    plain ones (NFKC), accents and zero-width characters gone, look-alike letters of other
    scripts as the Latin letter they pass for, all lower case."""
    text = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    text = "".join(ch for ch in text if unicodedata.category(ch) not in _INVISIBLE)
    return unicodedata.normalize("NFC", text).translate(_LOOKALIKES).casefold()


def squash(text: str) -> str:
    """Folded letters and digits only: what spacing, punctuation and look-alike tricks cannot hide."""
    return re.sub(r"[\W_]+", "", fold(text))


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
                if any(pattern.search(t) for t in (text, " ".join(text.split()), " ".join(fold(text).split()))):
                    return f"matches pattern {pattern.pattern!r}"
        return None
