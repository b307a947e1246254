"""`finetune dataset check`: what in an image set cannot train, and what probably should not.

Training runs the same check (`discover_examples`) and trains on what it finds usable.

One pass over the examples, on a few threads: a file's header gives its format, size and frame
count; its pixels are decoded (the only way to find a truncated file; JPEGs decode at reduced
scale, which still reads every byte); a 64-bit perceptual hash is taken from a thumbnail, and a
hash of its bytes. Then duplicates, shared names and caption lengths are compared across the set.

What training does with each finding (`CATEGORIES`; README.md has the same list):

skipped, the image does not train:
- missing: listed (metadata file, dataset row) but not there
- outside_folder: the image, its caption file or a sub-folder is a symlink leading out of the data
  folder (data.follow_symlinks: true reads it). Not read: a shared image set must not train on,
  or print from, whatever else this account can read
- zero_byte: an empty file
- not_image: no image format PIL reads (a text or HTML file named .png, a HEIC named .jpg); what a
  text file says is never shown, only that it is text
- corrupt: truncated or damaged (the header reads, the pixels do not), no pixels, unreadable
- too_large: over data.max_pixels; refused before any pixel is decoded (decompression bombs)
- caption_unreadable: its caption file is not UTF-8. Guessing the encoding would train on
  mojibake, and falling back to the instance prompt would silently change the label, so the
  image waits until its caption is fixed
- listed_twice: one file named twice in a metadata file; its first listing trains

trains, with a warning:
- wrong_extension: the content is another format (a PNG named .jpg); it is read by content
- animated: GIF/WebP/APNG (or multi-page TIFF) with more than one frame; the first frame trains
- small: smaller than its training shape (data.resolution, or its bucket); it is upscaled
- exact_duplicate, near_duplicate: the same bytes, or the same picture resized or re-saved
  (perceptual hash); every copy trains, so that picture weighs more
- missing_caption, empty_caption: trains with data.instance_prompt, else with an empty caption
- long_caption: over the text encoder's token limit; the end is cut (checked only when a
  tokenizer is at hand: `finetune dataset check` with a base model; training warns separately)
- same_stem: x.png and x.jpg both read x.txt and train with that caption (caches are keyed on the
  whole file name, so those do not collide)
- missing_mask, mask_size, empty_mask (with data.masks): no mask file for the image (or no alpha
  channel), a mask of another size, or one without a white pixel; the image trains unmasked

Training refuses to start only when nothing usable is left.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import FinetuneError, safe_name
from .buckets import nearest_bucket, training_buckets
from .images import oriented_size, pixel_limit, to_rgb, too_many_pixels, warn_about
from .sources import Example, find_examples, resolve_data_path


@dataclass(frozen=True)
class Category:
    key: str
    one: str  # "1 zero-byte file"
    many: str  # "3 zero-byte files"
    skips: bool  # True: the image is left out of training
    outcome: str = ""  # what training does with the image, when it trains

    def count(self, n: int) -> str:
        return f"{n} {self.one if n == 1 else self.many}"


CATEGORIES = {c.key: c for c in (  # the report's order: what is skipped first
    Category("missing", "missing file", "missing files", True),
    Category("outside_folder", "symlink leading out of the data folder", "symlinks leading out of the data folder",
             True),
    Category("zero_byte", "zero-byte file", "zero-byte files", True),
    Category("not_image", "file that is not an image", "files that are not images", True),
    Category("corrupt", "corrupt, truncated or unreadable image", "corrupt, truncated or unreadable images", True),
    Category("too_large", "image over data.max_pixels", "images over data.max_pixels", True),
    Category("caption_unreadable", "image whose caption file cannot be read",
             "images whose caption file cannot be read", True),
    Category("listed_twice", "file listed twice", "files listed twice", True, "the first listing trains"),
    Category("wrong_extension", "file whose extension does not match its content",
             "files whose extension does not match their content", False, "read by content"),
    Category("animated", "animated or multi-frame image", "animated or multi-frame images", False,
             "the first frame trains"),
    Category("small", "image smaller than the training size", "images smaller than the training size", False,
             "upscaled"),
    Category("exact_duplicate", "exact duplicate", "exact duplicates", False, "every copy trains"),
    Category("near_duplicate", "near duplicate", "near duplicates", False, "every copy trains"),
    Category("missing_caption", "image without a caption file", "images without a caption file", False),
    Category("empty_caption", "empty caption", "empty captions", False),
    Category("long_caption", "caption over the text encoder's token limit",
             "captions over the text encoder's token limit", False, "the end is cut"),
    Category("same_stem", "image sharing its name (and caption file) with another",
             "images sharing their name (and caption file) with another", False),
    # data.masks (masks.py): the image trains, with weight 1 everywhere.
    Category("missing_mask", "image without a usable mask", "images without a usable mask", False, "trains unmasked"),
    Category("mask_size", "mask of another size than its image", "masks of other sizes than their images", False,
             "trains unmasked"),
    Category("empty_mask", "mask without a white pixel", "masks without a white pixel", False, "trains unmasked"),
)}

_MAX_WORKERS = 8
# How many files per problem the training log names; `finetune dataset check` names them all.
_LOGGED_PER_CATEGORY = 5
_THUMB = 64  # side of the thumbnail the fingerprint is taken from
_HASH_SIDE = 32  # pHash: DCT of a 32x32 grey image, its 8x8 lowest frequencies against their median
# A resized or re-saved JPEG copy differs in 0-2 of the 64 bits; unrelated photos in about 32.
_NEAR_BITS = 6
# The hash sees only light and dark structure: two flat images, or two layouts alike in different
# colours, hash alike. Near duplicates must also agree on mean colour (0-255, per channel).
_NEAR_COLOUR = 10.0
_CHUNK = 512  # rows of the pairwise distance matrix computed at once (memory: 8 x _CHUNK x n bytes)
_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)
_FORMAT_EXTENSIONS = {"PNG": (".png",), "JPEG": (".jpg", ".jpeg"), "WEBP": (".webp",), "BMP": (".bmp",),
                      "TIFF": (".tif", ".tiff"), "GIF": (".gif",)}
# First bytes of the formats we train on: such a file that PIL cannot identify is damaged, not foreign.
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
               (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


@dataclass
class DatasetReport:
    """What the check found: the usable examples, and (file, detail) per finding category."""

    where: str
    total: int
    usable: list[Example] = field(default_factory=list)
    findings: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, category: str, name: str, detail: str = "") -> None:
        if category not in CATEGORIES:
            raise ValueError(f"unknown dataset check category {category!r}")
        self.findings.setdefault(category, []).append((name, detail))

    def names(self, category: str) -> list[str]:
        return [name for name, _ in self.findings.get(category, [])]

    @property
    def skipped(self) -> int:
        return self.total - len(self.usable)

    def summary(self, limit: int | None = None) -> list[str]:
        """Counts and file names per category; `limit` caps the names listed per category."""
        head = f"dataset check: {self.total} files in {safe_name(self.where)}: {len(self.usable)} usable"
        lines = [head + (f", {self.skipped} skipped" if self.skipped else "")]
        for c in CATEGORIES.values():
            found = self.findings.get(c.key)
            if not found:
                continue
            outcome = f"; {c.outcome}" if c.outcome else ""
            lines.append(f"{'skipped' if c.skips else 'warning'}: {c.count(len(found))}{outcome}")
            shown = found if limit is None else found[:limit]
            # File names come from outside: a newline in one must not start a forged line of its own.
            lines += ["  " + _finding(name, detail) for name, detail in shown]
            if len(shown) < len(found):
                lines.append(f"  ... and {len(found) - len(shown)} more (`finetune dataset check` lists them all)")
        return lines + [f"note: {n}" for n in self.notes]

    def raise_if_unusable(self) -> None:
        """One line naming the set and what is wrong with it, when nothing in it can train."""
        if self.usable:
            return
        bad = [(c, self.findings[c.key]) for c in CATEGORIES.values() if c.skips and c.key in self.findings]
        if not bad:
            raise FinetuneError(f"data.path: no images in {safe_name(self.where)}")
        counts = ", ".join(c.count(len(found)) for c, found in bad)
        where = safe_name(self.where)
        raise FinetuneError(f"data.path: no usable image in {where}: {counts} (first: {_finding(*bad[0][1][0])}); "
                            f"`finetune dataset check {where}` lists them all")


def _finding(name: str, detail: str) -> str:
    return f"{safe_name(name)}: {safe_name(detail)}" if detail else safe_name(name)


def check_dataset(cfg, base_dir: Path | None = None, tokenizer=None) -> DatasetReport:
    """Find the examples `cfg` (a DataConfig) names and check them."""
    where = resolve_data_path(cfg.path, base_dir)
    report = check_examples(find_examples(cfg, base_dir), cfg, where=where, tokenizer=tokenizer)
    if cfg.masks:
        from .masks import attach_masks

        report.usable = attach_masks(report.usable, cfg, base_dir, report)
    return report


def discover_examples(cfg, base_dir: Path | None = None, log: Callable[[str], None] = print) -> list[Example]:
    """The usable examples `cfg` (a DataConfig) names, for training: what cannot train is left out,
    and each finding is logged. Raises FinetuneError when the set is empty or nothing in it is usable."""
    report = check_dataset(cfg, base_dir)
    if report.findings or report.notes:
        for line in report.summary(limit=_LOGGED_PER_CATEGORY):
            log(line)
    report.raise_if_unusable()
    return report.usable


def check_examples(examples: list[Example], cfg, where=None, tokenizer=None) -> DatasetReport:
    """Check `examples` against `cfg` (a DataConfig: resolution, buckets, max_pixels, instance
    prompt). With a `tokenizer`, captions are measured against its model_max_length too."""
    report = DatasetReport(where=str(where if where is not None else cfg.path), total=len(examples))
    examples = _without_repeats(examples, report)
    kept = []
    for example, look in zip(examples, _inspect_all(examples, cfg)):
        problem = look.problem or _unreadable_caption(example)
        if problem:
            report.add(problem[0], example.key, problem[1])
            continue
        for category, detail in look.warnings:
            report.add(category, example.key, detail)
        kept.append((example, look))
    report.usable = [e for e, _ in kept]
    _duplicates(kept, report)
    _same_stems(report.usable, report)
    _captions(report.usable, cfg, report)
    if tokenizer is not None:
        _long_captions(report.usable, tokenizer, report)
    return report


def load_tokenizer(base: str | None, config: str | None = None):
    """A base model's CLIP tokenizer from files on this machine, never downloaded:
    (tokenizer, None), or (None, why there is none). `config` is model.config, which describes
    a single-file checkpoint (the file itself holds no tokenizer)."""
    if not base:
        return None, "no base model to take a tokenizer from (give --base MODEL or --recipe RECIPE)"
    where = config if Path(base).expanduser().is_file() else base
    if not where:
        return None, f"{base} is a single file and model.config names no model folder with a tokenizer"
    try:
        folder = _tokenizer_folder(where)
        # Without its files, transformers builds an empty tokenizer rather than failing: look first.
        if not any((folder / name).is_file() for name in ("vocab.json", "tokenizer.json")):
            return None, f"{where} has no tokenizer/ folder with vocab.json or tokenizer.json"
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(folder), None
    except Exception as e:  # any failure only means this one check is skipped, and says why
        return None, f"no tokenizer for {where} on this machine ({_first_line(e)})"


def _tokenizer_folder(where: str) -> Path:
    from ..tiny_models import BUILTIN_PREFIX, resolve_builtin

    if where.startswith(BUILTIN_PREFIX):
        return resolve_builtin(where[len(BUILTIN_PREFIX):]) / "tokenizer"
    folder = Path(where).expanduser()
    if not folder.is_dir():  # a hub id: only what is already in the local cache
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

        try:
            folder = Path(snapshot_download(where, allow_patterns=["tokenizer/*"], local_files_only=True))
        except HFValidationError:
            raise FinetuneError("neither a model folder nor a hub id") from None
        except LocalEntryNotFoundError:
            raise FinetuneError("not in the local hub cache, and nothing is downloaded") from None
    return folder / "tokenizer"


# ---------------------------------------------------------------- one pass over the files


class _Unusable(Exception):
    """An image that cannot train: args are (category, detail)."""


@dataclass
class _Look:
    """What one pass over one example found."""

    problem: tuple[str, str] | None = None  # why it cannot train
    warnings: list[tuple[str, str]] = field(default_factory=list)
    digest: bytes = b""  # of the encoded file: exact duplicates
    bits: np.ndarray | None = None  # 64-bit perceptual hash: near duplicates
    colour: np.ndarray | None = None  # mean RGB


def _inspect_all(examples: list[Example], cfg) -> list[_Look]:
    buckets = training_buckets(cfg)

    def look(example):
        return _inspect(example, buckets, cfg.max_pixels)

    workers = min(_MAX_WORKERS, os.cpu_count() or 1, len(examples))
    Image.init()  # PIL registers its plugins on first use; not from several threads at once
    with pixel_limit(cfg.max_pixels), _warnings_named_per_thread():  # process-wide: once around all threads
        if workers <= 1:
            return [look(e) for e in examples]
        # Decoding and hashing release the GIL for most of their time: threads divide the wall time.
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(look, examples))


_inspecting = threading.local()  # the file this thread is looking at, to name in its warnings


@contextlib.contextmanager
def _warnings_named_per_thread():
    """Library warnings (PIL's corrupt-EXIF one) name no file, and catch_warnings is process-wide:
    one recorder around every worker thread, each warning credited to the file its own thread (the
    one `showwarning` runs in) was inspecting, then re-issued naming it."""
    found: list[tuple[str, object]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *_, **__: found.append((getattr(_inspecting, "key", "?"), message))
        yield
    for key, message in found:
        warn_about(key, message)


def _inspect(example: Example, buckets, max_pixels: int) -> _Look:
    _inspecting.key = example.key
    look = _Look(problem=example.refused)
    if example.refused:
        return look
    try:
        source = _source(example)
        img = example.image if source is None else Image.open(source)
        # A dataset's own decoded image is left open (and full size): training uses it.
        with contextlib.nullcontext() if source is None else img:
            _look_at(img, example, look, buckets, max_pixels, own=source is not None)
            look.digest = _digest(example, img)
    except _Unusable as e:
        look.problem = e.args
    except _BOMB_ERRORS as e:
        look.problem = ("too_large", too_many_pixels(e, max_pixels))
    except UnidentifiedImageError:
        look.problem = _unidentified(_head(example))
    except (OSError, ValueError, SyntaxError, EOFError, FinetuneError) as e:
        look.problem = ("corrupt", _first_line(e))
    except Exception as e:  # a hostile file can break a PIL plugin in any way: it is still just unusable
        look.problem = ("corrupt", f"{type(e).__name__}: {_first_line(e)}")
    return look


def _source(example: Example):
    """What to open the image from: its file or bytes (None for a dataset row's decoded image)."""
    if example.data is not None:
        size = len(example.data)
        source = io.BytesIO(example.data)
    elif example.path is not None:
        try:
            size = example.path.stat().st_size
        except FileNotFoundError:
            raise _Unusable("missing", "no such file") from None
        source = example.path
    elif example.image is not None:
        return None
    else:
        raise _Unusable("missing", "this row holds no image")
    if not size:
        raise _Unusable("zero_byte", "0 bytes")
    return source


def _digest(example: Example, img: Image.Image) -> bytes:
    """A hash of the encoded file (of the pixels, for a decoded image): exact duplicates."""
    h = hashlib.blake2b(digest_size=16)
    if example.data is not None:
        h.update(example.data)
    elif example.path is not None:
        with open(example.path, "rb") as f:  # streamed: a large file is not held in memory twice
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    else:
        h.update(f"{img.mode} {img.size}".encode() + img.tobytes())
    return h.digest()


def _head(example: Example) -> bytes:
    if example.data is not None:
        return example.data[:512]
    with open(example.path, "rb") as f:
        return f.read(512)


def _look_at(img: Image.Image, example: Example, look: _Look, buckets, max_pixels: int, own: bool) -> None:
    if example.path is not None:
        lie = _extension_lie(example.path, img.format)
        if lie:
            look.warnings.append(("wrong_extension", lie))
    width, height = oriented_size(img, example.key)
    if width * height > max_pixels:  # PIL checked files as they opened; this covers decoded images
        raise _Unusable("too_large", too_many_pixels(width * height, max_pixels))
    frames = 1 if img.format == "MPO" else getattr(img, "n_frames", 1)  # MPO: a phone JPEG + its preview
    if frames > 1:
        look.warnings.append(("animated", f"{img.format}, {frames} frames"))
    target = nearest_bucket(width, height, buckets)
    if width < target[0] or height < target[1]:
        scale = max(target[0] / width, target[1] / height)
        look.warnings.append(("small", f"{width}x{height}, upscaled {scale:.1f}x to {target[0]}x{target[1]}"))
    if own:  # never shrink a caller's image object
        img.draft("RGB", (_THUMB, _THUMB))  # JPEG only: decodes at up to 1/8 scale, still reading every byte
    img.load()
    look.bits, look.colour = _fingerprint(img)


def _extension_lie(path: Path, fmt: str | None) -> str | None:
    fmt = "JPEG" if fmt == "MPO" else fmt  # MPO is a JPEG with extra pictures after it
    expected = _FORMAT_EXTENSIONS.get(fmt, ())
    if path.suffix.lower() in expected:
        return None
    rename = f"; rename it to {path.stem}{expected[0]}" if expected else ""
    return f"{fmt} data named {path.suffix}{rename}"


def _unidentified(head: bytes) -> tuple[str, str]:
    """(category, detail) for a file PIL does not recognise, from its first bytes: damaged, text, or
    a foreign format."""
    if _is_text(head):
        # Its content is not shown: the file may be anything (a password file linked in).
        return "not_image", "a text file, not an image"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "corrupt", "a damaged WEBP file (its header does not read)"
    for magic, fmt in _SIGNATURES:
        if head.startswith(magic):
            return "corrupt", f"a damaged {fmt} file (its header does not read)"
    if head[4:8] == b"ftyp":  # ISO media: HEIC from iPhones, AVIF, MP4
        kind = head[8:12].decode("ascii", "replace").strip()
        return "not_image", (f"an ISO media file ({kind}: HEIC, AVIF or video) that PIL cannot read here; "
                             f"convert it to JPEG or PNG")
    return "not_image", "no image format PIL can read"


def _is_text(head: bytes) -> bool:
    """Whether `head` looks like text: no NUL bytes, almost all printable."""
    if not head or b"\0" in head:
        return False
    text = head.decode("utf-8", errors="replace")
    printable = sum(ch != "\ufffd" and (ch.isprintable() or ch.isspace()) for ch in text)
    return printable >= 0.95 * len(text)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ---------------------------------------------------------------- perceptual hash


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)
    return np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))  # unscaled DCT-II: only signs matter


