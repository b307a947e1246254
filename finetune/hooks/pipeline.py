"""Running hooks over images and writing what passes: image files with their metadata, and a
manifest line for every image, written or rejected."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

from ..errors import FinetuneError
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

    def describe(self) -> list[str]:
        """Lines for the log once the run is under way (which credential signs, ...)."""
        return [line for line in (hook.describe() for hook in self.hooks) if line]

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
    another); returns the name it got. The bytes are final before the file is made: a finisher that
    fails (a signature c2pa refuses) leaves nothing behind."""
    data, mime = encode(item, path.suffix)
    for finish in item.finishers:
        data = finish(item, data, mime)
    return write_atomically(path, lambda tmp: tmp.write_bytes(data), overwrite=False)


def encode(item: OutputImage, suffix: str) -> tuple[bytes, str]:
    """The image encoded for `suffix`, with the text the hooks set: PNG iTXt chunks; for JPEG and WebP,
    `parameters` as the EXIF UserComment webui writes (an 8-byte charset header, then UTF-16). Any
    other format PIL knows by its suffix is written plain (a C2PA finisher then skips it with a warning)."""
    fmt = Image.registered_extensions().get(suffix.lower(), "PNG")
    mime = Image.MIME.get(fmt, f"image/{fmt.lower()}")
    buf = io.BytesIO()
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        for key, value in item.text.items():
            info.add_itxt(key, value)
        item.image.save(buf, format="PNG", pnginfo=info)
    elif fmt in ("JPEG", "WEBP"):
        exif = Image.Exif()
        if "parameters" in item.text:
            exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = b"UNICODE\0" + item.text["parameters"].encode("utf-16-be")
        item.image.save(buf, format=fmt, quality=95, exif=exif)
    else:
        item.image.save(buf, format=fmt)
    return buf.getvalue(), mime


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


def write_outputs(items: list[tuple[Path, OutputImage]], folder: Path, refused: list[tuple[Path, Provenance, list[Verdict]]] = (),
                  log=None) -> list[Path]:
    """Write every image that passed (under a free name: nothing already in `folder` is replaced); append
    one manifest line per image (and per refused prompt), after its file exists. An image whose bytes
    could not be finished (signed) is not written; `log` gets a line for it."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    with open(folder / MANIFEST, "a", encoding="utf-8") as manifest:
        for path, item in items:
            row = {"file": path.name if not item.rejected else None, "planned_file": path.name,
                   "prompt": item.provenance.prompt, "seed": item.provenance.seed, "kind": item.provenance.kind,
                   "status": "rejected" if item.rejected else "written",
                   "verdicts": [v.as_dict() for v in item.verdicts]}
            if not item.rejected:
                try:
                    saved = _save_image(item, path)
                    row["file"] = saved.name
                    written.append(saved)
                except FinetuneError as e:  # e.g. c2pa refused to sign: fail closed, nothing unsigned is written
                    item.reject("write", str(e))
                    if log:
                        log(f"rejected: {path.name} ({item.rejected})")
            if item.rejected:
                row.update(file=None, status="rejected", reason=item.rejected)
            row["verdicts"] = [v.as_dict() for v in item.verdicts]  # with what the finishers added
            warnings = [v.reason for v in item.verdicts if v.details.get("warning")]
            if warnings:
                row["warnings"] = warnings
            manifest.write(json.dumps(row) + "\n")
            manifest.flush()  # killed, a run loses at most the row of the image it was writing
        for path, prov, verdicts in refused:
            manifest.write(json.dumps({"file": None, "planned_file": path.name, "prompt": prov.prompt, "seed": prov.seed,
                                       "kind": prov.kind, "status": "blocked",
                                       "reason": "; ".join(f"{v.hook}: {v.reason}" for v in verdicts),
                                       "verdicts": [v.as_dict() for v in verdicts]}) + "\n")
    return written
