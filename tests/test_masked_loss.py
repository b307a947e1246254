"""data.masks (masked loss) on the tiny models: the loss ignores the error where a mask is black (through
the real denoiser of every family, the transformers' packed latents included), masks take their images' crops and
flips, alpha channels are masks, mask problems are named and those images train unmasked, cached latents
(in memory and in memory.cache_dir) carry the masks the uncached path computes, and a run with masks
trains and measures its held-out val_loss with them."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.errors import FinetuneError, RecipeError
from finetune.recipe import validate
from finetune.recipe.schema import DataConfig, TrainingConfig

from .helpers import load_family, tiny_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Cell-aligned masks: the left 24 pixel columns (three latent columns at 8 px a cell) are white, the rest
# black, so every latent cell is wholly one or the other.
WHITE_COLUMNS = 24


def _pattern(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like RGB image: blocks of colour, different per seed."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8)))


def _mask(width: int, height: int, white: int = WHITE_COLUMNS) -> Image.Image:
    a = np.zeros((height, width), dtype=np.uint8)
    a[:, :white] = 255
    return Image.fromarray(a)


def _masked_set(folder, sizes=((64, 64),) * 4, caption="a photo of sks ball"):
    """images/ (with captions) and masks/ beside it; returns (images folder, masks folder)."""
    images, masks = folder / "images", folder / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for i, (w, h) in enumerate(sizes):
        _pattern(w, h, i).save(images / f"img{i}.png")
        (images / f"img{i}.txt").write_text(f"{caption}, view {i}")
        _mask(w, h).save(masks / f"img{i}.png")
    return images, masks


def _dataset(images, **data):
    from finetune.data import ImageCaptionDataset, discover_examples

    cfg = DataConfig(path=str(images), resolution=64, bucketing={"enabled": False}, **data)
    lines = []
    return ImageCaptionDataset(discover_examples(cfg, log=lines.append), cfg, seed=0), lines


# ------------------------------------------------------------------ the loss


@pytest.fixture(scope="module")
def sd15(tiny_sd15):
    return load_family("sd1", tiny_sd15)


FAMILIES = {"sd1": None, "sdxl": "tiny-sdxl", "flux": "tiny-flux", "sd3": "tiny-sd3", "flux2": "tiny-flux2",
            "qwen_image": "tiny-qwen-image", "z_image": "tiny-z-image"}


@pytest.mark.parametrize("name", FAMILIES)
def test_the_error_where_the_mask_is_black_changes_neither_loss_nor_gradient(name, sd15):
    """The same batch twice, its target moved by 5 only on the mask's black cells: with the mask, loss and
    the trained parameters' gradients are bit-identical; without it, they differ. Every family: at 72x56 px
    the transformers' 2x2 patches drop the odd latent row and column (FLUX.2 patchifies as it encodes, a
    cell of 16 px), which the mask must drop alike."""
    from finetune.train.data_loader import Draw
    from finetune.train.objective import BatchLoss

    family, c = sd15 if name == "sd1" else load_family(name, f"builtin:{FAMILIES[name]}")
    height, width = 72, 56
    masks = torch.from_numpy(np.array(_mask(width, height, white=32)))[None, None]  # whole 8 and 16 px cells
    grid = family.latent_mask(c, masks)
    assert set(grid.unique().tolist()) == {0.0, 1.0}  # whole cells: exactly white or black

    class MovedTarget(type(family)):
        def sample_noisy(self, c, latents, noise_offset=0.0):
            noisy, t, target = super().sample_noisy(c, latents, noise_offset)
            black = grid[..., :target.shape[-2], :target.shape[-1]] == 0
            return noisy, t, target + 5.0 * black

    torch.manual_seed(0)
    latents = torch.randn(1, *family.encode_images(c, torch.zeros(1, 3, height, width)).shape[1:])
    batch = {"draw": [Draw(0, 0, 0, 1.0)], "original_size": [(height, width)], "crop_top_left": [(0, 0)],
             "target_size": [(height, width)]}
    trained = list(c.denoiser.parameters())[-4:]  # the output layers: every cell's error reaches them
    c.denoiser.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)

    def loss_and_grads(fam, mask, **data):
        loss = BatchLoss(fam, c, TrainingConfig(seed=0), partial_encode(family, c), contextlib.nullcontext,
                         DataConfig(path="x", masks="m", **data))
        for p in trained:
            p.grad = None
        total, _, _ = loss(latents, batch, ["a photo of sks ball"], mask)
        total.backward()
        return total.detach(), [p.grad.clone() for p in trained]

    try:
        for data in ({}, {"normalize_masked_loss": False}):
            plain, moved = loss_and_grads(family, grid, **data), loss_and_grads(MovedTarget(), grid, **data)
            assert torch.equal(plain[0], moved[0])
            assert all(torch.equal(a, b) for a, b in zip(plain[1], moved[1]))
        assert not torch.equal(loss_and_grads(family, None)[0], loss_and_grads(MovedTarget(), None)[0])
        kept = loss_and_grads(family, grid, unmasked_weight=0.1)[0], loss_and_grads(MovedTarget(), grid, unmasked_weight=0.1)[0]
        assert kept[1] > kept[0]  # unmasked_weight > 0: the background still counts, a little
    finally:
        c.denoiser.requires_grad_(False)


def partial_encode(family, c):
    return lambda captions: family.encode_prompts(c, captions)


def test_normalised_loss_is_the_weighted_mean_and_an_unnormalised_one_shrinks_with_the_area():
    from finetune.train.objective import masked_mean

    err = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4).expand(2, 3, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, :, :, :1] = 1  # a quarter of the first image; none of the second
    normalised, shrunk = masked_mean(err, mask, 0.0, True), masked_mean(err, mask, 0.0, False)
    assert normalised[0] == err[0, :, :, :1].mean() and shrunk[0] == err[0, :, :, :1].mean() / 4
    assert normalised[1] == 0 and shrunk[1] == 0  # a crop without white: no loss, no NaN


# ------------------------------------------------------------------ loading


def test_masks_take_their_images_crops_and_flips(tmp_path):
    """Grey images equal to their own masks: after random crops and flips (no resize: 96x64 into 64x64,
    then a resize: 160x128), the fitted mask is the fitted image."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for name, (w, h) in (("wide", (96, 64)), ("large", (160, 128))):
        grey = np.asarray(_pattern(w, h, 3).convert("L"))
        Image.fromarray(grey).convert("RGB").save(images / f"{name}.png")
        Image.fromarray(grey).save(masks / f"{name}.png")
    ds, _ = _dataset(images, masks=str(masks), crop="random", random_flip=True)
    offsets = set()
    for epoch in range(12):
        for i, example in enumerate(ds.examples):
            item = ds.item(i, epoch)
            grey = (item["pixel_values"][0] + 1) * 127.5
            mask = item["mask"][0].float()
            assert item["mask"].shape == (1, 64, 64) and item["mask"].dtype == torch.uint8
            if example.key == "wide.png":  # cropped only: exactly the same pixels
                assert torch.allclose(grey, mask, atol=0.01)
                offsets.add(item["crop_top_left"])
            else:  # resized (LANCZOS for the image, bilinear for the mask): equal up to the filters
                assert (grey - mask).abs().mean() < 6
    assert len(offsets) > 3
    # Each mask is the crop it was cut from, or (flipped: crop_top_left then counts from the right) its mirror.
    wide = np.asarray(Image.open(masks / "wide.png"))
    seen = []
    for epoch in range(12):
        item = ds.item([e.key for e in ds.examples].index("wide.png"), epoch)
        top, left = item["crop_top_left"]
        got = item["mask"][0].numpy()
        if np.array_equal(got, wide[top:top + 64, left:left + 64]):
            seen.append("as is")
        else:
            left = 96 - 64 - left
            assert np.array_equal(got, wide[top:top + 64, left:left + 64][:, ::-1])
            seen.append("flipped")
    assert set(seen) == {"as is", "flipped"}


