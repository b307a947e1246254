"""Prompt files for `finetune generate --prompts FILE`: a .txt (one prompt a line, # comments), or a
.csv / .jsonl whose rows have `prompt` and optionally `negative_prompt`, `seed`, `width`, `height`, `n`.

Every number is checked where it enters (here for rows, `check_number` for the command line too):
a row asking for 10^8 images or a width of -64 is refused with its file, line and key, before
any model loads."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import FinetuneError

FIELDS = ("prompt", "negative_prompt", "seed", "width", "height", "n")
EXCERPT = 80
SEED_MAX = 2**63 - 1  # torch.Generator takes more, but int64 is what every reader of the metadata handles
# (lowest, highest) of each number a prompt row or the command line can give. The upper bounds keep
# one typo from asking for hours of work or more memory than any machine has.
LIMITS = {"n": (1, 1000), "width": (8, 8192), "height": (8, 8192), "steps": (1, 1000), "seed": (0, SEED_MAX)}
MULTIPLE_OF_8 = ("width", "height")  # the VAE halves the image three times
_WHOLE = re.compile(r"\s*[+-]?\d{1,30}\s*")


def excerpt(value, limit: int = EXCERPT) -> str:
    """`value` for a one-line message: quoted with control characters escaped, cut to `limit` characters."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text)} characters)"
    return repr(text) if isinstance(value, str) else text


def check_number(key: str, value, where: str) -> int:
    """`value` as a whole number within LIMITS[key]; else one line starting with `where` (which
    names the file, line and key, or the option)."""
    low, high = LIMITS[key]
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and _WHOLE.fullmatch(value))):
        raise FinetuneError(f"{where}: must be a whole number from {low} to {high}, got {excerpt(value)}")
    number = int(value)
    if not low <= number <= high:
        raise FinetuneError(f"{where}: must be from {low} to {high}, got {excerpt(value)}")
    if key in MULTIPLE_OF_8 and number % 8:
        raise FinetuneError(f"{where}: {number} is not a multiple of 8")
    return number


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
        names = ", ".join(sorted(map(str, unknown)))
        names = names if names.isprintable() and len(names) <= EXCERPT else excerpt(names)
        raise FinetuneError(f"{where}: unknown column(s) {names}; allowed: {', '.join(FIELDS)}")
    if not str(raw.get("prompt") or "").strip():
        raise FinetuneError(f"{where}: empty prompt")
    out = {"prompt": str(raw["prompt"]).strip()}
    if raw.get("negative_prompt") not in (None, ""):
        out["negative_prompt"] = str(raw["negative_prompt"])
    for key in ("seed", "width", "height", "n"):
        if raw.get(key) not in (None, ""):
            out[key] = check_number(key, raw[key], f"{where}: {key}")
    return PromptRow(**out)


def _csv_rows(text: str, path: Path) -> list[PromptRow]:
    reader = csv.DictReader(text.splitlines())
    rows = []
    try:
        for raw in reader:
            where = f"{path}:{reader.line_num}"
            if None in raw:  # DictReader files values past the header under None
                raise FinetuneError(f"{where}: more values than the header has columns")
            rows.append(_row(raw, where))
    except csv.Error as e:
        raise FinetuneError(f"{path}:{reader.line_num}: not valid CSV ({excerpt(str(e))})") from None
    return rows


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
            except ValueError as e:  # JSONDecodeError, or a number too long for Python to read
                raise FinetuneError(f"{path}:{i}: not valid JSON ({excerpt(getattr(e, 'msg', str(e)))})") from None
            if not isinstance(raw, dict):
                raise FinetuneError(f"{path}:{i}: expected an object with a prompt")
            rows.append(_row(raw, f"{path}:{i}"))
    elif suffix == ".csv":
        rows = _csv_rows(text, path)
    else:
        rows = [PromptRow(line.strip()) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not rows:
        raise FinetuneError(f"--prompts: {path} holds no prompts")
    return rows