_DCT = _dct_matrix(_HASH_SIDE)


def _fingerprint(img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """pHash (64 bools) and mean RGB of an image, from a thumbnail, upright and on white."""
    scale = min(1.0, _THUMB / max(img.size))
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    small = to_rgb(img.resize(size, Image.Resampling.BOX))
    grey = small.convert("L").resize((_HASH_SIDE, _HASH_SIDE), Image.Resampling.BILINEAR)
    low = (_DCT @ np.asarray(grey, dtype=np.float64) @ _DCT.T)[:8, :8].ravel()
    return low > np.median(low), np.asarray(small, dtype=np.float32).mean(axis=(0, 1))


def _near_pairs(bits: np.ndarray, colours: np.ndarray) -> list[tuple[int, int, int]]:
    """(later, earlier, bits differing) for each picture that looks like an earlier one (the first)."""
    codes = np.packbits(bits, axis=1).view(np.uint64).ravel()  # one 64-bit word per picture
    pairs = []
    for start in range(0, len(codes), _CHUNK):
        block = codes[start:start + _CHUNK]
        distance = _popcount(block[:, None] ^ codes[None, :start + len(block)])
        later, earlier = np.nonzero(distance <= _NEAR_BITS)  # row-major: earliest match first in each row
        later += start
        alike = (earlier < later) & (np.abs(colours[later] - colours[earlier]).max(axis=-1) <= _NEAR_COLOUR)
        later, earlier = later[alike], earlier[alike]
        _, first = np.unique(later, return_index=True)
        pairs += [(int(later[i]), int(earlier[i]), int(distance[later[i] - start, earlier[i]])) for i in first]
    return pairs


_BITS_IN_BYTE = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)


