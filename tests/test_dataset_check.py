"""finetune.data.check and `finetune dataset check`: every kind of bad file, made here, lands in its
category; training skips what cannot train, says how many, and refuses an all-bad set in one line."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from finetune.cli import app
from finetune.data import check_dataset, discover_examples
from finetune.data.check import CATEGORIES, load_tokenizer
from finetune.data.images import DEFAULT_MAX_PIXELS
from finetune.errors import FinetuneError
from finetune.recipe import validate
from finetune.recipe.schema import DataConfig

from .helpers import draw_subject, make_image_folder, tiny_recipe

GOOD = ["img0.png", "img1.png", "img2.png", "img3.png"]  # from make_image_folder
SKIPPED = {
    "zero_byte": ["empty.png"],
    "not_image": ["notes.png"],
    "corrupt": ["truncated.jpg", "truncated.png"],
    "too_large": ["bomb.png"],
    "caption_unreadable": ["latin.png"],
}
WARNED = {
    "wrong_extension": ["photo.jpg"],
    "animated": ["anim.gif"],
    "small": ["tiny.png"],
    "exact_duplicate": ["z_copy_of_img1.png"],
    "near_duplicate": ["z_near_img0.jpg"],
    "missing_caption": ["nocap.png"],
    "empty_caption": ["emptycap.png"],
    "long_caption": ["long.png"],
    "same_stem": ["twin.png"],
}
TRAINS = sorted(GOOD + [n for names in WARNED.values() for n in names] + ["twin.jpg"])


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(size=(64, 64)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose header (IHDR, checksum fixed up) claims width x height."""
    data = bytearray(encoded(Image.new("P", (1, 1)), "PNG"))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (64, 64), c) for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def put(folder: Path, name: str, content: bytes, caption: str | bytes | None = "a photo of sks ball") -> None:
    (folder / name).write_bytes(content)
    if caption is not None:
        txt = folder / Path(name).with_suffix(".txt")
        txt.write_bytes(caption if isinstance(caption, bytes) else caption.encode())


