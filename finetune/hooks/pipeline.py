"""Running hooks over images and writing what passes: image files with their metadata, and a
manifest line for every image, written or rejected."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, PngImagePlugin

from .base import Hook, OutputImage, Provenance, Verdict

MANIFEST = "manifest.jsonl"
EXIF_USER_COMMENT = 0x9286
EXIF_IFD = 0x8769


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


def _save_image(item: OutputImage, path: Path) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    if path.suffix.lower() in (".jpg", ".jpeg"):
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
    tmp.replace(path)  # never a half-written image under the final name


def write_outputs(items: list[tuple[Path, OutputImage]], folder: Path, refused: list[tuple[Path, Provenance, list[Verdict]]] = ()) -> list[Path]:
    """Write every image that passed; append one manifest line per image (and per refused prompt)."""
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
                _save_image(item, path)
                written.append(path)
            manifest.write(json.dumps(row) + "\n")
        for path, prov, verdicts in refused:
            manifest.write(json.dumps({"file": None, "planned_file": path.name, "prompt": prov.prompt, "seed": prov.seed,
                                       "kind": prov.kind, "status": "blocked",
                                       "reason": "; ".join(f"{v.hook}: {v.reason}" for v in verdicts),
                                       "verdicts": [v.as_dict() for v in verdicts]}) + "\n")
    return written