def test_alpha_channel_masks_keep_the_white_composite_for_pixels(tmp_path):
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., :3] = 40
    rgba[:, :WHITE_COLUMNS, 3] = 255  # opaque subject on the left, transparent on the right
    Image.fromarray(rgba).save(tmp_path / "cutout.png")
    _pattern(64, 64, 1).save(tmp_path / "opaque.png")  # no alpha channel: trains unmasked, named
    ds, lines = _dataset(tmp_path, masks="alpha")
    keys = [e.key for e in ds.examples]
    item = ds.item(keys.index("cutout.png"), 0)
    assert torch.equal(item["mask"][0], torch.from_numpy(rgba[..., 3]))
    assert torch.all(item["pixel_values"][:, :, WHITE_COLUMNS:] == 1.0)  # transparent pixels: white, as always
    assert torch.all(ds.item(keys.index("opaque.png"), 0)["mask"] == 255)
    assert any("opaque.png: no alpha channel" in line for line in lines), lines


def test_mask_problems_are_named_once_and_those_images_train_unmasked(tmp_path):
    images, masks = _masked_set(tmp_path, sizes=((64, 64),) * 5)
    (masks / "img1.png").unlink()
    _mask(32, 32).save(masks / "img2.png")
    Image.new("L", (64, 64), 0).save(masks / "img3.png")
    (masks / "img4.png").rename(masks / "img4.jpg")  # another extension, the same stem: found
    ds, lines = _dataset(images, masks=str(masks))
    text = "\n".join(lines)
    assert "warning: 1 image without a usable mask; trains unmasked" in text and "img1.png: no img1.png" in text
    assert "img2.png: mask img2.png is 32x32, the image 64x64" in text
    assert "img3.png: mask img3.png is all black" in text
    assert text.count("img1.png") == 2 and "img4" not in text  # named once (its line names the mask it looked for)
    by_key = {e.key: ds.item(i, 0)["mask"] for i, e in enumerate(ds.examples)}
    for key in ("img1.png", "img2.png", "img3.png"):
        assert torch.all(by_key[key] == 255)
    for key in ("img0.png", "img4.png"):
        assert torch.all(by_key[key][0, :, :WHITE_COLUMNS] > 200) and torch.all(by_key[key][0, :, WHITE_COLUMNS + 2:] < 50)

    with pytest.raises(FinetuneError, match="data.masks: folder .*nowhere does not exist"):
        _dataset(images, masks=str(tmp_path / "nowhere"))
    inside = tmp_path / "inside"  # masks/ inside the image folder: left out of the training images
    _masked_set(inside)
    (inside / "masks").rename(inside / "images" / "masks")
    ds, lines = _dataset(inside / "images", masks=str(inside / "images" / "masks"))
    assert sorted(e.key for e in ds.examples) == [f"img{i}.png" for i in range(4)]
    assert any("4 files in" in line and "are masks" in line for line in lines), lines
    assert all(e.mask is not None for e in ds.examples)


