"""Provenance metadata: how an image was made, in the `parameters` text convention webui writes
(so webui's PNG Info and other readers show it), plus the full record as JSON."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from typing import Literal

from pydantic import Field

from .. import __version__
from . import register_hook
from .base import Hook, HookConfig, OutputImage, Verdict


class ProvenanceConfig(HookConfig):
    type: Literal["provenance"] = "provenance"
    private_prompt: bool = Field(False, description=(
        "Write the prompt's and negative prompt's sha256 instead of their text (set the c2pa hook's "
        "private_prompt too). The run's manifest.jsonl, which stays on this machine, still has the prompt."))


def prompt_fields(prompt: str | None, negative: str | None, private: bool) -> dict:
    """The prompts as a record carries them: as written, or (private) only their sha256."""
    if not private:
        return {"prompt": prompt, "negative_prompt": negative}
    def digest(text):
        return hashlib.sha256(text.encode()).hexdigest() if text is not None else None

    return {"prompt_sha256": digest(prompt), "negative_prompt_sha256": digest(negative)}


def webui_parameters(p) -> str:
    """`prompt\\nNegative prompt: ...\\nSteps: 25, Sampler: ..., Seed: 1, Size: 512x512, Model: ...`"""
    lines = [p.prompt]
    if p.negative_prompt:
        lines.append(f"Negative prompt: {p.negative_prompt}")
    fields = []
    for label, value in (("Steps", p.steps), ("CFG scale", p.guidance), ("Seed", p.seed)):
        if value is not None:
            fields.append(f"{label}: {value}")
    if p.width and p.height:
        fields.append(f"Size: {p.width}x{p.height}")
    if p.base_model:
        fields.append(f"Model: {p.base_model}")
    if p.adapters:
        hashes = ", ".join(f"{a['path'].rsplit('/', 1)[-1]}: {a['sha256'][:12]}" for a in p.adapters)
        fields.append(f'Lora hashes: "{hashes}"')
    fields.append(f"Version: finetune {__version__}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


@register_hook("provenance")
class ProvenanceHook(Hook):
    name = "provenance"
    Config = ProvenanceConfig

    def process(self, item: OutputImage) -> OutputImage:
        p = item.provenance
        prompts = prompt_fields(p.prompt, p.negative_prompt, self.cfg.private_prompt)
        shown = p if not self.cfg.private_prompt else replace(
            p, prompt=f"[prompt withheld, sha256 {prompts['prompt_sha256']}]", negative_prompt=None)
        item.text["parameters"] = webui_parameters(shown)
        item.text["finetune"] = json.dumps({
            **prompts, "seed": p.seed, "steps": p.steps,
            "guidance": p.guidance, "width": p.width, "height": p.height, "base_model": p.base_model,
            "adapters": p.adapters, "run": p.run, "kind": p.kind, "toolkit": f"finetune {__version__}"})
        item.verdicts.append(Verdict(self.name, "metadata"))
        return item
