"""finetune.data: image loading, example discovery, buckets, the sampler and the dataset."""

from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.data import (
    BucketBatchSampler,
    ImageCaptionDataset,
    collate,
    discover_examples,
    image_size,
    load_image,
    make_buckets,
    nearest_bucket,
)
from finetune.errors import FinetuneError
from finetune.recipe.schema import DataConfig

REPO = Path(__file__).resolve().parents[1]


def data_cfg(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **kw)


def save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


# ---------------------------------------------------------------- images


def test_rgba_transparent_pixels_become_white(tmp_path):
    img = Image.new("RGBA", (4, 2), (0, 0, 0, 0))  # fully transparent black: must not train as black
    img.putpixel((0, 0), (255, 0, 0, 255))
    img.putpixel((1, 0), (0, 0, 255, 128))
    out = load_image(save(img, tmp_path / "a.png"))
    assert out.mode == "RGB"
    assert out.getpixel((3, 1)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (255, 0, 0)
    r, g, b = out.getpixel((1, 0))  # half-transparent blue over white
    assert 125 <= r <= 129 and 125 <= g <= 129 and b == 255


def test_la_transparent_pixels_become_white(tmp_path):
    img = Image.new("LA", (2, 1), (0, 0))
    img.putpixel((1, 0), (50, 255))
    out = load_image(save(img, tmp_path / "la.png"))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (50, 50, 50)


def test_palette_image(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putpixel((1, 0), 1)
    out = load_image(save(img, tmp_path / "p.png"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (10, 20, 30) and out.getpixel((1, 0)) == (200, 100, 50)


def test_palette_with_transparency_becomes_white(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 0  # palette entry 0 (black) is transparent
    path = save(img, tmp_path / "pt.png", transparency=0)
    assert "transparency" in Image.open(path).info
    out = load_image(path)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (200, 100, 50)


def test_transparent_gif_becomes_white(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    img.putpixel((1, 0), 1)
    out = load_image(save(img, tmp_path / "t.gif", transparency=0))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (0, 200, 0)


def test_cmyk(tmp_path):
    img = Image.new("CMYK", (2, 1), (0, 0, 0, 0))  # no ink: white
    img.putpixel((1, 0), (0, 255, 255, 0))  # magenta + yellow: red
    out = load_image(save(img, tmp_path / "c.tif"))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (255, 0, 0)


def test_grayscale_and_one_bit(tmp_path):
    gray = Image.new("L", (2, 1), 77)
    assert load_image(save(gray, tmp_path / "l.png")).getpixel((0, 0)) == (77, 77, 77)
    bits = Image.new("1", (2, 1), 0)
    bits.putpixel((1, 0), 1)
    out = load_image(save(bits, tmp_path / "b.png"))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 0)) == (255, 255, 255)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_is_scaled_not_clipped(tmp_path, suffix):
    # not multiples of 257, so neither clipping nor uint8 wrap-around can give the right answer
    a = np.array([[0, 65535, 1000, 40000]], dtype=np.uint16)
    img = Image.fromarray(a)
    assert img.mode.startswith("I;16")
    out = load_image(save(img, tmp_path / f"i16{suffix}"))
    assert out.mode == "RGB"
    assert [out.getpixel((x, 0))[0] for x in range(4)] == [0, 255, 4, 156]


def test_float_image_scaled(tmp_path):
    img = Image.fromarray(np.array([[0.0, 1.0, 0.5]], dtype=np.float32))
    out = load_image(save(img, tmp_path / "f.tif"))
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 255, 128]


def test_exif_rotated_jpeg_is_upright(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the stored image's left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = save(img, tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    out = load_image(path)
    assert out.size == (20, 40)
    assert image_size(path) == (20, 40)  # the header-only size agrees with the decoded one
    r, g, b = out.getpixel((10, 3))  # the left strip is now at the top
    assert r > 200 and g < 60 and b < 60
    assert out.getpixel((10, 36))[1] > 200


def test_corrupt_and_missing_files_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(FinetuneError, match="broken.png"):
        load_image(bad)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    good = save(Image.fromarray(noise), tmp_path / "whole.jpg", quality=95).read_bytes()
    trunc = tmp_path / "truncated.jpg"
    trunc.write_bytes(good[: len(good) // 2])  # the header is intact: only decoding finds the damage
    with pytest.raises(FinetuneError, match="truncated.jpg"):
        load_image(trunc)
    with pytest.raises(FinetuneError, match="nothere.png"):
        load_image(tmp_path / "nothere.png")


def test_extension_that_lies_is_read_by_content(tmp_path):
    path = save(Image.new("RGB", (3, 3), (9, 8, 7)), tmp_path / "photo.jpg", format="PNG")
    assert load_image(path).getpixel((1, 1)) == (9, 8, 7)


# ---------------------------------------------------------------- discovery


def make_image(path: Path, size=(32, 32), colour=(100, 150, 200)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def test_folder_with_captions_and_instance_prompt_fallback(tmp_path):
    make_image(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("  a red robot \n", encoding="utf-8")
    make_image(tmp_path / "a.jpg")  # no caption file
    make_image(tmp_path / "sub" / "c.webp")
    (tmp_path / "sub" / "c.txt").write_text("", encoding="utf-8")  # empty caption
    make_image(tmp_path / ".hidden" / "d.png")
    (tmp_path / "notes.md").write_text("not an image")
    ex = discover_examples(data_cfg(tmp_path, instance_prompt="a photo of sks robot"))
    assert [e.key for e in ex] == ["a.jpg", "b.png", "sub/c.webp"]
    assert [e.caption for e in ex] == ["a photo of sks robot", "a red robot", "a photo of sks robot"]
    assert ex[2].load().size == (32, 32)


def test_folder_without_captions_logs_them(tmp_path):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("captioned")
    logged = []
    ex = discover_examples(data_cfg(tmp_path), log=logged.append)
    assert [e.caption for e in ex] == ["", "captioned"]
    assert "warning: 1 image without a caption file" in logged
    assert "  a.png: no a.txt; trains with an empty caption" in logged


def test_caption_extension_and_relative_path(tmp_path):
    folder = tmp_path / "imgs"
    make_image(folder / "x.png")
    (folder / "x.caption").write_text("from caption file")
    (folder / "x.txt").write_text("wrong file")
    ex = discover_examples(data_cfg("imgs", caption_extension="caption"), base_dir=tmp_path)
    assert ex[0].caption == "from caption file" and ex[0].path == folder / "x.png"


def test_same_stem_files_get_distinct_keys(tmp_path):
    make_image(tmp_path / "x.png")
    make_image(tmp_path / "x.jpg")
    ex = discover_examples(data_cfg(tmp_path, instance_prompt="p"))
    assert sorted(e.key for e in ex) == ["x.jpg", "x.png"]


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FinetuneError, match=r"data.path: folder .*nope does not exist"):
        discover_examples(data_cfg(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FinetuneError, match="no images"):
        discover_examples(data_cfg(tmp_path / "empty"))


def test_metadata_jsonl(tmp_path):
    make_image(tmp_path / "imgs" / "one.png")
    make_image(tmp_path / "two.png")
    rows = [{"file_name": "imgs/one.png", "text": "first"}, {"file_name": "two.png", "text": ""}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ex = discover_examples(data_cfg(tmp_path, instance_prompt="fallback"))
    assert [(e.key, e.caption) for e in ex] == [("imgs/one.png", "first"), ("two.png", "fallback")]
    # the metadata file itself as the path, another caption column
    rows = [{"file_name": "two.png", "prompt": "by prompt"}]
    meta = tmp_path / "other.jsonl"
    meta.write_text(json.dumps(rows[0]))
    ex = discover_examples(data_cfg(meta, caption_column="prompt"))
    assert ex[0].caption == "by prompt" and ex[0].path == tmp_path / "two.png"


def test_metadata_csv(tmp_path):
    make_image(tmp_path / "a.png", colour=(1, 2, 3))
    with open(tmp_path / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "text"])
        w.writerow(["a.png", "a caption, with a comma"])
    ex = discover_examples(data_cfg(tmp_path))
    assert ex[0].caption == "a caption, with a comma"
    assert ex[0].load().getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize("name", ["../outside.png", "/etc/passwd", "sub/../../x.png", "..\\x.png", "C:\\x.png"])
def test_metadata_path_escape_rejected(tmp_path, name):
    inner = tmp_path / "set"
    make_image(tmp_path / "outside.png")
    make_image(inner / "ok.png")
    rows = [{"file_name": "ok.png", "text": "fine"}, {"file_name": name, "text": "sneaky"}]
    (inner / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(FinetuneError, match=re.escape(repr(name)) + " must be a path inside"):
        discover_examples(data_cfg(inner))


def test_metadata_missing_column_and_file(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "caption": "x"}))
    with pytest.raises(FinetuneError, match=r"no column 'text'.*file_name, caption"):
        discover_examples(data_cfg(tmp_path))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "x"}))
    with pytest.raises(FinetuneError, match="gone.png"):
        discover_examples(data_cfg(tmp_path))


def _saved_dataset(tmp_path, as_dict=False):
    import datasets

    images = [Image.new("RGB", (48, 24), (200, 0, 0)), Image.new("RGB", (24, 48), (0, 0, 200))]
    ds = datasets.Dataset.from_dict({"image": images, "text": ["wide red", None]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "text": datasets.Value("string")}))
    out = tmp_path / "saved"
    other = datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))], "text": ["other split"]},
                                       features=ds.features)
    (datasets.DatasetDict({"train": ds, "test": other}) if as_dict else ds).save_to_disk(str(out))
    return out