def make_messy_folder(folder: Path) -> Path:
    """The four good images of make_image_folder, and one file for every finding."""
    make_image_folder(folder, n=4)
    whole_png, whole_jpg = encoded(noise(), "PNG"), encoded(noise(), "JPEG", quality=95)
    put(folder, "empty.png", b"")
    put(folder, "notes.png", b"shopping list: eggs, milk\n")
    put(folder, "truncated.png", whole_png[: len(whole_png) // 2])
    put(folder, "truncated.jpg", whole_jpg[: len(whole_jpg) // 2])  # header intact: only decoding finds it
    put(folder, "bomb.png", png_claiming(50_000, 50_000))
    put(folder, "latin.png", encoded(draw_subject(11), "PNG"), caption="un café crème".encode("latin-1"))
    put(folder, "photo.jpg", encoded(draw_subject(12), "PNG"))
    put(folder, "anim.gif", animated_gif())
    put(folder, "tiny.png", encoded(draw_subject(13, (16, 16)), "PNG"))
    put(folder, "z_copy_of_img1.png", (folder / "img1.png").read_bytes())
    near = Image.open(folder / "img0.png").resize((96, 96), Image.Resampling.LANCZOS)
    put(folder, "z_near_img0.jpg", encoded(near, "JPEG", quality=80))
    put(folder, "nocap.png", encoded(draw_subject(14), "PNG"), caption=None)
    put(folder, "emptycap.png", encoded(draw_subject(15), "PNG"), caption="  \n")
    put(folder, "long.png", encoded(draw_subject(16), "PNG"), caption="a photo of sks ball on a red sofa " * 20)
    put(folder, "twin.jpg", encoded(draw_subject(17), "JPEG", quality=95), caption="twin caption")
    put(folder, "twin.png", encoded(draw_subject(18), "PNG"), caption=None)  # shares twin.txt
    return folder


def data_cfg(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), resolution=64, **kw)


@pytest.fixture
def messy(tmp_path):
    return make_messy_folder(tmp_path / "messy")


def test_every_finding_in_its_category(messy, tiny_sd15):
    tokenizer, why = load_tokenizer(str(tiny_sd15))
    assert tokenizer is not None, why
    report = check_dataset(data_cfg(messy), tokenizer=tokenizer)
    found = {category: sorted(report.names(category)) for category in report.findings}
    assert found == {**SKIPPED, **WARNED}
    assert report.total == 20 and report.skipped == 6
    assert sorted(e.key for e in report.usable) == TRAINS
    assert all(CATEGORIES[c].skips for c in SKIPPED) and not any(CATEGORIES[c].skips for c in WARNED)

    detail = {name: d for found in report.findings.values() for name, d in found}
    # What a text file says is never echoed: it may be any file the data folder reaches.
    assert detail["notes.png"] == "a text file, not an image"
    assert "truncated" in detail["truncated.jpg"] and "truncated" in detail["truncated.png"]
    assert "2,500,000,000 pixels, over data.max_pixels" in detail["bomb.png"]
    assert "latin.txt is not UTF-8 (byte 0xe9" in detail["latin.png"]
    assert detail["photo.jpg"] == "PNG data named .jpg; rename it to photo.png"
    assert detail["anim.gif"] == "GIF, 3 frames"
    assert detail["tiny.png"] == "16x16, upscaled 4.0x to 64x64"
    assert detail["z_copy_of_img1.png"] == "same bytes as img1.png"
    assert detail["z_near_img0.jpg"].startswith("looks like img0.png (")
    assert detail["nocap.png"] == "no nocap.txt; trains with an empty caption"
    assert detail["long.png"] == "502 tokens, limit 77: the last 425 are cut"  # the tiny model's tokenizer
    assert detail["twin.png"] == "same name as twin.jpg: both train with the caption in twin.txt"

    lines = report.summary()
    assert lines[0] == f"dataset check: 20 files in {messy}: 14 usable, 6 skipped"
    assert "skipped: 2 corrupt, truncated or unreadable images" in lines
    assert "  truncated.jpg: " + detail["truncated.jpg"] in lines
    assert "warning: 1 animated or multi-frame image; the first frame trains" in lines
    short = report.summary(limit=1)
    assert "  ... and 1 more (`finetune dataset check` lists them all)" in short


def test_discover_examples_keeps_the_usable_and_logs_why(messy):
    logged = []
    examples = discover_examples(data_cfg(messy, instance_prompt="a photo of sks ball"), log=logged.append)
    assert sorted(e.key for e in examples) == TRAINS
    assert logged[0].endswith("14 usable, 6 skipped") and "skipped: 1 zero-byte file" in logged
    assert "  nocap.png: no nocap.txt; uses data.instance_prompt" in logged
    assert all(len(line) < 300 for line in logged)  # one finding a line
    by_key = {e.key: e for e in examples}
    assert by_key["nocap.png"].caption == "a photo of sks ball"
    assert by_key["twin.png"].caption == by_key["twin.jpg"].caption == "twin caption"
    assert by_key["anim.gif"].load().getpixel((5, 5)) == (200, 30, 30)  # the first frame
    assert by_key["photo.jpg"].load().size == (64, 64)


def test_clean_set_logs_nothing_and_instance_prompt_only_is_a_note(tmp_path):
    folder = make_image_folder(tmp_path / "clean", n=3)
    logged = []
    assert len(discover_examples(data_cfg(folder), log=logged.append)) == 3 and logged == []
    for txt in folder.glob("*.txt"):
        txt.unlink()
    examples = discover_examples(data_cfg(folder, instance_prompt="sks"), log=logged.append)
    assert [e.caption for e in examples] == ["sks"] * 3
    assert logged[-1] == "note: no caption files: every image trains with data.instance_prompt 'sks'"


def test_max_pixels_setting_skips_and_loading_obeys_it(tmp_path):
    assert DataConfig(path="x").max_pixels == DEFAULT_MAX_PIXELS
    folder = make_image_folder(tmp_path / "set", n=2, sizes=((64, 64), (128, 96)))
    report = check_dataset(data_cfg(folder, max_pixels=64 * 64))
    assert report.names("too_large") == ["img1.png"]
    assert "12,288 pixels, over data.max_pixels (4,096)" in report.findings["too_large"][0][1]
    examples = discover_examples(data_cfg(folder, max_pixels=100_000), log=lambda _: None)
    assert examples[1].load().size == (128, 96)
    examples[1].max_pixels = 64 * 64
    with pytest.raises(FinetuneError, match=r"img1.png: 12,288 pixels, over data.max_pixels \(4,096\)"):
        examples[1].load()


def test_metadata_listing_a_missing_file_or_one_twice(tmp_path):
    make_image_folder(tmp_path, n=2)
    rows = ['{"file_name": "img0.png", "text": "a"}', '{"file_name": "gone.png", "text": "b"}',
            '{"file_name": "img1.png", "text": ""}', '{"file_name": "./img0.png", "text": "again"}']
    (tmp_path / "metadata.jsonl").write_text("\n".join(rows))
    report = check_dataset(data_cfg(tmp_path))
    assert report.names("missing") == ["gone.png"] and report.names("listed_twice") == ["img0.png"]
    assert report.findings["empty_caption"] == [
        ("img1.png", "empty text in metadata.jsonl; trains with an empty caption")]
    assert [e.caption for e in report.usable] == ["a", ""]


def test_all_bad_set_is_one_line_error(tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    (folder / "b.jpg").write_text("<!DOCTYPE html><html>403 Forbidden</html>")
    with pytest.raises(FinetuneError) as e:
        discover_examples(data_cfg(folder), log=lambda _: None)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"data.path: no usable image in {folder}: 1 zero-byte file, 1 file that is not an image")
    assert "(first: a.png: 0 bytes)" in message


def test_training_skips_bad_files_and_refuses_an_all_bad_set(messy, tmp_path, tiny_sd15):
    """A set with one example of every bad case trains on what can train and names every bad file."""
    from finetune.train import train

    logged = []
    recipe = validate(tiny_recipe(tiny_sd15, messy, tmp_path / "out", training__max_steps=2), "test")
    result = train(recipe, log=logged.append, progress=False)
    assert result.steps == 2
    said = "\n".join(logged)
    assert f"data: {len(TRAINS)} images" in said
    n_skipped = sum(len(v) for v in SKIPPED.values())
    assert f"{len(TRAINS)} usable, {n_skipped} skipped" in said
    for names in (*SKIPPED.values(), *(v for k, v in WARNED.items() if k != "long_caption")):
        for name in names:
            assert f"  {name}: " in said, name  # long captions are measured once the tokenizer is loaded

    folder = make_image_folder(tmp_path / "data", n=1)
    (folder / "img0.png").write_bytes(b"")
    (folder / "readme.png").write_text("not a picture")
    recipe = validate(tiny_recipe(tiny_sd15, folder, tmp_path / "out2"), "test")
    refused = r"^data.path: no usable image in .*data: 1 zero-byte file, 1 file that is not an image"
    with pytest.raises(FinetuneError, match=refused) as e:
        train(recipe, log=lambda _: None, progress=False)
    assert "\n" not in str(e.value)


def test_tokenizer_is_never_downloaded_and_its_absence_is_explained(tmp_path, tiny_sd15):
    assert load_tokenizer("builtin:tiny-sd15")[0] is not None
    assert load_tokenizer(str(tiny_sd15))[0].model_max_length == 77
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"")
    assert load_tokenizer(str(single), config=str(tiny_sd15))[0] is not None  # model.config describes it
    for base, why in [(None, "no base model"), (str(tmp_path), "has no tokenizer/ folder"),
                      (str(single), "model.config names no model folder"),
                      ("nobody/not-cached-anywhere", "not in the local hub cache, and nothing is downloaded"),
                      (str(tmp_path / "nowhere"), "neither a model folder nor a hub id")]:
        tokenizer, reason = load_tokenizer(base)
        assert tokenizer is None and why in reason


runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_cli_dataset_check(messy, tmp_path, tiny_sd15):
    r = invoke("dataset", "check", messy, "--resolution", 64, "--base", tiny_sd15)
    assert r.exit_code == 1  # some files would be skipped
    assert f"dataset check: 20 files in {messy}: 14 usable, 6 skipped" in r.output
    assert "skipped: 1 image over data.max_pixels" in r.output and "  bomb.png: " in r.output
    assert "  long.png: " in r.output

    clean = make_image_folder(tmp_path / "clean", n=2)
    r = invoke("dataset", "check", clean, "--resolution", 64)
    assert r.exit_code == 0
    assert r.output.splitlines()[0] == f"dataset check: 2 files in {clean}: 2 usable"
    assert "note: caption length not checked: no base model" in r.output

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  base: {tiny_sd15}\ndata:\n  path: elsewhere\n  resolution: 128\n")
    r = invoke("dataset", "check", clean, "--recipe", recipe)
    assert r.exit_code == 0 and "  img0.png: 64x64, upscaled 2.0x to 128x128" in r.output
    assert "caption length not checked" not in r.output

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.png").write_bytes(b"")
    r = invoke("dataset", "check", tmp_path / "junk")
    assert r.exit_code == 1 and "error: data.path: no usable image in" in r.output
    r = invoke("dataset", "check", clean, "--resolution", 100)
    assert r.exit_code == 1 and "error: --resolution: " in r.output and "Traceback" not in r.output


def test_decoded_dataset_images_are_checked_but_left_intact(tmp_path):
    from finetune.data import Example, check_examples

    jpeg = Image.open(io.BytesIO(encoded(draw_subject(0, (128, 96)), "JPEG")))  # lazily decoded, as datasets hands it
    rows = [Example(key="train[0]", caption="a", image=jpeg), Example(key="train[1]", caption="")]
    report = check_examples(rows, data_cfg("rows"))
    assert [e.key for e in report.usable] == ["train[0]"] and report.names("missing") == ["train[1]"]
    assert jpeg.size == (128, 96) and rows[0].load().size == (128, 96)  # not drafted down, not closed