def test_mask_keys_are_checked_in_the_recipe():
    base = {"data": {"path": "x"}}
    for data, message in (({"unmasked_weight": 0.1}, "data.unmasked_weight: needs data.masks"),
                          ({"normalize_masked_loss": False}, "data.normalize_masked_loss: needs data.masks"),
                          ({"masks": "m", "unmasked_weight": 1.0}, "data.unmasked_weight: 1 weighs the background")):
        with pytest.raises(RecipeError, match=message):
            validate({"data": {**base["data"], **data}}, "test")
    # A run's recipe.yaml spells every default out: it must read back.
    assert validate({"data": {"path": "x", "unmasked_weight": 0.0, "normalize_masked_loss": True}}, "test")


# ------------------------------------------------------------------ caches


def test_cached_latents_carry_the_masks_of_the_uncached_path(sd15, tmp_path):
    from accelerate import PartialState

    from finetune.data.dataset import collate
    from finetune.train.caches import build_latent_cache
    from finetune.train.disk_cache import DiskCache, DiskEntries, LatentEncoder, latent_identity, read_entry

    family, c = sd15
    images, masks = _masked_set(tmp_path / "set", sizes=((64, 64), (64, 64), (96, 64)))
    ds, _ = _dataset(images, masks=str(masks))
    encode = lambda px: family.encode_images(c, px)  # noqa: E731
    shrink = lambda m: family.latent_mask(c, m)  # noqa: E731
    uncached = {e.key: family.latent_mask(c, collate([ds.item(i, 0)])["mask"])[0] for i, e in enumerate(ds.examples)}
    _, _, in_memory = build_latent_cache(ds, encode, 0, torch.float32, PartialState(), None, shrink)

    def on_disk(dataset):
        disk = DiskCache.open(str(tmp_path / "cache"), PartialState(), lambda _line: None)
        identity = latent_identity(family, c, torch.float32, torch.device("cpu"))
        paths, _ = disk.latents(dataset, 0, LatentEncoder(encode, torch.float32, identity, shrink), None)
        return paths

    paths = on_disk(ds)
    stored = DiskEntries(paths, "mask")
    for key, mask in uncached.items():
        assert mask.shape == (1, 8, 8) and torch.equal(in_memory[key], mask) and torch.equal(stored[key], mask)
        white = 1 if key == "img2.png" else 3  # 96x64, centre-cropped by 16 px: one white latent column is left
        assert torch.equal(mask[0, :, :white], torch.ones(8, white)) and not mask[0, :, white:].any()

    # A changed mask names a new entry for its image alone; the set without masks uses other entries.
    _mask(64, 64, white=40).save(masks / "img0.png")
    again = on_disk(_dataset(images, masks=str(masks))[0])
    assert again["img0.png"] != paths["img0.png"] and again["img1.png"] == paths["img1.png"]
    assert torch.equal(DiskEntries(again, "mask")["img0.png"][0, :, :5], torch.ones(8, 5))
    unmasked = on_disk(_dataset(images)[0])
    assert not set(unmasked.values()) & set(paths.values())
    assert set(read_entry(unmasked["img0.png"])[0]) == {"latent"}


