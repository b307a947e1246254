"""The output pipeline: every image the toolkit emits passes through an ordered list of hooks.

A hook sees an `OutputImage` (the pixels, how they were made, and what earlier hooks decided) and
may transform the image, add metadata, or reject it with a reason. Prompt-level hooks
(`check_prompt`) run before anything is generated, so a blocked prompt costs no compute.
Rejected images are never written; the manifest (`manifest.jsonl`) records every image, written
or not, with each hook's verdict.

Hooks are configured in a recipe's `output.hooks` list (or on the `generate` command line) by
`type` plus the hook's own options; third-party hooks register through the `finetune.hooks`
entry-point group and are named the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from PIL import Image

from ..config_base import Section


@dataclass
class Verdict:
    hook: str
    action: str  # "pass", "transform", "metadata", "reject"
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {"hook": self.hook, "action": self.action}
        if self.reason:
            d["reason"] = self.reason
        if self.details:
            d.update(self.details)
        return d


@dataclass
class Provenance:
    """How an image was made: what the provenance hook writes and the watermark identifies."""

    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    base_model: str | None = None
    adapters: list[dict] = field(default_factory=list)  # {"path", "sha256", "weight"}
    run: str | None = None
    kind: str = "generate"  # "generate", "validation", "class", ...


@dataclass
class OutputImage:
    image: Image.Image
    provenance: Provenance
    text: dict[str, str] = field(default_factory=dict)  # PNG text chunks / EXIF fields to write
    verdicts: list[Verdict] = field(default_factory=list)
    rejected: str | None = None  # the reason, once a hook rejects it
    # Run on the encoded file's bytes, in order, just before they are written: what must see the final
    # bytes (a C2PA signature) goes here, whatever the hook order. f(item, data, mime) -> new bytes.
    finishers: list[Callable[["OutputImage", bytes, str], bytes]] = field(default_factory=list)

    def reject(self, hook: str, reason: str, **details) -> "OutputImage":
        self.rejected = f"{hook}: {reason}"
        self.verdicts.append(Verdict(hook, "reject", reason, details))
        return self


class HookConfig(Section):
    """A hook's options; subclasses add fields. `type` names the hook."""

    type: str


class Hook:
    name: ClassVar[str]
    Config: ClassVar[type[HookConfig]] = HookConfig
    # Content screens (prompt filters, image classifiers) also vet prior-preservation class images,
    # which are training data: marks and metadata are not applied to those.
    screens_content: ClassVar[bool] = False

    def __init__(self, cfg: HookConfig):
        self.cfg = cfg

    def describe(self) -> str | None:
        """A line for the log when the pipeline is built (e.g. which credential signs), or None."""
        return None

    def check_prompt(self, provenance: Provenance) -> str | None:
        """A reason to refuse this prompt before generating, or None."""
        return None

    def process(self, item: OutputImage) -> OutputImage:
        item.verdicts.append(Verdict(self.name, "pass"))
        return item