@pytest.mark.parametrize("as_dict", [False, True])
def test_saved_datasets_folder(tmp_path, as_dict):
    path = _saved_dataset(tmp_path, as_dict)
    ex = discover_examples(data_cfg(path, instance_prompt="sks"))
    assert [e.caption for e in ex] == ["wide red", "sks"]
    assert len({e.key for e in ex}) == 2
    assert ex[0].size() == (48, 24)
    img = ex[1].load()
    assert img.mode == "RGB" and img.size == (24, 48) and img.getpixel((0, 0)) == (0, 0, 200)


def test_saved_datasets_missing_column_and_split(tmp_path):
    path = _saved_dataset(tmp_path, as_dict=True)
    with pytest.raises(FinetuneError, match=r"no column 'caption'.*image, text"):
        discover_examples(data_cfg(path, caption_column="caption"))
    with pytest.raises(FinetuneError, match=r"no split 'validation'.*train, test"):
        discover_examples(data_cfg(path, split="validation"))
    ex = discover_examples(data_cfg(path, split="test"))
    assert [e.caption for e in ex] == ["other split"] and ex[0].key == "test[0]"


def test_sample_robot_set():
    ex = discover_examples(data_cfg(REPO / "datasets" / "robot"))
    assert len(ex) == 8 and all(e.caption for e in ex)
    assert sum("sks robot" in e.caption for e in ex) >= 4
    assert len({e.size() for e in ex}) >= 5  # varied shapes, so bucketing has work to do


