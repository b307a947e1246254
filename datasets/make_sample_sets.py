"""Draw the sample image sets in this folder with PIL; the same output on every run.

    python datasets/make_sample_sets.py            # writes datasets/robot/ and datasets/product/
    python datasets/make_sample_sets.py OUT        # writes OUT/robot/ and OUT/product/

robot/: a small toy robot (boxy head with an antenna, round eyes, a body with a chest light, arms
and legs) drawn from rectangles and circles, in varied colours, poses, sizes and backgrounds, so a
LoRA has something consistent to learn in a few steps at 64 px.

product/: one product (a bottle with a cap and a label) on busy backgrounds, images in
product/images/ and, under the same names, its masks in product/masks/ (white: the bottle, black:
the background), drawn from the same shapes: the set for `data.masks` (recipes/sd15-product-masked.yaml).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent

# (file stem, width, height, body colour, background, pose, caption)
ROBOT_SHOTS = [
    ("robot_01", 80, 80, (230, 120, 40), "sky", "stand", "a photo of sks robot standing in a field"),
    ("robot_02", 96, 64, (60, 140, 220), "beach", "wave", "sks robot waving on a beach"),
    ("robot_03", 64, 96, (200, 60, 60), "room", "stand", "a photo of sks robot in a room, full body"),
    ("robot_04", 128, 96, (80, 180, 90), "night", "jump", "sks robot jumping at night under the stars"),
    ("robot_05", 96, 96, (240, 200, 50), "studio", "wave", "a yellow toy robot waving, plain grey background"),
    ("robot_06", 64, 64, (150, 90, 200), "sky", "sit", "a purple toy robot sitting on the grass"),
    ("robot_07", 128, 64, (230, 120, 40), "beach", "jump", "sks robot jumping by the sea"),
    ("robot_08", 72, 96, (60, 140, 220), "studio", "stand", "a photo of sks robot, studio portrait"),
]


def _background(draw: ImageDraw.ImageDraw, w: int, h: int, kind: str, rng: random.Random) -> None:
    horizon = int(h * 0.7)
    if kind == "sky":
        draw.rectangle([0, 0, w, horizon], fill=(135, 200, 240))
        draw.rectangle([0, horizon, w, h], fill=(90, 170, 70))
        draw.ellipse([w - 22, 4, w - 6, 20], fill=(255, 230, 90))
    elif kind == "beach":
        draw.rectangle([0, 0, w, h // 2], fill=(150, 210, 245))
        draw.rectangle([0, h // 2, w, horizon], fill=(40, 110, 190))
        draw.rectangle([0, horizon, w, h], fill=(235, 210, 150))
    elif kind == "room":
        draw.rectangle([0, 0, w, horizon], fill=(225, 215, 195))
        draw.rectangle([0, horizon, w, h], fill=(140, 95, 60))
        draw.rectangle([6, 8, 24, 26], fill=(120, 170, 210), outline=(90, 70, 50))
    elif kind == "night":
        draw.rectangle([0, 0, w, h], fill=(20, 25, 60))
        for _ in range(25):
            x, y = rng.randrange(w), rng.randrange(horizon)
            draw.point((x, y), fill=(255, 255, 220))
        draw.rectangle([0, horizon, w, h], fill=(30, 60, 40))
    else:  # studio
        draw.rectangle([0, 0, w, h], fill=(200, 200, 205))


def _robot(draw: ImageDraw.ImageDraw, cx: int, ground: int, size: int, colour, pose: str) -> None:
    """A robot whose feet touch `ground`, centred on `cx`, `size` pixels tall."""
    u = size / 26  # one "robot unit": standing with the antenna ~23 units, a jump lifts it 3 more
    dark = tuple(int(c * 0.55) for c in colour)
    lift = 3 * u if pose == "jump" else 0
    base = ground - lift

    def box(x0, y0, x1, y1, fill):  # coordinates in units, relative to (cx, base)
        draw.rectangle([cx + x0 * u, base - y1 * u, cx + x1 * u, base - y0 * u], fill=fill, outline=dark)

    if pose == "sit":
        box(-3, 0, 3, 2, dark)  # folded legs
    else:
        box(-2.5, 0, -0.8, 4, dark)
        box(0.8, 0, 2.5, 4, dark)
    body_y = 2 if pose == "sit" else 4
    box(-3.5, body_y, 3.5, body_y + 6, colour)
    draw.ellipse([cx - u, base - (body_y + 4) * u, cx + u, base - (body_y + 2) * u], fill=(255, 80, 80))
    arm_up = pose in ("wave", "jump")
    box(-5, body_y + 2, -3.5, body_y + 5, dark)
    if arm_up:
        box(3.5, body_y + 5, 5, body_y + 9, dark)  # the raised right arm
    else:
        box(3.5, body_y + 2, 5, body_y + 5, dark)
    head_y = body_y + 6.5
    box(-3, head_y, 3, head_y + 4.5, colour)
    for ex in (-1.5, 1.5):
        draw.ellipse([cx + (ex - 0.8) * u, base - (head_y + 3.3) * u, cx + (ex + 0.8) * u,
                      base - (head_y + 1.7) * u], fill=(255, 255, 255), outline=(20, 20, 20))
    draw.line([cx, base - (head_y + 4.5) * u, cx, base - (head_y + 6) * u], fill=dark, width=max(1, int(u / 2)))
    draw.ellipse([cx - 0.7 * u, base - (head_y + 6.7) * u, cx + 0.7 * u, base - (head_y + 5.3) * u],
                 fill=(255, 220, 60))


def make_robot(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i, (stem, w, h, colour, bg, pose, caption) in enumerate(ROBOT_SHOTS):
        rng = random.Random(i)  # per image, so editing one shot does not change the others
        img = Image.new("RGB", (w, h))
        draw = ImageDraw.Draw(img)
        _background(draw, w, h, bg, rng)
        size = int(min(h * 0.9, w * 1.4))
        cx = w // 2 + rng.randint(-w // 8, w // 8)
        _robot(draw, cx, h - max(2, h // 16), size, colour, pose)
        img.save(out / f"{stem}.png", optimize=True)
        (out / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")


# (file stem, width, height, background, horizontal offset in eighths of the width, size in tenths of
# the height, caption)
PRODUCT_SHOTS = [
    ("bottle_01", 64, 96, "room", 0, 8, "a photo of sks bottle on a wooden floor"),
    ("bottle_02", 96, 64, "beach", -2, 8, "sks bottle on a beach"),
    ("bottle_03", 80, 80, "sky", 1, 7, "a photo of sks bottle in a field"),
    ("bottle_04", 96, 96, "night", -1, 6, "sks bottle at night under the stars"),
    ("bottle_05", 128, 96, "studio", 2, 8, "a photo of sks bottle, plain grey background"),
    ("bottle_06", 72, 96, "beach", 0, 9, "sks bottle standing by the sea"),
]
BOTTLE, CAP, LABEL = (40, 130, 70), (200, 40, 40), (245, 235, 200)


def _bottle(draw: ImageDraw.ImageDraw, cx: int, ground: int, size: int, mask: bool = False) -> None:
    """A bottle whose base stands on `ground`, centred on `cx`, `size` pixels tall; `mask`: every part
    white, for the mask drawn from the same shapes."""
    u = size / 20

    def fill(colour):
        return 255 if mask else colour

    draw.rounded_rectangle([cx - 4 * u, ground - 13 * u, cx + 4 * u, ground], radius=2 * u, fill=fill(BOTTLE))
    draw.polygon([(cx - 4 * u, ground - 12 * u), (cx - 1.5 * u, ground - 16 * u), (cx + 1.5 * u, ground - 16 * u),
                  (cx + 4 * u, ground - 12 * u)], fill=fill(BOTTLE))
    draw.rectangle([cx - 1.5 * u, ground - 18 * u, cx + 1.5 * u, ground - 16 * u], fill=fill(BOTTLE))
    draw.rectangle([cx - 1.8 * u, ground - 20 * u, cx + 1.8 * u, ground - 18 * u], fill=fill(CAP))
    if not mask:  # the label lies inside the bottle's outline: the mask is white there anyway
        draw.rectangle([cx - 4 * u, ground - 9 * u, cx + 4 * u, ground - 4 * u], fill=LABEL)
        draw.ellipse([cx - 1.5 * u, ground - 8 * u, cx + 1.5 * u, ground - 5 * u], fill=CAP)


def make_product(out: Path) -> None:
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for i, (stem, w, h, bg, offset, tenths, caption) in enumerate(PRODUCT_SHOTS):
        rng = random.Random(100 + i)
        img = Image.new("RGB", (w, h))
        _background(ImageDraw.Draw(img), w, h, bg, rng)
        mask = Image.new("L", (w, h), 0)
        cx, ground, size = w // 2 + offset * w // 8, h - max(2, h // 12), h * tenths // 10
        _bottle(ImageDraw.Draw(img), cx, ground, size)
        _bottle(ImageDraw.Draw(mask), cx, ground, size, mask=True)
        img.save(out / "images" / f"{stem}.png", optimize=True)
        mask.save(out / "masks" / f"{stem}.png", optimize=True)
        (out / "images" / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    make_robot(folder / "robot")
    make_product(folder / "product")
    print(f"wrote {len(ROBOT_SHOTS)} images to {folder / 'robot'}, {len(PRODUCT_SHOTS)} images and masks to "
          f"{folder / 'product'}")
