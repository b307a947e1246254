"""Running hooks over images and writing what passes: image files with their metadata, and a
manifest line for every image, written or rejected."""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

from ..files import write_atomically
from .base import Hook, OutputImage, Provenance, Verdict

MANIFEST = "manifest.jsonl"
EXIF_USER_COMMENT = 0x9286
EXIF_IFD = 0x8769
_NUMBERED = re.compile(r"(\d{1,18})-")


class OutputPipeline:
    def __init__(self, hooks: list[Hook]):
        self.hooks = hooks

    def check_prompt(self, provenance: Provenance) -> list[Verdict]:
        """Verdicts of the hooks that refuse this prompt (empty: generate it)."""
        refusals = []
        for hook in self.hooks:
            reason = hook.check_prompt(provenance)
            if reason:
                refusals.append(Verdict(hook.name, "reject", reason))
        return refusals

    def screening(self) -> "OutputPipeline":
        """Only the hooks that screen content (for class images: vetted, never marked)."""
        return OutputPipeline([h for h in self.hooks if h.screens_content])

    def process(self, item: OutputImage) -> OutputImage:
        for hook in self.hooks:
            item = hook.process(item)
            if item.rejected:
                break
        return item


def _save_image(item: OutputImage, path: Path) -> Path:
    """Write the image under `path`, or the first free name after it (an image never replaces
    another); returns the name it got."""
    return write_atomically(path, lambda tmp: _encode(item, tmp), overwrite=False)


def _encode(item: OutputImage, tmp: Path) -> None:
    if tmp.suffix.lower() in (".jpg", ".jpeg"):
        exif = Image.Exif()
        if "parameters" in item.text:
            # EXIF UserComment, as webui writes it for JPEG: an 8-byte charset header, then UTF-16.
            exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = b"UNICODE\0" + item.text["parameters"].encode("utf-16-be")
        item.image.save(tmp, format="JPEG", quality=95, exif=exif)
    else:
        info = PngImagePlugin.PngInfo()
        for key, value in item.text.items():
            info.add_itxt(key, value)
        item.image.save(tmp, format="PNG", pnginfo=info)


def read_manifest(folder: Path) -> list[dict]:
    """The rows of `folder`'s manifest that parse (none if it has none)."""
    try:
        lines = (folder / MANIFEST).read_text(encoding="utf-8").splitlines()
    except (FileNotFoundError, NotADirectoryError):
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def next_index(folder: Path) -> int:
    """One past the highest number any image name in `folder` starts with, written or only planned
    (a refused prompt's names stay its own in the manifest): where new names count on from."""
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    names += [str(row.get("planned_file") or "") for row in read_manifest(folder)]
    numbers = [int(m.group(1)) for m in map(_NUMBERED.match, names) if m]
    return max(numbers, default=-1) + 1


def write_outputs(items: list[tuple[Path, OutputImage]], folder: Path, refused: list[tuple[Path, Provenance, list[Verdict]]] = ()) -> list[Path]:
    """Write every image that passed (under a free name: nothing already in `folder` is replaced); append
    one manifest line per image (and per refused prompt), after its file exists."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    with open(folder / MANIFEST, "a", encoding="utf-8") as manifest:
        for path, item in items:
            row = {"file": path.name if not item.rejected else None, "planned_file": path.name,
                   "prompt": item.provenance.prompt, "seed": item.provenance.seed, "kind": item.provenance.kind,
                   "status": "rejected" if item.rejected else "written",
                   "verdicts": [v.as_dict() for v in item.verdicts]}
            if item.rejected:
                row["reason"] = item.rejected
            else:
                saved = _save_image(item, path)
                row["file"] = saved.name
                written.append(saved)
            manifest.write(json.dumps(row) + "\n")
            manifest.flush()  # killed, a run loses at most the row of the image it was writing
        for path, prov, verdicts in refused:
            manifest.write(json.dumps({"file": None, "planned_file": path.name, "prompt": prov.prompt, "seed": prov.seed,
                                       "kind": prov.kind, "status": "blocked",
                                       "reason": "; ".join(f"{v.hook}: {v.reason}" for v in verdicts),
                                       "verdicts": [v.as_dict() for v in verdicts]}) + "\n")
    return written