# ---------------------------------------------------------------- buckets


@pytest.mark.parametrize("resolution", [64, 256, 512, 520, 1024])
def test_buckets_respect_step_area_and_limits(resolution):
    buckets = make_buckets(resolution)
    step = 64 if resolution % 64 == 0 and resolution >= 256 else 8
    assert (resolution, resolution) in buckets
    assert len(buckets) >= 5
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert w * h <= resolution * resolution
        assert resolution // 2 <= w <= resolution * 2 and resolution // 2 <= h <= resolution * 2
    assert {(h, w) for w, h in buckets} == set(buckets)


def test_bucket_limits(tmp_path):
    buckets = make_buckets(512, min_size=384, max_size=640)
    assert min(min(b) for b in buckets) >= 384 and max(max(b) for b in buckets) <= 640
    with pytest.raises(FinetuneError, match="must include data.resolution"):
        make_buckets(512, min_size=576)


def test_nearest_bucket_by_aspect_ratio():
    buckets = make_buckets(512)
    assert nearest_bucket(1000, 1000, buckets) == (512, 512)
    w, h = nearest_bucket(2000, 1000, buckets)
    assert w > h and abs(math.log(w / h) - math.log(2)) < 0.2
    w, h = nearest_bucket(600, 1200, buckets)
    assert h > w and abs(math.log(h / w) - math.log(2)) < 0.2


