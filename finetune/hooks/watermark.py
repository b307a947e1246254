"""An invisible watermark that says what made an image, and a detector that reads it back.

Built on invisible-watermark (`imwatermark`): its per-block embedding rule (`EmbedDwtDctSvd` /
`EmbedMaxDct`.encode_frame: quantisation of one coefficient per 4x4 block of the Haar DWT's
low band, each payload bit repeated over every L-th block) on the image's luma. We do the colour
and wavelet transforms around it ourselves because the library's `encode()` (0.2.0) swaps the
horizontal and vertical detail bands on the way back (`idwt2((ca, (v, h, d)))`), which costs
10-20 dB of PSNR on its own (24.8 dB on a noise-like SD output, measured), and truncates and wraps
values (-1.5 -> 255) when it is given uint8 pixels. Decoding applies the library's per-block rule, vectorised (a test
checks it against `decode_frame` vote for vote).

The payload (64 bits by default) identifies what made the image, deterministically, so a
detected payload can be matched to a run folder later:

    [source: sha256(adapter file sha256s | run name | base name)][base model tag][check bits]
     payload_bits-32 bits                                          12 bits        20 bits

The check bits are a hash of the rest: an image the toolkit did not make passes them by chance
with probability 2^-20 per decoding attempt. The detector also accepts a payload that is within
a few bits of a known one (from run folders and manifests under `outputs/`). Several known
outputs can carry one payload (every image made from one base model without adapters; one adapter
file copied into two runs): the detector then lists them all, and names one only when nothing else fits.

Limits (measured by benchmarks/watermark_robustness.py; see benchmarks/results/): survives
lossless saving, JPEG and resizing (the detector tries common generation sizes); does not survive
cropping, brightness/contrast changes, rotation, or anyone who wants it gone. It is a label for
honest pipelines, not proof against a motivated adversary.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import Field

from ..cache import file_sha256
from ..data.images import pixel_limit
from ..errors import FinetuneError
from . import register_hook
from .base import Hook, HookConfig, OutputImage, Provenance, Verdict
from .pipeline import MANIFEST, read_manifest

METHODS = ("dwtDctSvd", "dwtDct")
DEFAULT_METHOD = "dwtDctSvd"
DEFAULT_STRENGTH = 30
DEFAULT_BITS = 64
BASE_BITS = 12
CHECK_BITS = 20
MIN_AREA = 256 * 256  # the library's minimum (encode/decode refuse smaller images)
BLOCK = 4
DOMAIN = b"finetune-watermark-v1\0"
# A decoded payload still matches a known one when at most 1 bit in KNOWN_TOLERANCE is wrong
# (64 bits: up to 8 wrong; a random payload comes that close to a given one with probability 2.8e-10).
KNOWN_TOLERANCE = 8
# Sizes the detector also tries when the image's own size does not read: the sizes images are
# usually generated at (SD1.x/2.x, SDXL buckets), and these longer sides with the image's aspect;
# only those of the image's aspect (within 2%) and within SEARCH_RATIO of its size.
STANDARD_SIZES = ((512, 512), (512, 768), (768, 512), (768, 768), (1024, 1024), (1152, 896), (896, 1152),
                  (1216, 832), (832, 1216), (1344, 768), (768, 1344), (1536, 640), (640, 1536))
SEARCH_SIDES = (256, 512, 768, 1024, 1536, 2048)
SEARCH_RATIO = 2.5
# The largest image `watermark detect` decodes unless told otherwise (--max-pixels). Decoding takes
# about 37 bytes a pixel (float RGB, luma, wavelet bands): 40 MP, which holds an 8K frame, is
# about 1.5 GB; a 140 KB PNG claiming 12000x12000 would take 5 GB.
DETECT_MAX_PIXELS = 40_000_000


# --- payload --------------------------------------------------------------------------------

def base_name(base: str | None) -> str:
    """The base model's name as it survives different spellings: `builtin:tiny-sd15`,
    `/models/tiny-sd15/` and `org/tiny-sd15` all give `tiny-sd15`."""
    if not base:
        return ""
    name = str(base).strip().replace("\\", "/").rstrip("/")
    if name.startswith("builtin:"):
        name = name[len("builtin:"):]
    return name.rsplit("/", 1)[-1]


def source_key(adapters=(), run: str | None = None, base_model: str | None = None) -> str:
    """What the payload's source field hashes: the adapter files (by content) if any, else the run
    (validation samples while training), else the base model alone."""
    hashes = sorted(a["sha256"] for a in adapters if a.get("sha256"))
    if hashes:
        return "adapters:" + ",".join(hashes)
    if run:
        return "run:" + run
    return "base:" + base_name(base_model)


def _hash_bits(data: bytes, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(hashlib.sha256(data).digest(), dtype=np.uint8))[:n]


def check_bits(id_bits: np.ndarray) -> np.ndarray:
    return _hash_bits(DOMAIN + bytes(np.asarray(id_bits, dtype=np.uint8)), CHECK_BITS)


def make_payload(source: str, base_model: str | None, n_bits: int = DEFAULT_BITS) -> np.ndarray:
    src = _hash_bits(b"source:" + source.encode(), n_bits - BASE_BITS - CHECK_BITS)
    tag = _hash_bits(b"base:" + base_name(base_model).encode(), BASE_BITS)
    ident = np.concatenate([src, tag])
    return np.concatenate([ident, check_bits(ident)]).astype(np.uint8)


def payload_for(prov: Provenance, n_bits: int = DEFAULT_BITS) -> np.ndarray:
    return make_payload(source_key(prov.adapters, prov.run, prov.base_model), prov.base_model, n_bits)


def bits_to_hex(bits) -> str:
    return np.packbits(np.asarray(bits, dtype=np.uint8)).tobytes().hex()


def hex_to_bits(text: str) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))


def check_ok(bits: np.ndarray) -> int:
    """How many of the check bits agree with the rest of the payload."""
    bits = np.asarray(bits, dtype=np.uint8)
    return int((check_bits(bits[:-CHECK_BITS]) == bits[-CHECK_BITS:]).sum())


# --- embedding and decoding -------------------------------------------------------------------

def _core(method: str):
    from imwatermark.dwtDctSvd import EmbedDwtDctSvd
    from imwatermark.maxDct import EmbedMaxDct

    return {"dwtDctSvd": EmbedDwtDctSvd, "dwtDct": EmbedMaxDct}[method]


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def embed_bits(image: Image.Image, bits, method: str = DEFAULT_METHOD, strength: float = DEFAULT_STRENGTH) -> Image.Image:
    """`image` with `bits` embedded in its luma (same size and mode; alpha kept)."""
    import pywt

    if image.width * image.height < MIN_AREA:
        raise ValueError(f"{image.width}x{image.height} is below the watermark's minimum area ({MIN_AREA} pixels)")
    bits = [int(b) for b in bits]
    rgb = _rgb(image)
    y = _luma(rgb)
    r4, c4 = y.shape[0] // 4 * 4, y.shape[1] // 4 * 4
    ca, (h, v, d) = pywt.dwt2(y[:r4, :c4], "haar")
    _core(method)(bits, wmLen=len(bits), block=BLOCK).encode_frame(ca, strength)
    delta = np.zeros_like(y)
    delta[:r4, :c4] = pywt.idwt2((ca, (h, v, d)), "haar") - y[:r4, :c4]
    # Adding the same amount to R, G and B changes luma by that amount and leaves chroma alone.
    out = Image.fromarray(np.clip(np.round(rgb + delta[..., None]), 0, 255).astype(np.uint8), "RGB")
    return _restore_mode(out, image)


def _restore_mode(out: Image.Image, like: Image.Image) -> Image.Image:
    if like.mode == "RGBA":
        out.putalpha(like.getchannel("A"))
    elif like.mode == "L":
        out = out.convert("L")
    return out


def _blocks(frame: np.ndarray) -> np.ndarray:
    """The frame's 4x4 blocks in the library's order (row by row), shape (n, 4, 4)."""
    nr, nc = frame.shape[0] // BLOCK, frame.shape[1] // BLOCK
    return frame[:nr * BLOCK, :nc * BLOCK].reshape(nr, BLOCK, nc, BLOCK).transpose(0, 2, 1, 3).reshape(-1, BLOCK, BLOCK)


def block_votes(frame: np.ndarray, method: str, strength: float) -> np.ndarray:
    """Each block's bit, by the library's rule (`infer_dct_svd` / `infer_dct_matrix`), vectorised.
    dwtDctSvd: the largest singular value of the block's DCT, which is the block's own (the DCT is
    orthonormal); dwtDct (0.2.0): the largest-magnitude non-DC coefficient of the block itself."""
    b = _blocks(frame)
    if method == "dwtDctSvd":
        val = np.linalg.svd(b, compute_uv=False)[:, 0]
    else:
        flat = b.reshape(len(b), -1)
        pos = np.argmax(np.abs(flat[:, 1:]), axis=1) + 1
        val = np.abs(flat[np.arange(len(flat)), pos])
    return (val % strength > 0.5 * strength).astype(np.float64)


def decode_scores(image: Image.Image, n_bits: int = DEFAULT_BITS, method: str = DEFAULT_METHOD,
                  strength: float = DEFAULT_STRENGTH) -> np.ndarray:
    """Per payload bit, the fraction of its blocks voting 1 (a bit reads as 1 above 0.5)."""
    import pywt

    y = _luma(_rgb(image))
    r4, c4 = y.shape[0] // 4 * 4, y.shape[1] // 4 * 4
    ca, _ = pywt.dwt2(y[:r4, :c4], "haar")
    votes = block_votes(ca, method, strength)
    if len(votes) < n_bits:
        return np.full(n_bits, 0.5)
    idx = np.arange(len(votes)) % n_bits
    return np.bincount(idx, weights=votes, minlength=n_bits) / np.bincount(idx, minlength=n_bits)


def decode_bits(image: Image.Image, n_bits: int = DEFAULT_BITS, method: str = DEFAULT_METHOD,
                strength: float = DEFAULT_STRENGTH) -> np.ndarray:
    # The library's threshold: mean * 255 > 127.
    return (decode_scores(image, n_bits, method, strength) * 255 > 127).astype(np.uint8)


def upscale_factor(width: int, height: int) -> int:
    """The integer factor that brings a small image to the minimum area (1 if it is already there)."""
    if width * height >= MIN_AREA:
        return 1
    return math.ceil(math.sqrt(MIN_AREA / (width * height)))


def embed_small(image: Image.Image, bits, method: str, strength: float) -> tuple[Image.Image, int]:
    """Embed into an image below the minimum size: upscale by an integer factor, embed there, and
    add the watermark's change (downscaled) to the original pixels, so the image itself is not
    resampled. The detector upscales by the same factor, which it derives from the size."""
    f = upscale_factor(image.width, image.height)
    big = image.convert("RGB").resize((image.width * f, image.height * f), Image.BICUBIC)
    marked = embed_bits(big, bits, method, strength)
    delta = np.asarray(marked, dtype=np.float64) - np.asarray(big, dtype=np.float64)
    small = np.stack([np.asarray(Image.fromarray(delta[..., c].astype(np.float32), "F").resize(image.size, Image.BOX))
                      for c in range(3)], axis=-1)
    out = np.clip(np.round(_rgb(image) + small), 0, 255).astype(np.uint8)
    return _restore_mode(Image.fromarray(out, "RGB"), image), f


# --- the hook ---------------------------------------------------------------------------------

class WatermarkConfig(HookConfig):
    type: Literal["watermark"] = "watermark"
    method: Literal["dwtDctSvd", "dwtDct"] = Field(
        DEFAULT_METHOD, description="invisible-watermark's embedding rule. dwtDctSvd survives JPEG much better "
                                    "(benchmarks/results/watermark_robustness.md); dwtDct is what diffusers' SDXL uses.")
    strength: int = Field(DEFAULT_STRENGTH, ge=4, le=96, description=(
        "Quantisation step: higher survives JPEG better and is more visible (30: ~45 dB PSNR; 20: ~48 dB). "
        "The detector must be told a non-default value (it reads the recipes and manifests under outputs/)."))
    payload_bits: int = Field(DEFAULT_BITS, ge=48, le=128, multiple_of=8, description=(
        f"Bits embedded: the source hash, a {BASE_BITS}-bit base-model tag and {CHECK_BITS} check bits. "
        "Fewer bits: more repetitions of each, a little more robust; a shorter source hash."))
    min_size_action: Literal["upscale", "reject", "skip_with_verdict"] = Field("upscale", description=(
        "Images below 256x256 pixels of area (the method's minimum): embed on an upscaled copy and add the "
        "change back at the original size (kept only if it verifies); reject the image; or write it unmarked "
        "with a verdict that says so."))
    on_failure: Literal["keep_unmarked", "reject"] = Field("keep_unmarked", description=(
        "When the mark does not read back right after embedding (flat or saturated images; a small image "
        "whose upscaled mark did not survive): write the image unmarked with a verdict saying so, or reject it."))


@register_hook("watermark")
class WatermarkHook(Hook):
    """Embeds a payload naming the adapters (by file hash), run and base model that made the image."""

    name = "watermark"
    Config = WatermarkConfig

    def process(self, item: OutputImage) -> OutputImage:
        cfg = self.cfg
        bits = payload_for(item.provenance, cfg.payload_bits)
        payload = bits_to_hex(bits)
        img = item.image
        w, h = img.size
        details = {"payload": payload, "method": cfg.method, "strength": cfg.strength, "payload_bits": cfg.payload_bits}
        small = w * h < MIN_AREA
        if small and cfg.min_size_action != "upscale":
            reason = (f"{w}x{h} is below the watermark's minimum area of 256x256 pixels; "
                      f"min_size_action: {cfg.min_size_action}")
            return self._unmarked(item, reason, cfg.min_size_action == "reject", details)
        if small:
            marked, factor = embed_small(img, bits, cfg.method, cfg.strength)
            details["upscaled"] = factor
            check = marked.resize((w * factor, h * factor), Image.BICUBIC)
        else:
            marked = check = embed_bits(img, bits, cfg.method, cfg.strength)
        got = decode_bits(check, cfg.payload_bits, cfg.method, cfg.strength)
        wrong = int((got != bits).sum())
        if wrong:
            how = f"upscaled x{details['upscaled']} for a {w}x{h} image" if small else f"{w}x{h}"
            reason = (f"the watermark did not read back after embedding ({wrong}/{len(bits)} bits wrong; {how}); "
                      f"on_failure: {cfg.on_failure}")
            return self._unmarked(item, reason, cfg.on_failure == "reject", details)
        item.image = marked
        item.text["finetune_watermark"] = json.dumps({"watermarked": True, **details,
                                                      "source": _describe_source(item.provenance)})
        item.verdicts.append(Verdict(self.name, "transform", details={**details, "watermarked": True}))
        return item

    def _unmarked(self, item: OutputImage, reason: str, reject: bool, details: dict) -> OutputImage:
        details = {**details, "watermarked": False}
        if reject:
            return item.reject(self.name, reason, **details)
        item.text["finetune_watermark"] = json.dumps({"watermarked": False, "reason": reason})
        item.verdicts.append(Verdict(self.name, "pass", reason, details))
        return item


def _describe_source(prov: Provenance) -> str:
    if any(a.get("sha256") for a in prov.adapters):
        names = ", ".join(f"{Path(a['path']).name} ({a['sha256'][:12]})" for a in prov.adapters if a.get("sha256"))
        return f"adapters {names} on {base_name(prov.base_model) or '?'}"
    if prov.run:
        return f"run {prov.run} on {base_name(prov.base_model) or '?'}"
    return f"base model {base_name(prov.base_model) or '?'}"


# --- what we know was made here ----------------------------------------------------------------

@dataclass
class KnownPayload:
    """Everything known to carry one payload. The watermark cannot tell these apart, so each is a
    candidate: `sources`, what the run folders could have made it with ("run a, adapter
    a.safetensors", "base model tiny-sd15 without adapters"), each once however many recipes name
    it; `images`, output folder ("gen/") -> the files whose manifest row records the payload."""

    sources: list[str] = field(default_factory=list)
    images: dict[str, list[str]] = field(default_factory=dict)

    def add_source(self, description: str) -> None:
        description = _shown(description)
        if description not in self.sources:
            self.sources.append(description)

    def add_image(self, folder: str, file: str) -> None:
        files = self.images.setdefault(_shown(folder), [])
        if _shown(file) not in files:
            files.append(_shown(file))

    def merge(self, other: KnownPayload) -> None:
        for s in other.sources:
            self.add_source(s)
        for folder, files in other.images.items():
            for f in files:
                self.add_image(folder, f)

    def candidates(self) -> list[str]:
        """Every source, then every folder of known images ("gen/: 3 images (a.png, b.png, c.png)")."""
        return [*self.sources, *(_image_group(folder, files) for folder, files in self.images.items())]

    def describe(self) -> str:
        """One line that names a single candidate only when the evidence fits no other: the source,
        or all of them; then where images with this payload were seen."""
        parts = []
        if len(self.sources) == 1:
            parts.append(self.sources[0])
        elif self.sources:
            parts.append(f"one of {len(self.sources)} known sources (the watermark cannot tell them apart): "
                         + "; ".join(self.sources))
        groups = [_image_group(folder, files) for folder, files in self.images.items()]
        if self.sources and self.images:
            parts.append("seen in " + ", ".join(f"{folder} ({_count(files)})" for folder, files in self.images.items()))
        elif len(groups) == 1:
            parts.append("seen in " + groups[0])
        elif groups:
            parts.append(f"seen in {len(groups)} output folders: " + "; ".join(groups))
        return "; ".join(parts)


def _count(files: list[str]) -> str:
    return f"{len(files)} image{'' if len(files) == 1 else 's'}"


def _image_group(folder: str, files: list[str]) -> str:
    names = ", ".join(files[:3]) + (", ..." if len(files) > 3 else "")
    return f"{folder}: {_count(files)} ({names})"


def _run_folders(outputs_dir: Path) -> list[Path]:
    found = [outputs_dir] if (outputs_dir / "recipe.yaml").is_file() else []
    return found + sorted(p.parent for p in outputs_dir.glob("*/recipe.yaml"))


def _read_recipe(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _profile(raw: dict) -> tuple[str, int, int] | None:
    try:
        return (str(raw.get("method", DEFAULT_METHOD)), int(raw.get("strength", DEFAULT_STRENGTH)),
                int(raw.get("payload_bits", DEFAULT_BITS)))
    except (TypeError, ValueError):  # a hand-edited recipe or manifest: its other payloads still count
        return None


def _is_payload(text) -> bool:
    try:
        return isinstance(text, str) and len(bytes.fromhex(text)) > 0
    except ValueError:
        return False


def _known(outputs_dir: Path) -> tuple[dict[str, KnownPayload], list[tuple[str, int, int]]]:
    outputs_dir = Path(outputs_dir)
    known: dict[str, KnownPayload] = {}
    profiles: list[tuple[str, int, int]] = []

    if not outputs_dir.is_dir():
        return known, profiles
    for run_dir in _run_folders(outputs_dir):
        recipe = _read_recipe(run_dir / "recipe.yaml")
        base = (recipe.get("model") or {}).get("base")
        hooks = (recipe.get("output") or {}).get("hooks") or []
        lengths = {DEFAULT_BITS}
        for raw in hooks:
            if isinstance(raw, dict) and raw.get("type") == "watermark" and _profile(raw):
                profiles.append(_profile(raw))
                lengths.add(_profile(raw)[2])
        run = run_dir.name
        for n in sorted(lengths):
            named: set[str] = set()

            def add(source: str, description: str) -> None:
                # The same bytes twice in one run (a final adapter identical to its last checkpoint)
                # are one adapter: named once, top-level first. Other runs still add theirs.
                if source not in named:
                    named.add(source)
                    known.setdefault(bits_to_hex(make_payload(source, base, n)), KnownPayload()).add_source(description)

            add("run:" + run, f"run {run} (samples while training)")
            folders: dict[Path, list[str]] = {}
            for f in sorted(run_dir.rglob("*.safetensors"), key=lambda p: (len(p.parts), str(p))):
                if f.name.startswith(".") or any(p.startswith(".tmp") for p in f.relative_to(run_dir).parts):
                    continue
                digest = file_sha256(f)
                folders.setdefault(f.parent, []).append(digest)
                add("adapters:" + digest, f"run {run}, adapter {f.relative_to(run_dir).as_posix()}")
            for folder, digests in folders.items():  # `--lora FOLDER` loads every file in it
                if len(digests) > 1:
                    rel = folder.relative_to(run_dir).as_posix()
                    add("adapters:" + ",".join(sorted(digests)),
                        f"run {run}, adapters in {'the run folder' if rel == '.' else rel}")
            # Every run on this base knows this one; it is one source, and it names no run.
            add("base:" + base_name(base), f"base model {base_name(base)} without adapters")
    # Manifests record every payload the watermark hook embedded, with its file.
    for manifest in sorted(outputs_dir.rglob(MANIFEST)):
        try:
            rows = read_manifest(manifest.parent)
        except (OSError, UnicodeDecodeError):  # one unreadable manifest must not stop the detection
            continue
        where = manifest.parent.relative_to(outputs_dir).as_posix() + "/" if manifest.parent != outputs_dir else "./"
        for row in rows:
            for v in row.get("verdicts") or []:
                if isinstance(v, dict) and v.get("hook") == "watermark" and v.get("watermarked") \
                        and _is_payload(v.get("payload")):
                    if row.get("file"):  # a row rejected after marking wrote no file: no image to name
                        known.setdefault(v["payload"].lower(), KnownPayload()).add_image(where, str(row["file"]))
                    if _profile(v):
                        profiles.append(_profile(v))
    return known, profiles


def known_payloads(outputs_dir: Path) -> dict[str, KnownPayload]:
    """Payload hex -> what is known to carry it, for everything the run folders under `outputs_dir`
    could have made (each run's samples, each adapter file and each folder of them, its base model
    alone) and every image a manifest there records. Several runs can share a payload (one base
    model, one adapter file copied): the KnownPayload then lists them all."""
    return _known(Path(outputs_dir))[0]


# --- detection --------------------------------------------------------------------------------

def _candidate_sizes(w: int, h: int) -> list[tuple[int, int]]:
    f = upscale_factor(w, h)
    # Nothing is marked below the minimum area: a small image is read at the size it was marked at.
    sizes = [(w, h)] if f == 1 else [(w * f, h * f)]
    aspect = w / h
    scaled = [(s, max(8, round(s / aspect / 8) * 8)) if w >= h else (max(8, round(s * aspect / 8) * 8), s)
              for s in SEARCH_SIDES]
    for size in [*STANDARD_SIZES, *scaled]:
        ratio = size[0] / w
        if (size not in sizes and size[0] * size[1] >= MIN_AREA and abs(size[0] / size[1] / aspect - 1) < 0.02
                and 1 / SEARCH_RATIO <= ratio <= SEARCH_RATIO):
            sizes.append(size)
    return sizes


def _match(bits: np.ndarray, known: dict[str, KnownPayload | str], exact: bool
           ) -> tuple[KnownPayload, int, str] | None:
    """What is known to carry the payload this decodes to, with the bits equal to it and its hex.
    When the check bits passed: the payload with the same source and base fields, else every one
    with the same source field (made on another base model). Otherwise every known payload at the
    nearest distance, if that is at most 1 bit in KNOWN_TOLERANCE. Evidence that fits several
    payloads is merged, never settled by which was found first."""
    n = len(bits)
    src = n - BASE_BITS - CHECK_BITS
    hits = []
    for hx, entry in known.items():
        kb = hex_to_bits(hx)
        if len(kb) != n:
            continue
        same = int((kb == bits).sum())
        if exact and (kb[:n - CHECK_BITS] == bits[:n - CHECK_BITS]).all():
            return _as_known(entry), same, hx
        if (exact and (kb[:src] == bits[:src]).all()) or (not exact and n - same <= n // KNOWN_TOLERANCE):
            hits.append((same, hx, _as_known(entry)))
    if not exact and hits:
        top = max(h[0] for h in hits)
        hits = [h for h in hits if h[0] == top]
    if not hits:
        return None
    hits.sort(key=lambda h: (-h[0], h[1]))
    merged = KnownPayload()
    for _, _, entry in hits:
        if exact:  # the same source on another base: not the images recorded with the recipe's base
            for candidate in entry.candidates():
                merged.add_source(candidate + ", but on another base model")
        else:
            merged.merge(entry)
    return merged, hits[0][0], hits[0][1]


def _as_known(entry: KnownPayload | str) -> KnownPayload:
    # A plain description (a caller's own table of payloads) is one source.
    return entry if isinstance(entry, KnownPayload) else KnownPayload(sources=[_shown(entry)])


def open_within(path: Path, max_pixels: int = DETECT_MAX_PIXELS) -> Image.Image:
    """The image file at `path` as RGB, decoded only once its header says it has at most
    `max_pixels` pixels; otherwise a FinetuneError saying why it was not read (one line)."""
    path = Path(path)
    if not path.is_file():  # a folder, a pipe or a device would fail late, or never
        raise FinetuneError("no such file" if not path.exists() else "not a regular file")
    try:
        # PIL's own limit is lifted for the header alone, so that the size can be read and named.
        with pixel_limit(None):
            img = Image.open(path)
    except UnidentifiedImageError:
        raise FinetuneError("not an image PIL can read") from None
    except OSError as e:
        raise FinetuneError(f"cannot open ({e.strerror or _first_line(e)})") from None
    except (ValueError, SyntaxError, EOFError) as e:
        raise FinetuneError(f"not an image PIL can read ({_first_line(e)})") from None
    with img:
        w, h = img.size
        if w * h > max_pixels:
            raise FinetuneError(f"{w}x{h} is {w * h:,} pixels, over the limit of {max_pixels:,} "
                                "(--max-pixels); not decoded")
        try:
            return img.convert("RGB")
        except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated or corrupt pixel data
            raise FinetuneError(f"cannot decode ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= 120 else text[:120] + "..."


def detect(image: Image.Image | str | Path, known: dict[str, KnownPayload | str] | None = None,
           profiles: list[tuple[str, int, int]] | None = None, max_pixels: int = DETECT_MAX_PIXELS) -> dict:
    """Look for our watermark, blind (no original needed).

    Tries each profile (method, strength, payload bits: the default first, then `profiles`) on the
    image as it is (below the minimum area: upscaled by the factor small images are marked at),
    then resized to the usual generation sizes of its aspect. "found" when all check bits agree
    with the payload, or when at most 1 bit in KNOWN_TOLERANCE differs from one in `known`
    (payload hex -> KnownPayload, from `known_payloads`; a plain string counts as one source).

    Returns a dict: verdict ("found"/"not found"), payload (hex as decoded; the best guess when not
    found), check_bits ((agreeing, CHECK_BITS)), match (one line describing every known source and
    image that fits, naming one only when nothing else does; or None), candidates (each of those, a
    line apiece, sources first; [] without a match), match_bits ((bits equal to the nearest known
    payload, payload bits)), match_payload (its hex), method, strength,
    payload_bits, size (where it was read), image_size, confidence (0 random .. 1 every block
    agrees), tried (readings made). A file over `max_pixels` or unreadable raises FinetuneError."""
    image = image.convert("RGB") if isinstance(image, Image.Image) else open_within(image, max_pixels)
    original_size = image.size
    known = known or {}
    todo = [(DEFAULT_METHOD, DEFAULT_STRENGTH, DEFAULT_BITS)]
    for p in profiles or []:
        if p not in todo:
            todo.append(p)
    best = None
    tried = 0
    for size in _candidate_sizes(*image.size):
        img = image if size == image.size else image.resize(size, Image.BICUBIC)
        for method, strength, n_bits in todo:
            tried += 1
            scores = decode_scores(img, n_bits, method, strength)
            bits = (scores * 255 > 127).astype(np.uint8)
            checks = check_ok(bits)
            result = {"verdict": "not found", "payload": bits_to_hex(bits), "check_bits": (checks, CHECK_BITS),
                      "method": method, "strength": strength, "payload_bits": n_bits, "size": size,
                      "image_size": original_size, "confidence": round(float(np.abs(scores - 0.5).mean() * 2), 3),
                      "match": None, "candidates": [], "match_bits": None, "match_payload": None}
            if checks == CHECK_BITS:
                result["verdict"] = "found"
                m = _match(bits, known, exact=True)
                if m:
                    result.update(_matched(*m, n_bits))
                result["tried"] = tried
                return result
            m = _match(bits, known, exact=False)
            if m:
                result.update(verdict="found", **_matched(*m, n_bits), tried=tried)
                return result
            if best is None or (checks, result["confidence"]) > (best["check_bits"][0], best["confidence"]):
                best = result
    best["tried"] = tried
    return best


def _matched(entry: KnownPayload, same: int, hx: str, n_bits: int) -> dict:
    return {"match": entry.describe(), "candidates": entry.candidates(), "match_bits": (same, n_bits),
            "match_payload": hx}


def known_profiles(outputs_dir: Path) -> list[tuple[str, int, int]]:
    """(method, strength, payload_bits) of every watermark configured in a recipe or recorded in a
    manifest under `outputs_dir`: the detector tries these besides the default."""
    return list(dict.fromkeys(_known(Path(outputs_dir))[1]))


def detect_report(paths: list[Path], outputs_dir: Path = Path("outputs"),
                  max_pixels: int | None = None) -> tuple[list[str], int]:
    """One printable line per file, each file on its own: a file that cannot be checked (missing,
    not an image, corrupt, over `max_pixels`) is answered `skipped: why` and the rest are still
    checked. Exit code: 0 when every file carries our watermark, 1 when every file was checked and
    some carry none, 2 when some file was skipped. `max_pixels`: None for DETECT_MAX_PIXELS."""
    max_pixels = max_pixels or DETECT_MAX_PIXELS
    known, profiles = _known(Path(outputs_dir))
    profiles = list(dict.fromkeys(profiles))
    lines, code = [], 0
    for path in paths:
        try:
            r = detect(Path(path), known, profiles, max_pixels)
        except FinetuneError as e:
            lines.append(f"{_shown(path)}: skipped: {e}")
            code = 2
            continue
        except MemoryError:
            lines.append(f"{_shown(path)}: skipped: out of memory while decoding (a lower --max-pixels refuses it unread)")
            code = 2
            continue
        lines.append(f"{_shown(path)}: {_answer(r, outputs_dir)}")
        code = max(code, 0 if r["verdict"] == "found" else 1)
    return lines, code


def _shown(path) -> str:
    # A newline or escape sequence in a file name must not forge or garble a line of the report.
    text = str(path)
    return text if text.isprintable() else repr(text)


def _answer(r: dict, outputs_dir: Path) -> str:
    checks = f"check bits {r['check_bits'][0]}/{r['check_bits'][1]}"
    if r["verdict"] != "found":
        return f"not found ({checks} at best), unknown"
    where = "" if r["size"] == r["image_size"] else f", read at {r['size'][0]}x{r['size'][1]}"
    bits = ""
    if r["match_bits"]:
        bits = f", {r['match_bits'][0]}/{r['match_bits'][1]} bits match"
        if r["match_payload"] != r["payload"]:
            bits += f" known payload {r['match_payload']}"
    made = r["match"] or f"unknown (no run or manifest under {_shown(outputs_dir)} has this payload)"
    return f"found, payload {r['payload']}, {checks}{bits}{where}, {r['method']}: {made}"
