"""How well the watermark hook's mark survives what happens to images after they leave us.

Images: half are made by the tiny SD1.5 (`finetune.tiny_models.sd15.build_tiny_sd15`, random weights: its
output is colourful noise-like texture, not a picture; generated at 256 px and resized to --size,
because at 512 px its attention dominates the run time on CPU), half are drawn scenes (sky gradient, sun,
mountain ridges, trees and houses, slight blur and grain) because no real photographs are
available offline. Flat areas make the drawn scenes the harder case; real photos were not measured.

Each image gets its own payload (as if from a different run), is marked by the watermark hook's
embedding, then changed: JPEG q=90/75/50; resized 0.5x/0.75x/1.5x (read as it is: the detector
tries common generation sizes itself; and resized back to the original size before reading);
centre crop keeping 90% of width and height; brightness +/-20% (PIL ImageEnhance). Detection is
`finetune.hooks.watermark.detect`:
  - blind: no known payloads, "found" only when all 20 check bits pass;
  - known: also given the payloads of all the benchmark's images (as `finetune watermark detect`
    is, from the run folders under outputs/), so a payload within 8 bits of a known one counts;
    only a match to the image's own payload is counted.
False positives: the same number of unmarked originals, read the same two ways.

Run (CPU, about 3.5 minutes; the figures in benchmarks/results/watermark_robustness.md):
    python benchmarks/watermark_robustness.py --n 40 --size 512 --methods dwtDctSvd,dwtDct,dwtDctSvd:20 \
        --out benchmarks/results/watermark_robustness.md
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.hooks import watermark as wm  # noqa: E402


def drawn_scene(seed: int, size: int) -> Image.Image:
    """A landscape drawn with PIL: gradients, shapes, blur, grain; some with cloud-like texture."""
    rng = np.random.default_rng(seed)
    w = h = size
    y = np.linspace(0, 1, h)[:, None, None]
    sky = rng.uniform(40, 160, 3) * (1 - y) + rng.uniform(120, 255, 3) * y
    img = np.broadcast_to(sky, (h, w, 3)).copy()
    if seed % 2:  # clouds: low-frequency noise, upsampled
        cloud = Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
        img += (np.asarray(cloud, dtype=np.float64)[..., None] - 128) * 0.25
    im = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    r = int(rng.integers(size // 20, size // 8))
    cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h // 3))
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(v) for v in rng.uniform(200, 255, 3)))
    for layer in range(int(rng.integers(2, 4))):
        xs = np.linspace(0, w, 12)
        ys = h * (0.45 + 0.12 * layer) - rng.uniform(0, h * 0.25, 12)
        d.polygon([(0, h)] + list(zip(xs.tolist(), ys.tolist())) + [(w, h)],
                  fill=tuple(int(v) for v in rng.uniform(20, 140, 3)))
    for _ in range(int(rng.integers(3, 12))):
        x, gy, s = int(rng.integers(0, w)), int(rng.integers(int(h * 0.7), h)), int(rng.integers(size // 40, size // 12))
        if rng.random() < 0.5:
            d.polygon([(x, gy - 3 * s), (x - s, gy), (x + s, gy)],
                      fill=(int(rng.integers(10, 60)), int(rng.integers(60, 140)), int(rng.integers(10, 60))))
        else:
            d.rectangle([x - s, gy - s, x + s, gy], fill=tuple(int(v) for v in rng.uniform(60, 220, 3)))
            d.polygon([(x - s, gy - s), (x, gy - 2 * s), (x + s, gy - s)], fill=tuple(int(v) for v in rng.uniform(60, 160, 3)))
    im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.5))))
    a = np.asarray(im, dtype=np.float64) + rng.normal(0, rng.uniform(1, 4), (h, w, 3))
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def tiny_sd_images(n: int, size: int, seed: int, gen_size: int) -> list[Image.Image]:
    import torch
    from diffusers import StableDiffusionPipeline

    from finetune.tiny_models.sd15 import build_tiny_sd15

    prompts = ["a photo of a dog", "a mountain landscape at dusk", "a red car in the city", "a bowl of fruit",
               "portrait of an old man", "a cat on a sofa", "a lighthouse by the sea", "a forest in autumn"]
    with tempfile.TemporaryDirectory() as tmp:
        pipe = StableDiffusionPipeline.from_pretrained(build_tiny_sd15(Path(tmp) / "tiny-sd15"))
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        out += pipe(prompts[i % len(prompts)], num_inference_steps=2, width=gen_size, height=gen_size, generator=g).images
    return [im if im.size == (size, size) else im.resize((size, size), Image.LANCZOS) for im in out]


def jpeg(im: Image.Image, q: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def resize(im: Image.Image, f: float, back: bool) -> Image.Image:
    out = im.resize((round(im.width * f), round(im.height * f)), Image.BICUBIC)
    return out.resize(im.size, Image.BICUBIC) if back else out


def crop(im: Image.Image, keep: float = 0.9) -> Image.Image:
    dx, dy = round(im.width * (1 - keep) / 2), round(im.height * (1 - keep) / 2)
    return im.crop((dx, dy, im.width - dx, im.height - dy))


CONDITIONS = {
    "none (PNG)": lambda im: im,
    "JPEG q=90": lambda im: jpeg(im, 90),
    "JPEG q=75": lambda im: jpeg(im, 75),
    "JPEG q=50": lambda im: jpeg(im, 50),
    "resize 0.5x": lambda im: resize(im, 0.5, False),
    "resize 0.75x": lambda im: resize(im, 0.75, False),
    "resize 1.5x": lambda im: resize(im, 1.5, False),
    "resize 0.5x, back to original size": lambda im: resize(im, 0.5, True),
    "resize 0.75x, back to original size": lambda im: resize(im, 0.75, True),
    "resize 1.5x, back to original size": lambda im: resize(im, 1.5, True),
    "crop 10% (centre, 90% of each side kept)": crop,
    "brightness +20%": lambda im: ImageEnhance.Brightness(im).enhance(1.2),
    "brightness -20%": lambda im: ImageEnhance.Brightness(im).enhance(0.8),
    "JPEG q=75 + resize 0.75x": lambda im: resize(jpeg(im, 75), 0.75, False),
}


def psnr(a: Image.Image, b: Image.Image) -> float:
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return 10 * np.log10(255 ** 2 / max(mse, 1e-12))


def pct(k: int, n: int) -> str:
    return f"{k}/{n} ({100 * k / n:.0f}%)"


def read_both(image, known, profiles):
    """detect() without and with the known payloads. The search is the same; with known payloads it may
    also stop early on a near match, so the blind search runs on its own only then."""
    rk = wm.detect(image, known, profiles)
    if rk["verdict"] == "found" and rk["check_bits"][0] < wm.CHECK_BITS:
        return wm.detect(image, {}, profiles), rk
    if rk["verdict"] == "found":
        return {**rk, "match": None}, rk
    return rk, rk  # not found with known payloads: not found by the check bits either


def run_method(images, kinds, method, strength, profiles):
    payloads = [wm.make_payload(f"run:bench-{i}", "bench-base") for i in range(len(images))]
    known = {wm.bits_to_hex(p): f"bench-{i}" for i, p in enumerate(payloads)}
    marked = [wm.embed_bits(im, p, method, strength) for im, p in zip(images, payloads)]
    # What the hook checks before keeping a mark (it writes the image unmarked, with a verdict, otherwise).
    verified = sum(bool((wm.decode_bits(m, wm.DEFAULT_BITS, method, strength) == p).all()) for m, p in zip(marked, payloads))
    rows = {}
    for name, change in CONDITIONS.items():
        blind = {"sd": 0, "drawn": 0}
        with_known = 0
        acc = []
        for i, im in enumerate(marked):
            changed = change(im)
            r, rk = read_both(changed, known, profiles)
            blind[kinds[i]] += r["verdict"] == "found"
            with_known += rk["verdict"] == "found" and rk["match"] == f"bench-{i}"
            # bits right at the size the blind detector settled on (where it found the mark, or its best guess)
            read = changed if r["size"] == changed.size else changed.resize(r["size"], Image.BICUBIC)
            bits = wm.decode_bits(read, wm.DEFAULT_BITS, method, strength)
            acc.append(float((bits == payloads[i]).mean()))
        rows[name] = (blind, with_known, float(np.mean(acc)))
    fp = [read_both(im, known, profiles) for im in images]
    fp_blind = sum(r["verdict"] == "found" for r, _ in fp)
    fp_known = sum(rk["verdict"] == "found" for _, rk in fp)
    quality = [psnr(a, b) for a, b in zip(images, marked)]
    return rows, fp_blind, fp_known, quality, verified, max(r["check_bits"][0] for r, _ in fp)


def small_images(images, method, strength, sides=(64, 128, 192)):
    """min_size_action=upscale: how often the mark verifies after embedding, and survives JPEG q=90."""
    out = {}
    for side in sides:
        ok = jpg = 0
        for i, im in enumerate(images):
            small = im.resize((side, side), Image.LANCZOS)
            bits = wm.make_payload(f"run:small-{i}", "bench-base")
            marked, f = wm.embed_small(small, bits, method, strength)
            back = marked.resize((side * f, side * f), Image.BICUBIC)
            ok += bool((wm.decode_bits(back, wm.DEFAULT_BITS, method, strength) == bits).all())
            jpg += wm.detect(jpeg(marked, 90), {}, [(method, strength, wm.DEFAULT_BITS)])["verdict"] == "found"
        out[side] = (ok, jpg, f)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=40, help="images in all: half tiny SD1.5, half drawn")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--sd-size", type=int, default=256, help="the tiny SD1.5 generates at this size, then its images are "
                    "resized (Lanczos) to --size: at 512 its attention makes generation the slowest part on CPU")
    ap.add_argument("--methods", default="dwtDctSvd,dwtDct",
                    help=f"comma-separated METHOD[:STRENGTH] (strength default {wm.DEFAULT_STRENGTH}), e.g. dwtDctSvd,dwtDctSvd:20")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for the tiny SD1.5 (1: immune to "
                    "OpenMP oversubscription when other jobs share the CPU, which can slow generation 30x)")
    ap.add_argument("--out", type=Path, help="also write the tables (markdown) here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    t0 = time.time()
    n_sd = args.n // 2
    images = tiny_sd_images(n_sd, args.size, args.seed, args.sd_size or args.size) + [drawn_scene(args.seed + i, args.size) for i in range(args.n - n_sd)]
    kinds = ["sd"] * n_sd + ["drawn"] * (args.n - n_sd)
    n_drawn = args.n - n_sd
    print(f"images ready at {time.time() - t0:.0f} s", flush=True)
    lines = [f"Command: `python benchmarks/watermark_robustness.py --n {args.n} --size {args.size} --sd-size {args.sd_size} "
             f"--methods {args.methods} --seed {args.seed}`", "",
             f"{args.n} images at {args.size}x{args.size}: {n_sd} from the tiny SD1.5 (random weights: noise-like "
             f"texture; generated at {args.sd_size or args.size} px, resized to {args.size}), {n_drawn} drawn scenes (gradients, shapes, blur, grain; no real photos). 64-bit payload "
             "(44 identifying bits + 20 check bits), one per image. \"blind\": found by the check bits alone; "
             "\"known\": also matched (within 8 bits) against the known payloads, counted only when it names the "
             "right image. Resizes without \"back\" are read as they are: the detector tries common generation "
             "sizes itself.", ""]
    for spec in args.methods.split(","):
        method, _, strength = spec.partition(":")
        strength = int(strength or wm.DEFAULT_STRENGTH)
        profiles = [(method, strength, wm.DEFAULT_BITS)]
        rows, fp_blind, fp_known, quality, verified, fp_best = run_method(images, kinds, method, strength, profiles)
        lines += [f"### {method}, strength {strength} (PSNR of the marked images: mean {np.mean(quality):.1f} dB, "
                  f"min {np.min(quality):.1f} dB)", "",
                  f"The embedded mark reads back exactly (the hook's check before it keeps a mark) in {pct(verified, args.n)} "
                  "of the images; the rows below use every marked image, verified or not.", "",
                  "| change | blind: tiny SD | blind: drawn | blind: all | known: all | bits right (mean) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, (blind, with_known, acc) in rows.items():
            lines.append(f"| {name} | {pct(blind['sd'], n_sd)} | {pct(blind['drawn'], n_drawn)} | "
                         f"{pct(blind['sd'] + blind['drawn'], args.n)} | {pct(with_known, args.n)} | {acc:.3f} |")
        lines.append(f"| **false positives** (unmarked originals) | | | {pct(fp_blind, args.n)} | {pct(fp_known, args.n)} | |")
        lines += ["", f"On the unmarked originals, the most check bits any reading agreed on was {fp_best}/{wm.CHECK_BITS} "
                  f"(all {wm.CHECK_BITS} are needed; a random payload agrees on 10 on average)."]
        small = small_images(images[:: max(1, args.n // 10)], method, strength)
        k = len(images[:: max(1, args.n // 10)])
        lines += ["", f"Images below the minimum (min_size_action: upscale; {k} images, downscaled):", "",
                  "| size | upscaled by | mark verifies after embedding | found after JPEG q=90 |", "| --- | --- | --- | --- |"]
        lines += [f"| {s}x{s} | {f} | {pct(ok, k)} | {pct(j, k)} |" for s, (ok, j, f) in small.items()]
        lines.append("")
        print(f"{method}: done at {time.time() - t0:.0f} s", flush=True)
    lines.append(f"Took {time.time() - t0:.0f} s on CPU.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