def test_wide_image_keeps_its_framing(tmp_path):
    # A 2:1 image whose left and right quarters are coloured: a square crop would lose both ends.
    img = Image.new("RGB", (256, 128), (128, 128, 128))
    img.paste((255, 0, 0), (0, 0, 16, 128))
    img.paste((0, 0, 255), (240, 0, 256, 128))
    img.save(tmp_path / "wide.png")
    cfg = data_cfg(tmp_path, resolution=64, instance_prompt="x")
    ds = ImageCaptionDataset(discover_examples(cfg), cfg, seed=0)
    item = ds[0]
    h, w = item["target_size"]
    assert w > h and abs(w / h - 2) < 0.3
    assert item["pixel_values"].shape == (3, h, w)
    px = item["pixel_values"]
    assert px[0, h // 2, 0] > 0.9 and px[2, h // 2, 0] < -0.9  # red left edge survived
    assert px[2, h // 2, -1] > 0.9 and px[0, h // 2, -1] < -0.9  # blue right edge survived
    # without bucketing the same image is square-cropped and loses both edges
    flat = data_cfg(tmp_path, resolution=64, instance_prompt="x", bucketing={"enabled": False})
    sq = ImageCaptionDataset(discover_examples(flat), flat, seed=0)[0]["pixel_values"]
    assert sq.shape == (3, 64, 64) and abs(float(sq[0, 32, 0]) - float(sq[1, 32, 0])) < 0.05


# ---------------------------------------------------------------- sampler


def sampler_epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_sampler_single_bucket_batches_cover_every_index():
    # bucket 2 has one image and bucket 1 has 5: both smaller than / not a multiple of the batch
    bucket_of_index = [0] * 8 + [1] * 5 + [2]
    sampler = BucketBatchSampler(bucket_of_index, batch_size=4, seed=3)
    for epoch in range(3):
        batches = sampler_epoch(sampler, epoch)
        assert len(batches) == len(sampler) == 2 + 2 + 1
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(bucket_of_index)))
        assert all(len({bucket_of_index[i] for i in b}) == 1 for b in batches)
        assert all(1 <= len(b) <= 4 for b in batches)


def test_sampler_batch_larger_than_every_bucket():
    sampler = BucketBatchSampler([0, 1, 1, 2], batch_size=8, seed=0)
    batches = list(sampler)
    assert len(sampler) == 3 and sorted(map(len, batches)) == [1, 1, 2]


def test_sampler_deterministic_per_seed_and_epoch():
    bucket_of_index = [i % 3 for i in range(60)]
    a = BucketBatchSampler(bucket_of_index, 4, seed=7)
    b = BucketBatchSampler(bucket_of_index, 4, seed=7)
    assert sampler_epoch(a, 0) == sampler_epoch(b, 0)
    assert sampler_epoch(a, 5) == sampler_epoch(b, 5)
    assert sampler_epoch(a, 0) != sampler_epoch(a, 1)
    assert sampler_epoch(a, 0) != sampler_epoch(BucketBatchSampler(bucket_of_index, 4, seed=8), 0)
    plain = BucketBatchSampler(bucket_of_index, 4, seed=7, shuffle=False)
    assert sampler_epoch(plain, 0)[0] == [0, 3, 6, 9]


def test_sampler_works_with_dataloader(tmp_path):
    cfg = data_cfg(REPO / "datasets" / "robot", resolution=64)
    ds = ImageCaptionDataset(discover_examples(cfg), cfg, seed=0)
    sampler = BucketBatchSampler(ds.bucket_of_index, batch_size=3, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    seen = Counter()
    for batch in loader:
        assert batch["pixel_values"].ndim == 4 and len(batch["key"]) == batch["pixel_values"].shape[0]
        seen.update(batch["key"])
    assert len(seen) == 8 and set(seen.values()) == {1}


# ---------------------------------------------------------------- dataset


@pytest.fixture
def photo_dir(tmp_path):
    rng = np.random.default_rng(0)
    for i, size in enumerate([(96, 64), (64, 96), (80, 80)]):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / f"p{i}.png")
        (tmp_path / f"p{i}.txt").write_text(f"caption {i}")
    return tmp_path


