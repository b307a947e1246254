"""What survives which edit: C2PA Content Credentials vs the invisible watermark, and what signing costs.

Images: drawn scenes (watermark_robustness.drawn_scene; no real photos offline), written through the
default output hooks (watermark, provenance, c2pa) with a local self-signed credential made in a
temporary config folder. Each written file is then edited as people and platforms do, and read by
`c2pa_sign.read` (credentials: valid / tampered / absent) and `watermark.detect` given the payloads the
manifest recorded (as `finetune provenance check` is, from outputs/).

Edits: the file as written; a pixel value changed in place with the manifest kept (a byte-level edit,
PNG rows rewritten at the same length); the `parameters` text chunk edited in place; re-saved as PNG by
PIL (what most editors do: pixels kept, metadata not carried over); JPEG q90 / q75; WebP q90; resize
0.5x; centre crop 10%; brightness +20%.

Cost: per image, encode + watermark + sign vs encode + watermark alone (seconds, ratio), and the
bytes the manifest adds.

Run (CPU, about a minute; the figures in benchmarks/results/provenance_robustness.md):
    python benchmarks/provenance_robustness.py --n 12 --size 512 --out benchmarks/results/provenance_robustness.md
"""

from __future__ import annotations

import argparse
import io
import os
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tests.helpers import png_chunks as chunks  # noqa: E402
from watermark_robustness import crop, drawn_scene, resize  # noqa: E402


def rewrite_chunk(data: bytes, kind: bytes, keyword: bytes, change) -> bytes:
    """`data` with the `kind` chunk named `keyword` replaced by change(body), CRC fixed, all else as it was."""
    for pos, k, body in chunks(data):
        if k == kind and body.startswith(keyword + b"\0"):
            new = change(body)
            chunk = struct.pack(">I", len(new)) + k + new + struct.pack(">I", zlib.crc32(k + new) & 0xFFFFFFFF)
            return data[:pos] + chunk + data[pos + 12 + len(body):]
    raise ValueError(f"no {kind!r} chunk")


def one_pixel(data: bytes) -> bytes:
    """One byte of the first row's pixels changed, the IDAT stream recompressed: the image differs in
    one pixel value and every other chunk (the manifest too) is kept."""
    idat = b"".join(body for _, k, body in chunks(data) if k == b"IDAT")
    raw = bytearray(zlib.decompress(idat))
    raw[5] ^= 0x01  # row 0: filter byte, then pixel 1's channels
    first = next(pos for pos, k, _ in chunks(data) if k == b"IDAT")
    rest = b"".join(data[pos:pos + 12 + len(body)] for pos, k, body in chunks(data) if k != b"IDAT" and pos > first)
    new = zlib.compress(bytes(raw))
    chunk = struct.pack(">I", len(new)) + b"IDAT" + new + struct.pack(">I", zlib.crc32(b"IDAT" + new) & 0xFFFFFFFF)
    return data[:first] + chunk + rest


def reencode(fmt: str, **kw):
    def edit(data: bytes) -> bytes:
        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").save(buf, format=fmt, **kw)
        return buf.getvalue()
    return edit


def pixels(f):
    def edit(data: bytes) -> bytes:
        buf = io.BytesIO()
        f(Image.open(io.BytesIO(data)).convert("RGB")).save(buf, format="PNG")
        return buf.getvalue()
    return edit


EDITS = {
    "none (the file as written)": lambda d: d,
    "one pixel value changed in place, manifest kept": one_pixel,
    "`parameters` text chunk edited in place": lambda d: rewrite_chunk(d, b"iTXt", b"parameters", lambda b: b.replace(b"Steps", b"steps", 1)),
    "re-saved as PNG by an editor (PIL)": reencode("PNG"),
    "JPEG q=90": reencode("JPEG", quality=90),
    "JPEG q=75": reencode("JPEG", quality=75),
    "WebP q=90": reencode("WEBP", quality=90),
    "resize 0.5x": pixels(lambda im: resize(im, 0.5, False)),
    "crop 10% (centre)": pixels(crop),
    "brightness +20%": pixels(lambda im: ImageEnhance.Brightness(im).enhance(1.2)),
}


def write_images(n: int, size: int, folder: Path, hook_configs) -> tuple[list[Path], float]:
    from finetune.hooks import OutputImage, Provenance, build_pipeline
    from finetune.hooks.pipeline import write_outputs

    pipeline = build_pipeline(hook_configs)
    paths, seconds = [], 0.0
    for i in range(n):
        prov = Provenance(prompt=f"scene {i}", seed=i, steps=25, guidance=7.5, width=size, height=size,
                          base_model="builtin:tiny-sd15", run=f"bench-{i}")
        item = OutputImage(drawn_scene(i, size), prov)
        t = time.perf_counter()
        paths += write_outputs([(folder / f"{i:03d}.png", pipeline.process(item))], folder)
        seconds += time.perf_counter() - t
    return paths, seconds / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["XDG_CONFIG_HOME"] = str(Path(tmp) / "config")  # never the user's own credential
        from finetune.hooks import c2pa_sign
        from finetune.hooks import watermark as wm

        unsigned = [{"type": "watermark"}, {"type": "provenance"}]
        write_images(2, args.size, Path(tmp) / "warm-up", None)  # first calls (numpy, pywt, c2pa) out of the timing
        plain, t_plain = write_images(args.n, args.size, Path(tmp) / "plain", unsigned)
        signed, t_signed = write_images(args.n, args.size, Path(tmp) / "signed", None)
        extra = sum(p.stat().st_size for p in signed) / args.n - sum(p.stat().st_size for p in plain) / args.n
        known, profiles = wm._known(Path(tmp) / "signed")
        rows = []
        for name, edit in EDITS.items():
            states, found = {}, 0
            for path in signed:
                data = edit(path.read_bytes())
                state = c2pa_sign.read(data)["status"]
                states[state] = states.get(state, 0) + 1
                found += wm.detect(Image.open(io.BytesIO(data)), known, profiles)["verdict"] == "found"
            shown = ", ".join(f"{k} {v}/{args.n}" for k, v in sorted(states.items()))
            rows.append(f"| {name} | {shown} | {found}/{args.n} ({100 * found / args.n:.0f}%) |")
    lines = [f"{args.n} drawn scenes at {args.size} px, default hooks, local self-signed credential.", "",
             "| edit | Content Credentials | watermark found |", "| --- | --- | --- |", *rows, "",
             f"Writing an image (watermark, provenance chunks, encode, write): {t_plain * 1000:.0f} ms without "
             f"signing, {t_signed * 1000:.0f} ms with ({t_signed / t_plain:.2f}x); the manifest adds "
             f"{extra / 1024:.1f} KiB per image."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        cmd = " ".join(["python", "benchmarks/provenance_robustness.py", *sys.argv[1:]])
        args.out.write_text(f"# Provenance robustness\n\n`{cmd}` ({time.strftime('%Y-%m-%d')})\n\n{text}\n")


if __name__ == "__main__":
    main()
