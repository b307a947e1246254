"""Prompt files for `finetune generate --prompts FILE`: a .txt (one prompt a line, # comments), or a
.csv / .jsonl whose rows have `prompt` and optionally `negative_prompt`, `seed`, `width`, `height`, `n`."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import FinetuneError

FIELDS = ("prompt", "negative_prompt", "seed", "width", "height", "n")


@dataclass
class PromptRow:
    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    n: int | None = None


def _row(raw: dict, where: str) -> PromptRow:
    unknown = set(raw) - set(FIELDS)
    if unknown:
        raise FinetuneError(f"{where}: unknown column(s) {', '.join(sorted(unknown))}; allowed: {', '.join(FIELDS)}")
    if not str(raw.get("prompt") or "").strip():
        raise FinetuneError(f"{where}: empty prompt")
    out = {"prompt": str(raw["prompt"]).strip()}
    for key in ("negative_prompt",):
        if raw.get(key) not in (None, ""):
            out[key] = str(raw[key])
    for key in ("seed", "width", "height", "n"):
        if raw.get(key) not in (None, ""):
            try:
                out[key] = int(raw[key])
            except (TypeError, ValueError):
                raise FinetuneError(f"{where}: {key} must be a whole number, got {raw[key]!r}") from None
    for key in ("width", "height"):
        if key in out and out[key] % 8:
            raise FinetuneError(f"{where}: {key} {out[key]} is not a multiple of 8")
    return PromptRow(**out)


def read_prompt_file(path: str | Path) -> list[PromptRow]:
    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"--prompts: {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FinetuneError(f"--prompts: {path} is not UTF-8 text") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise FinetuneError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(raw, dict):
                raise FinetuneError(f"{path}:{i}: expected an object with a prompt")
            rows.append(_row(raw, f"{path}:{i}"))
    elif suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        rows = [_row(raw, f"{path}:{i}") for i, raw in enumerate(reader, 2)]
    else:
        rows = [PromptRow(line.strip()) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not rows:
        raise FinetuneError(f"--prompts: {path} holds no prompts")
    return rows