def test_dataset_items(photo_dir):
    cfg = data_cfg(photo_dir, resolution=64, repeats=2)
    ds = ImageCaptionDataset(discover_examples(cfg), cfg, seed=1)
    assert len(ds) == 6 and len(ds.bucket_of_index) == 6
    assert ds.bucket_of_index[:3] == ds.bucket_of_index[3:]
    for i in range(len(ds)):
        item = ds[i]
        px = item["pixel_values"]
        h, w = item["target_size"]
        assert px.dtype == torch.float32 and px.shape == (3, h, w)
        assert (w, h) == ds.buckets[ds.bucket_of_index[i]]
        assert w * h <= 64 * 64 and w % 8 == 0 and h % 8 == 0
        assert -1.0 <= float(px.min()) < -0.9 and 0.9 < float(px.max()) <= 1.0
        assert item["caption"] == f"caption {i % 3}" and item["key"] == f"p{i % 3}.png"
    assert ds[0]["original_size"] == (64, 96) and ds[1]["original_size"] == (96, 64)
    assert ds[0]["target_size"][1] > ds[0]["target_size"][0]  # the wide image got a wide bucket
    assert ds.deterministic
    batch = collate([ds[0], ds[3]])
    assert batch["pixel_values"].shape == (2, 3, *ds[0]["target_size"])
    assert batch["caption"] == ["caption 0", "caption 0"]


def test_center_crop_is_deterministic_and_centered(photo_dir):
    cfg = data_cfg(photo_dir, resolution=64, bucketing={"enabled": False})
    ds = ImageCaptionDataset(discover_examples(cfg), cfg, seed=0)
    first = ds[0]
    ds.set_epoch(4)
    again = ds[0]
    assert torch.equal(first["pixel_values"], again["pixel_values"])
    assert first["crop_top_left"] == (0, 16)  # 96x64 -> 96x64 (covers 64x64), centre crop from x=16
    src = np.asarray(Image.open(photo_dir / "p0.png"), dtype=np.float32)[:, 16:80] / 127.5 - 1
    assert torch.allclose(first["pixel_values"], torch.from_numpy(src).permute(2, 0, 1), atol=1e-6)


def test_random_crop_and_flip_vary_by_epoch_but_reproduce(photo_dir):
    cfg = data_cfg(photo_dir, resolution=64, crop="random", random_flip=True, bucketing={"enabled": False})
    ds = ImageCaptionDataset(discover_examples(cfg), cfg, seed=0)
    assert not ds.deterministic
    views = []
    for epoch in range(8):
        ds.set_epoch(epoch)
        views.append(ds[0]["pixel_values"])
    assert any(not torch.equal(views[0], v) for v in views[1:])
    ds.set_epoch(3)
    assert torch.equal(ds[0]["pixel_values"], views[3])
    other = ImageCaptionDataset(discover_examples(cfg), cfg, seed=0)
    other.set_epoch(3)
    assert torch.equal(other[0]["pixel_values"], views[3])
    # every view is a (possibly flipped) 64x64 window of the source
    src = torch.from_numpy(np.asarray(Image.open(photo_dir / "p0.png"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    for epoch, v in enumerate(views):
        ds.set_epoch(epoch)
        top, left = ds[0]["crop_top_left"]
        windows = [src[:, top:top + 64, left:left + 64], src[:, top:top + 64, 32 - left:96 - left].flip(-1)]
        assert any(torch.allclose(v, wdw, atol=1e-6) for wdw in windows)


def test_caption_dropout(photo_dir):
    cfg = data_cfg(photo_dir, resolution=64, caption_dropout=1.0)
    ds = ImageCaptionDataset(discover_examples(cfg), cfg, seed=0)
    assert all(ds[i]["caption"] == "" for i in range(len(ds)))
    half = data_cfg(photo_dir, resolution=64, caption_dropout=0.5, repeats=40)
    ds = ImageCaptionDataset(discover_examples(half), half, seed=0)
    dropped = [ds.caption(i) == "" for i in range(len(ds))]
    assert 30 < sum(dropped) < 90
    assert [ds.caption(i) == "" for i in range(len(ds))] == dropped  # reproducible
    assert ds[5]["caption"] == ds.caption(5)
    ds.set_epoch(1)
    assert [ds.caption(i) == "" for i in range(len(ds))] != dropped
