"""The Datasets page's library side: `finetune dataset check`'s report as rows with thumbnails, the
captions of a folder set read and written (each `.txt` atomically), and the bucket histogram. Every
path comes through `Roots.confine`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import FinetuneError
from .roots import Roots

MAX_CAPTION_CHARS = 10_000  # a caption is a sentence or two; a megabyte pasted in is a mistake
# Findings whose file a browser must not be handed as a thumbnail: not decodable, or too large to decode.
NO_THUMBNAIL = {"missing", "outside_folder", "zero_byte", "not_image", "corrupt", "too_large"}


@dataclass
class Checked:
    summary: list[str]  # the CLI's report lines
    findings: list[tuple[str, str, str]]  # (category, file, detail)
    thumbnails: list[tuple[str, str]]  # (image path, "category: file") for the findings that are images
    buckets: dict[str, int]  # "WxH" -> images trained at that size
    usable: int


def check(roots: Roots, folder: str, resolution: int = 512) -> Checked:
    """The dataset check of a folder inside the roots, as `finetune dataset check` reports it."""
    from ..data.check import check_dataset
    from ..recipe.schema import DataConfig

    path = roots.confine(folder)
    if not path.is_dir():
        raise FinetuneError(f"{roots.display(path)} is not a folder")
    cfg = DataConfig(path=str(path), resolution=resolution)
    report = check_dataset(cfg)
    findings, thumbs = [], []
    for category, items in report.findings.items():
        for name, detail in items:
            findings.append((category, name, detail))
            image = None if category in NO_THUMBNAIL else _inside(roots, path, name)
            if image is not None and image.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
                thumbs.append((str(image), f"{category}: {name}"))
    return Checked(report.summary(), findings, thumbs, _histogram(report.usable, cfg), len(report.usable))


def _inside(roots: Roots, folder: Path, name: str) -> Path | None:
    try:
        return roots.confine(folder / name)
    except FinetuneError:
        return None


def _histogram(examples, cfg) -> dict[str, int]:
    from ..data.buckets import nearest_bucket, training_buckets

    buckets = training_buckets(cfg)
    counts = Counter()
    for e in examples:
        try:
            w, h = nearest_bucket(*e.size(), buckets)
        except Exception:  # noqa: BLE001 - an image the check let through but cannot size now: not counted
            continue
        counts[f"{w}x{h}"] += 1
    return dict(sorted(counts.items()))


def captions(roots: Roots, folder: str) -> list[tuple[str, str]]:
    """(image file, its caption or "") for every image directly in a folder set."""
    path = roots.confine(folder)
    rows = []
    for image in sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")):
        text = image.with_suffix(".txt")
        caption = text.read_text(encoding="utf-8").strip() if text.is_file() else ""
        rows.append((image.name, caption))
    return rows


def save_caption(roots: Roots, folder: str, image: str, caption: str) -> Path:
    """Write one image's caption file, atomically; the image must be in the folder."""
    from ..files import write_text_atomically

    if "/" in image or "\\" in image:
        raise FinetuneError(f"{image!r}: a file name in the folder, not a path")
    if len(caption) > MAX_CAPTION_CHARS:
        raise FinetuneError(f"{image}: caption of {len(caption)} characters; at most {MAX_CAPTION_CHARS}")
    path = roots.confine(Path(roots.confine(folder)) / image)
    target = roots.confine(path.with_suffix(".txt"), must_exist=False)
    return write_text_atomically(target, caption.strip() + "\n")


MAX_UPLOAD_BYTES = 50 * 2**20  # per file; Gradio refuses larger requests before this (app.py)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def save_uploads(roots: Roots, folder: str, uploads: list) -> tuple[Path, list[str]]:
    """Copy uploaded images into `folder` (made inside a root if new), each checked as training data
    is: an image suffix, at most MAX_UPLOAD_BYTES, and decoding whole within data.max_pixels. A file
    that fails is skipped with its reason; a name taken in the folder gets a number, never replaced.
    Returns the folder and one line per file."""
    import shutil

    from ..data.images import load_image

    target = roots.confine(folder, must_exist=False)
    target.mkdir(parents=True, exist_ok=True)
    lines = []
    for upload in uploads or []:
        source = roots.confine(getattr(upload, "name", upload))  # Gradio's copy: inside the first root
        name = Path(getattr(upload, "orig_name", None) or source.name).name
        why = _unfit(source, name)
        if why is None:
            try:
                load_image(source, name=name)
            except FinetuneError as e:
                why = str(e)
        if why:
            lines.append(f"skipped {name}: {why}")
            continue
        dest = _free_name(target, name)
        shutil.copyfile(source, dest)
        lines.append(f"added {dest.name}")
    return target, lines


def _unfit(source: Path, name: str) -> str | None:
    if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an image file ({', '.join(IMAGE_SUFFIXES)})"
    if source.stat().st_size > MAX_UPLOAD_BYTES:
        return f"larger than {MAX_UPLOAD_BYTES // 2**20} MB"
    return None


def _free_name(folder: Path, name: str) -> Path:
    stem, suffix, k = Path(name).stem, Path(name).suffix, 2
    dest = folder / name
    while dest.exists():
        dest, k = folder / f"{stem}-{k}{suffix}", k + 1
    return dest