# ------------------------------------------------------------------ a run


@pytest.mark.parametrize("cache", ["uncached", "cache-dir"])
def test_a_run_with_masks_trains_and_measures_val_loss_with_them(cache, tiny_sd15, tmp_path):
    """Uncached (random flips: each step encodes its pixels and pools its masks), and with memory.cache_dir
    (masks read from the latents' files); held-out images keep their masks for val_loss either way."""
    from safetensors.torch import load_file

    from finetune.train import train
    from finetune.train.trainer import Trainer

    images, masks = _masked_set(tmp_path, sizes=((64, 64),) * 5)
    r = tiny_recipe(tiny_sd15, images, tmp_path / "out", data__masks=str(masks), data__validation_split=0.2,
                    validation__every_n_steps=2, training__max_steps=4)
    if cache == "uncached":
        r["data"]["random_flip"] = True
    else:
        r["memory"] = {"cache_dir": str(tmp_path / "cache")}
    seen, original = {"batches": []}, Trainer.train_step

    def recording(self, batch):  # the real step, its masks seen from outside
        seen["held_out"], seen["cached"] = self.feed.held_out.masks, self.feed.masks
        seen["batches"].append(self.feed._masks(batch["instance"]))
        return original(self, batch)

    Trainer.train_step = recording
    try:
        result = train(validate(r, "test"), log=lambda *_: None, progress=False)
    finally:
        Trainer.train_step = original
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses, val = [row["loss"] for row in rows if "loss" in row], [row["val_loss"] for row in rows if "val_loss" in row]
    assert len(losses) == 4 and val and all(np.isfinite(losses + val))
    for grid in seen["batches"]:  # white on the left three latent columns (flipped: the right three)
        assert grid.shape == (2, 1, 8, 8) and set(grid.unique().tolist()) == {0.0, 1.0} and grid.sum() == 2 * 8 * 3
    (held_key,) = seen["held_out"]
    assert torch.equal(seen["held_out"][held_key][0, :, 3:], torch.zeros(8, 5))
    if cache == "cache-dir":
        assert len(seen["cached"]) == 4 and held_key not in seen["cached"]
    lora = load_file(result.run_dir / "pytorch_lora_weights.safetensors")
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k or "lora.up" in k)