def _popcount(words: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(words)
    return _BITS_IN_BYTE[words.view(np.uint8)].reshape(*words.shape, 8).sum(axis=-1)


# ---------------------------------------------------------------- across the set


def _without_repeats(examples: list[Example], report: DatasetReport) -> list[Example]:
    # Caches and logs are keyed on the example's key: one file listed twice would collide with itself.
    seen: set[str] = set()
    unique = []
    for e in examples:
        if e.key in seen:
            report.add("listed_twice", e.key, "listed again")
        else:
            seen.add(e.key)
            unique.append(e)
    return unique


def _unreadable_caption(example: Example) -> tuple[str, str] | None:
    issue = example.caption_issue
    return issue if issue and CATEGORIES[issue[0]].skips else None


def _duplicates(kept: list[tuple[Example, _Look]], report: DatasetReport) -> None:
    first_with: dict[bytes, Example] = {}
    distinct = []
    for example, look in kept:
        original = first_with.setdefault(look.digest, example)
        if original is example:
            distinct.append((example, look))
        else:
            report.add("exact_duplicate", example.key, f"same bytes as {original.key}")
    if len(distinct) < 2:
        return
    bits = np.stack([look.bits for _, look in distinct])
    colours = np.stack([look.colour for _, look in distinct])
    for later, earlier, differ in _near_pairs(bits, colours):
        report.add("near_duplicate", distinct[later][0].key,
                   f"looks like {distinct[earlier][0].key} ({differ} of 64 hash bits differ)")


def _same_stems(examples: list[Example], report: DatasetReport) -> None:
    first_reading: dict[Path, Example] = {}
    for e in examples:
        if e.caption_file is None:
            continue
        first = first_reading.setdefault(e.caption_file, e)
        if first is e:
            continue
        name = e.caption_file.name
        if e.caption_issue and e.caption_issue[0] == "missing_caption":
            report.add("same_stem", e.key, f"same name as {first.key}: a caption written to {name} would label both")
        else:
            report.add("same_stem", e.key, f"same name as {first.key}: both train with the caption in {name}")


def _captions(examples: list[Example], cfg, report: DatasetReport) -> None:
    instead = "uses data.instance_prompt" if cfg.instance_prompt else "trains with an empty caption"
    issues = [(e, e.caption_issue) for e in examples if e.caption_issue]
    missing = sum(issue[0] == "missing_caption" for _, issue in issues)
    if cfg.instance_prompt and missing and missing == len(examples):
        # Captioning every image with the instance prompt is a way to train, not a mistake.
        report.notes.append(f"no caption files: every image trains with data.instance_prompt {cfg.instance_prompt!r}")
        return
    for e, (category, detail) in issues:
        report.add(category, e.key, f"{detail}; {instead}")


def _long_captions(examples: list[Example], tokenizer, report: DatasetReport) -> None:
    limit = tokenizer.model_max_length
    captions = list(dict.fromkeys(e.caption for e in examples if e.caption))
    if not captions:
        return
    # verbose=False: the tokenizer would warn about each long caption itself.
    lengths = dict(zip(captions, map(len, tokenizer(captions, verbose=False).input_ids)))
    for e in examples:
        n = lengths.get(e.caption, 0)
        if n > limit:
            report.add("long_caption", e.key, f"{n} tokens, limit {limit}: the last {n - limit} are cut")
