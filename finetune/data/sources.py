"""Finding the examples of an image set: (image, caption) pairs from a folder, a metadata file or
a `datasets` dataset. Nothing is decoded here; `Example.load` reads pixels when they are needed.

A problem with one example (a missing or broken file, an unreadable caption) is recorded, not
raised: `check.discover_examples` checks the set, leaves unusable examples out and reports them
all at once. Only problems with the set itself raise here.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from PIL import Image

from ..errors import FinetuneError, safe_name
from .images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, image_size, load_image, oriented_size, to_rgb

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
# Files `save_to_disk` writes: a folder holding one of them is a saved dataset, not an image folder.
_SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class Example:
    """One training image and its caption; exactly one of `path`, `data`, `image` holds the pixels."""

    key: str  # unique within the set (relative path, or split[row]); caches are keyed on it
    caption: str | None
    path: Path | None = None
    image: Image.Image | None = field(default=None, repr=False)
    data: bytes | None = field(default=None, repr=False)  # encoded file from a dataset row
    caption_file: Path | None = None  # where a folder set looks for this image's caption, found or not
    caption_issue: tuple[str, str] | None = None  # (check category, detail) from reading the caption
    refused: tuple[str, str] | None = None  # (check category, detail) known before opening: never read
    max_pixels: int = DEFAULT_MAX_PIXELS  # data.max_pixels: larger images are refused, not decoded

    def load(self) -> Image.Image:
        if self.path is not None:
            return load_image(self.path, max_pixels=self.max_pixels)
        if self.data is not None:
            return load_image(self.data, name=self.key, max_pixels=self.max_pixels)
        if self.image is not None:
            return to_rgb(self.image, self.key)
        raise FinetuneError(f"example {self.key} has no image")

    def size(self) -> tuple[int, int]:
        """(width, height) after EXIF rotation, without decoding the pixels where possible."""
        if self.path is not None:
            return image_size(self.path, max_pixels=self.max_pixels)
        if self.data is not None:
            return image_size(self.data, name=self.key, max_pixels=self.max_pixels)
        if self.image is not None:
            return oriented_size(self.image, self.key)
        raise FinetuneError(f"example {self.key} has no image")


def find_examples(cfg, base_dir: Path | None = None) -> list[Example]:
    """Every example `cfg` (a DataConfig) names, unchecked; raises FinetuneError when there are none."""
    path = resolve_data_path(cfg.path, base_dir)
    source = cfg.source if cfg.source != "auto" else _detect(path, cfg.path)
    if source == "datasets":
        examples = _from_datasets(cfg, path)
    elif not path.exists():
        raise FinetuneError(f"data.path: folder {path} does not exist")
    elif source == "metadata":
        examples = _from_metadata(cfg, path)
    else:
        examples = _from_folder(cfg, path)
    if not examples:
        looked = f" (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})" if source == "folder" else ""
        raise FinetuneError(f"data.path: no images found in {path}{looked}")
    for e in examples:
        e.max_pixels = cfg.max_pixels
    return examples


def looks_like_hub_dataset(raw: str) -> bool:
    return bool(_HUB_NAME.match(raw)) and not raw.startswith(".")


def resolve_data_path(raw: str, base_dir: Path | None) -> Path:
    """data.path as given if it exists, else relative to the recipe's folder, else to the folder
    above it: bundled recipes sit in recipes/ beside their sample data in datasets/, and must find
    it from any working directory (not take `datasets/robot` for a hub dataset's name)."""
    path = Path(raw).expanduser()
    if not path.is_absolute() and not path.exists() and base_dir is not None:
        for folder in (Path(base_dir), Path(base_dir).parent):
            if (folder / path).exists():
                return folder / path
    return path


def _detect(path: Path, raw: str) -> str:
    if path.is_file():
        if path.suffix.lower() in (".jsonl", ".csv"):
            return "metadata"
        raise FinetuneError(f"data.path: {path} is a file; expected a folder, a metadata.jsonl/.csv file "
                            f"or a dataset name")
    if path.is_dir():
        if any((path / m).is_file() for m in METADATA_FILES):
            return "metadata"
        if any((path / m).is_file() for m in _SAVED_DATASET_MARKERS):
            return "datasets"
        return "folder"
    # Not on disk: a bare `name` or `owner/name` may be a dataset on the hub.
    return "datasets" if looks_like_hub_dataset(raw) else "folder"


def _caption(text, cfg) -> str:
    text = text.strip() if isinstance(text, str) else ""
    return text or (cfg.instance_prompt or "")


def _row_caption(value, cfg, where: str) -> tuple[str, tuple[str, str] | None]:
    """A metadata or dataset row's caption, and the check finding when it is empty."""
    if isinstance(value, str) and value.strip():
        return _caption(value, cfg), None
    return _caption(None, cfg), ("empty_caption", f"empty {cfg.caption_column} {where}")


def _from_folder(cfg, folder: Path) -> list[Example]:
    if not folder.is_dir():
        raise FinetuneError(f"data.path: {folder} is not a folder")
    ext = cfg.caption_extension if cfg.caption_extension.startswith(".") else "." + cfg.caption_extension
    inside = _Confinement(folder, cfg.follow_symlinks)
    images, linked_out = _image_files(folder, inside)
    examples = []
    for path in sorted(images):
        key = path.relative_to(folder).as_posix()
        if inside.leaves(path):
            examples.append(Example(key=key, caption=None, refused=_outside("a symlink")))
            continue
        caption_file = path.with_suffix(ext)
        if inside.leaves(caption_file):
            text, issue = None, _outside(f"its caption file {safe_name(caption_file.name)} is a symlink")
        else:
            text, issue = _read_caption(caption_file)
        examples.append(Example(key=key, caption=_caption(text, cfg), path=path,
                                caption_file=caption_file, caption_issue=issue))
    # A folder it cannot enter is reported like a file it cannot read: by name, in the check.
    return examples + [Example(key=f"{d.relative_to(folder).as_posix()}/", caption=None,
                               refused=_outside("a symlinked folder")) for d in sorted(linked_out)]


class _Confinement:
    """What a data folder may read: files whose real path (symlinks followed) stays inside it, or
    anything with data.follow_symlinks. A link out of the folder would otherwise train on, and
    print from, any file this account can read."""

    def __init__(self, folder: Path, follow: bool, *more_folders: Path):
        self.roots = [f.resolve() for f in (folder, *more_folders)]
        self.follow = follow

    def leaves(self, path: Path) -> bool:
        if self.follow:
            return False
        try:
            real = path.resolve()
        except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL in a row's path: not shown to stay inside
            return True
        return not any(real.is_relative_to(root) for root in self.roots)


def _outside(what: str) -> tuple[str, str]:
    """The check finding for something that leads out of the data folder."""
    return "outside_folder", f"{what} leading out of the data folder; not read (data.follow_symlinks: true reads it)"


def _read_caption(path: Path) -> tuple[str | None, tuple[str, str] | None]:
    """A caption file's text, and what is wrong with it as a check (category, detail), if anything."""
    if not path.is_file():
        return None, ("missing_caption", f"no {path.name}")
    try:
        text = _read_text(path).strip()
    except UnicodeDecodeError as e:
        return None, ("caption_unreadable", f"{path.name} is not UTF-8 ({_bad_byte(e)}); save it as UTF-8")
    except OSError as e:
        return None, ("caption_unreadable", f"cannot read {path.name}: {e.strerror or e}")
    return text, (None if text else ("empty_caption", f"{path.name} is empty"))


def _image_files(folder: Path, inside: _Confinement) -> tuple[list[Path], list[Path]]:
    """The image files under `folder`, and the symlinked sub-folders left unread because they lead
    out of it. A symlinked sub-folder that stays inside is not entered (its files are already
    found under their real name); with data.follow_symlinks every one is, each real folder once
    per branch, so a link to an ancestor cannot loop."""
    images, left_out = [], []
    for root, dirs, files in os.walk(folder, followlinks=inside.follow):
        # Hidden entries (.ipynb_checkpoints, macOS "._x.png" resource forks) are never training data.
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if inside.follow:
            dirs[:] = [d for d in dirs if not _loops(Path(root) / d, folder)]
        else:
            left_out += [Path(root) / d for d in dirs if inside.leaves(Path(root) / d)]
        images += [Path(root) / n for n in files
                   if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_EXTENSIONS]
    return images, left_out


def _loops(path: Path, top: Path) -> bool:
    """Whether a folder is really one of its own ancestors up to `top` (a symlink loop)."""
    real = path.resolve()
    return any(real == p.resolve() for p in [path.parent, *path.parent.parents] if p.is_relative_to(top))


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8-sig")  # -sig: Notepad's byte-order mark is not caption text


def _bad_byte(e: UnicodeDecodeError) -> str:
    return f"byte 0x{e.object[e.start]:02x} at offset {e.start}"


def _from_metadata(cfg, path: Path) -> list[Example]:
    if path.is_dir():
        found = [path / m for m in METADATA_FILES if (path / m).is_file()]
        if not found:
            raise FinetuneError(f"data.path: no {' or '.join(METADATA_FILES)} in {path}")
        path = found[0]
        if _Confinement(path.parent, cfg.follow_symlinks).leaves(path):
            raise FinetuneError(f"data.path: {safe_name(path)} is a symlink leading out of the data folder; "
                                "not read (data.follow_symlinks: true reads it)")
    folder = path.parent
    inside = _Confinement(folder, cfg.follow_symlinks)
    rows = _read_metadata(path)
    if not rows:
        return []
    columns = list(rows[0])
    for column in ("file_name", cfg.caption_column):
        if column not in columns:
            found = safe_name(", ".join(map(str, columns)))
            raise FinetuneError(f"{path}: no column {column!r}; columns are: {found}")
    examples = []
    for row in rows:
        name = str(row["file_name"] or "")
        # Checked in Windows syntax too: metadata written there may say ..\x.png or C:\x.png.
        if not name or any(p.anchor or ".." in p.parts for p in (PurePosixPath(name), PureWindowsPath(name))):
            raise FinetuneError(f"{path}: file_name {name!r} must be a path inside {folder}")
        # A listed file that is missing is reported by the check, like any other unusable image.
        key = PurePosixPath(name).as_posix()
        if inside.leaves(folder / name):  # `name` stays inside lexically; a symlinked folder on its way may not
            examples.append(Example(key=key, caption=None, refused=_outside("a path through a symlink")))
            continue
        caption, issue = _row_caption(row.get(cfg.caption_column), cfg, f"in {path.name}")
        examples.append(Example(key=key, caption=caption, path=folder / name, caption_issue=issue))
    return sorted(examples, key=lambda e: e.key)


def _read_metadata(path: Path) -> list[dict]:
    try:
        text = _read_text(path)
    except UnicodeDecodeError as e:
        raise FinetuneError(f"{path} is not UTF-8 text ({_bad_byte(e)}); save it as UTF-8") from None
    if path.suffix.lower() == ".csv":
        return list(csv.DictReader(io.StringIO(text, newline="")))
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FinetuneError(f"{path}, line {n}: not valid JSON: {e}") from None
            if not isinstance(row, dict):
                raise FinetuneError(f"{path}, line {n}: expected a JSON object")
            rows.append(row)
    return rows


def _from_datasets(cfg, path: Path) -> list[Example]:
    import datasets

    if path.is_dir() and any((path / m).is_file() for m in _SAVED_DATASET_MARKERS):
        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as e:
            raise FinetuneError(f"data.path: cannot load saved dataset {path}: {e}") from None
    else:
        target = str(path) if path.exists() else cfg.path
        try:
            ds = datasets.load_dataset(target, split=cfg.split)
        except Exception as e:  # hub, network and builder errors alike become one line naming the path
            where = "" if path.exists() else f"folder {path} does not exist, and "
            raise FinetuneError(f"data.path: {where}loading {target!r} as a dataset failed: "
                                f"{type(e).__name__}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if cfg.split not in ds:
            raise FinetuneError(f"data.split: no split {cfg.split!r} in {cfg.path}; splits are: {', '.join(ds)}")
        ds = ds[cfg.split]
    for column in (cfg.image_column, cfg.caption_column):
        if column not in ds.column_names:
            raise FinetuneError(f"data: dataset {cfg.path} has no column {column!r}; "
                                f"columns are: {', '.join(ds.column_names)}")
    if isinstance(ds.features[cfg.image_column], datasets.Image):
        # Keep the encoded bytes: decoding every image up front would hold the whole set in memory.
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
    inside = _dataset_confinement(path, cfg.follow_symlinks)
    examples = []
    for i, row in enumerate(ds.select_columns([cfg.image_column, cfg.caption_column])):
        caption, issue = _row_caption(row[cfg.caption_column], cfg, "column")
        example = Example(key=f"{cfg.split}[{i}]", caption=caption, caption_issue=issue)
        _attach_image(example, row[cfg.image_column], path, inside)
        examples.append(example)
    return examples


def _dataset_confinement(path: Path, follow: bool) -> _Confinement:
    """Where a dataset's rows may name files: its folder; for a hub dataset (no folder), the caches
    its files were downloaded to."""
    if path.is_dir():
        return _Confinement(path, follow)
    import datasets
    from huggingface_hub import constants

    return _Confinement(Path(constants.HF_HUB_CACHE), follow, Path(datasets.config.HF_DATASETS_CACHE))


def _attach_image(example: Example, value, base: Path, inside: _Confinement) -> None:
    # A row with no usable image keeps none; the check reports it.
    if isinstance(value, Image.Image):
        example.image = value
    elif isinstance(value, dict) and value.get("bytes"):
        example.data = value["bytes"]
    else:
        raw = value.get("path") if isinstance(value, dict) else value
        if not isinstance(raw, str) or not raw:
            return
        path = Path(raw) if Path(raw).is_absolute() or not base.is_dir() else base / raw
        # A row's path is text from whoever made the set: unconfined, it could name any file this account reads.
        if inside.leaves(path):
            example.refused = _outside(f"its image path {safe_name(raw)}")
        else:
            example.path = path
