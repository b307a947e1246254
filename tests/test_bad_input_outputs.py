"""Bad input on the output side (issue 11): `generate --out` never replaces an image and its manifest
stays true to the folder; every number from a prompt file or the command line is checked, with one
line naming the file, line and key, before any model loads; the prompt filter sees through
look-alike letters and says what it refused, and a run that wrote nothing exits 3; `watermark
detect` reads each file's size from its header and answers for every file of a batch."""

import json
import struct
import zlib

import pytest
from PIL import Image, ImageFile
from typer.testing import CliRunner

from finetune.cli import app
from finetune.hooks import Provenance, build_hooks
from finetune.hooks.base import OutputImage
from finetune.hooks.pipeline import next_index, write_outputs
from finetune.hooks.prompt_filter import fold

runner = CliRunner()
FAST = ["--steps", "2", "--width", "64", "--height", "64"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def generate(base, out, *extra):
    return invoke("generate", "--base", base, *FAST, "--out", out, *extra)


def manifest(folder):
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


# --- generate --out never overwrites ---------------------------------------------------------------

def test_second_generate_into_the_same_folder_keeps_every_earlier_image(tiny_sd15, tmp_path):
    out = tmp_path / "g"
    r = generate(tiny_sd15, out, "--prompt", "a cat", "--n", "2", "--grid", "--hook", "provenance")
    assert r.exit_code == 0, r.output
    before = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert sorted(before) == ["00-a-cat-0.png", "01-a-cat-1.png", "grid.png"]

    r = generate(tiny_sd15, out, "--prompt", "a cat", "--n", "2", "--seed", "5", "--grid", "--hook", "provenance")
    assert r.exit_code == 0, r.output
    after = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert all(after[name] == data for name, data in before.items())  # untouched, byte for byte
    assert sorted(set(after) - set(before)) == ["02-a-cat-0.png", "03-a-cat-1.png", "grid-2.png"]

    rows = manifest(out)
    written = [row["file"] for row in rows if row["status"] == "written"]
    assert sorted(written) == sorted(after)  # one row per file in the folder, none for a missing file
    assert [row["seed"] for row in rows if row["file"] in ("02-a-cat-0.png", "03-a-cat-1.png")] == [5, 6]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def test_many_images_are_made_in_slices_with_the_same_seeds(tiny_sd15, tmp_path, monkeypatch):
    import numpy as np

    import finetune.train.sampling as sampling

    monkeypatch.setattr(sampling, "BATCH", 2)  # 3 images: a slice of 2, then 1
    out = tmp_path / "g"
    assert generate(tiny_sd15, out, "--prompt", "a cat", "--n", "3", "--no-hooks").exit_code == 0
    assert generate(tiny_sd15, out, "--prompt", "a cat", "--seed", "2", "--no-hooks").exit_code == 0
    assert [row["seed"] for row in manifest(out)] == [0, 1, 2, 2]
    third, alone = (np.asarray(Image.open(out / name)) for name in ("02-a-cat-2.png", "03-a-cat-0.png"))
    assert np.array_equal(third, alone)  # slicing does not change which image a seed gives


def test_a_taken_name_gets_a_new_one_and_refused_names_are_not_reused(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "00-x-0.png").write_bytes(b"someone else's file")
    item = OutputImage(Image.new("RGB", (8, 8)), Provenance(prompt="x"))
    (path,) = write_outputs([(out / "00-x-0.png", item)], out)
    assert path.name == "00-x-0-2.png" and (out / "00-x-0.png").read_bytes() == b"someone else's file"
    assert manifest(out)[0]["file"] == "00-x-0-2.png"
    # A refused prompt's planned names stay in the manifest: new images count on past them.
    write_outputs([], out, [(out / "07-y-0.png", Provenance(prompt="y"), [])])
    assert next_index(out) == 8 and next_index(tmp_path / "missing") == 0


def test_out_that_is_a_file_is_refused_before_loading(tiny_sd15, tmp_path):
    out = tmp_path / "file"
    out.write_text("keep me")
    r = generate(tiny_sd15, out, "--prompt", "a cat")
    assert r.exit_code == 1 and error_lines(r.output) == [f"error: --out: {out} exists and is not a folder"]
    assert out.read_text() == "keep me"


# --- numbers checked where they enter ----------------------------------------------------------------

BAD_ROWS = [
    ({"n": 100000000}, "n: must be from 1 to 1000, got 100000000"),
    ({"n": -1}, "n: must be from 1 to 1000, got -1"),
    ({"n": 0}, "n: must be from 1 to 1000, got 0"),
    ({"n": True}, "n: must be a whole number from 1 to 1000, got True"),
    ({"width": 0}, "width: must be from 8 to 8192, got 0"),
    ({"width": -64}, "width: must be from 8 to 8192, got -64"),
    ({"height": 16384}, "height: must be from 8 to 8192, got 16384"),
    ({"width": 100}, "width: 100 is not a multiple of 8"),
    ({"seed": 1.5}, "seed: must be a whole number from 0 to 9223372036854775807, got 1.5"),
    ({"seed": -3}, "seed: must be from 0 to 9223372036854775807, got -3"),
    ({"seed": 2**63}, "seed: must be from 0 to 9223372036854775807, got 9223372036854775808"),
    ({"seed": 2**63 - 1, "n": 2}, "seed: its 2 image(s) would need seeds past 9223372036854775807"),
    ({"width": "64px"}, "width: must be a whole number from 8 to 8192, got '64px'"),
]


@pytest.mark.parametrize("fields,message", BAD_ROWS, ids=[str(f) for f, _ in BAD_ROWS])
def test_bad_prompt_file_rows_are_one_line_naming_file_line_and_key(tiny_sd15, tmp_path, fields, message):
    pf = tmp_path / "rows.jsonl"
    pf.write_text('{"prompt": "a fine row"}\n\n' + json.dumps({"prompt": "a cat", **fields}) + "\n")
    r = generate(tiny_sd15, tmp_path / "g", "--prompts", pf)
    assert r.exit_code == 1, r.output
    (line,) = error_lines(r.output)
    if "would need seeds" in message:
        assert line == f"error: prompt 2 ('a cat'): {message}"
    else:
        assert line == f"error: {pf}:3: {message}"
    assert not (tmp_path / "g").exists()  # refused before the model loaded, nothing half made


def test_csv_rows_and_unreadable_numbers_are_one_line_with_a_short_excerpt(tiny_sd15, tmp_path):
    pf = tmp_path / "rows.csv"
    pf.write_text("prompt,n,seed\na cat,2,1\na dog,lots,\n")
    r = generate(tiny_sd15, tmp_path / "g", "--prompts", pf)
    assert error_lines(r.output) == [f"error: {pf}:3: n: must be a whole number from 1 to 1000, got 'lots'"]
    pf.write_text("prompt,n\na cat,2,extra\n")
    r = generate(tiny_sd15, tmp_path / "g", "--prompts", pf)
    assert error_lines(r.output) == [f"error: {pf}:2: more values than the header has columns"]
    huge = tmp_path / "huge.jsonl"
    huge.write_text('{"prompt": "a", "seed": ' + "9" * 5000 + "}\n")  # too long for Python's int()
    r = generate(tiny_sd15, tmp_path / "g", "--prompts", huge)
    (line,) = error_lines(r.output)
    assert r.exit_code == 1 and line.startswith(f"error: {huge}:1: not valid JSON") and len(line) < 250
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "a", "width": "w" * 100_000}) + "\n")
    r = generate(tiny_sd15, tmp_path / "g", "--prompts", long)
    (line,) = error_lines(r.output)
    assert r.exit_code == 1 and "(100000 characters)" in line and len(line) < len(str(long)) + 200
    assert not (tmp_path / "g").exists()


BAD_OPTIONS = [
    (["--n", "0"], "--n: must be from 1 to 1000, got 0"),
    (["--n", "1001"], "--n: must be from 1 to 1000, got 1001"),
    (["--steps", "0"], "--steps: must be from 1 to 1000, got 0"),
    (["--steps", "100000"], "--steps: must be from 1 to 1000, got 100000"),
    (["--seed", "-1"], "--seed: must be from 0 to 9223372036854775807, got -1"),
    (["--seed", str(2**63 - 1), "--n", "3"], "--seed: its 3 image(s) would need seeds past 9223372036854775807"),
    (["--width", "0"], "--width: must be from 8 to 8192, got 0"),
    (["--width", "-64"], "--width: must be from 8 to 8192, got -64"),
    (["--height", "100"], "--height: 100 is not a multiple of 8"),
    (["--height", "9000"], "--height: must be from 8 to 8192, got 9000"),
    (["--guidance", "nan"], "--guidance: must be a finite number, got nan"),
]


@pytest.mark.parametrize("args,message", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_command_line_numbers_are_one_line(tiny_sd15, tmp_path, args, message):
    r = invoke("generate", "--base", tiny_sd15, "--prompt", "a cat", "--out", tmp_path / "g", *args)
    assert r.exit_code == 1, r.output
    assert error_lines(r.output) == [f"error: {message}"]
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf"])
def test_lora_weight_must_be_finite(tiny_sd15, tmp_path, weight):
    lora = tmp_path / "a.safetensors"
    lora.write_bytes(b"")
    r = generate(tiny_sd15, tmp_path / "g", "--prompt", "a cat", "--lora", f"{lora}:{weight}")
    assert r.exit_code == 1
    from finetune.prompts import excerpt

    # Quoted as every option value is, cut short when long (a deep temporary folder can be).
    shown = excerpt(f"{lora}:{weight}")
    assert error_lines(r.output) == [f"error: --lora {shown}: the weight must be a finite number, got '{weight}'"]
    assert not (tmp_path / "g").exists()


# --- the prompt filter sees through look-alikes, and says what it refused ----------------------------

@pytest.mark.parametrize("prompt", [
    "a g\u043ere scene",            # Cyrillic о
    "a G\u039fR\u0415 scene",       # Greek Ο, Cyrillic Е, upper case
    "a \uff47\uff4f\uff52\uff45 scene",  # full-width
    "a \U0001d420\U0001d428\U0001d42b\U0001d41e scene",  # mathematical bold
    "a g\u200bo\u200dre scene",     # zero-width space and joiner
    "a g\u00f6r\u0113 scene",       # accents, precomposed
    "a go\u0308re scene",           # a combining accent
    "a g-\u043e r e scene",         # look-alike and spacing together
])
def test_prompt_filter_blocks_unicode_disguises(prompt):
    (hook,) = build_hooks([{"type": "prompt_filter", "block": ["gore"]}])
    assert hook.check_prompt(Provenance(prompt=prompt)) == "blocked term 'gore'"
    if "-" not in prompt:  # spacing tricks are for block words; a pattern sees the folded letters
        pattern = r"\bgore\b"
        (pattern_only,) = build_hooks([{"type": "prompt_filter", "patterns": [pattern]}])
        assert pattern_only.check_prompt(Provenance(prompt=prompt)) == f"matches pattern {pattern!r}"
    assert hook.check_prompt(Provenance(prompt="a gory scene in a garden")) is None  # folding is not fuzzing


def test_fold_keeps_plain_text_and_maps_look_alikes():
    assert fold("A Photo, of SKS ball") == "a photo, of sks ball"
    assert fold("\u0440\u0430\u0441\u0435") == "pace"  # Cyrillic р а с е
    assert fold("\u0397\u0395\u039b\u039b\u039f") == "he\u03bb\u03bbo"  # Greek Λ has no Latin twin


def test_refused_prompt_is_reported_and_all_refused_exits_3(tiny_sd15, tmp_path):
    hook = ["--hook", "{type: prompt_filter, block: [gore]}", "--hook", "provenance"]
    r = generate(tiny_sd15, tmp_path / "g", *hook, "--prompt", "a cat", "--prompt", "a g\u043ere scene", "--n", "2")
    assert r.exit_code == 0, r.output
    refused = [line for line in r.output.splitlines() if line.startswith("refused:")]
    assert refused == ["refused: prompt 'a g\u043ere scene' (2 image(s) not generated): prompt_filter: blocked term 'gore'"]
    assert sorted(p.name for p in (tmp_path / "g").glob("*.png")) == ["00-a-cat-0.png", "01-a-cat-1.png"]
    assert [row["status"] for row in manifest(tmp_path / "g")] == ["written", "written", "blocked", "blocked"]

    r = generate(tiny_sd15, tmp_path / "h", *hook, "--prompt", "\uff47\uff4f\uff52\uff45", "--prompt", "G\u039fRE")
    assert r.exit_code == 3, r.output
    lines = error_lines(r.output)
    assert len(lines) == 3 and all(line.startswith("refused: prompt ") for line in lines[:2])
    assert lines[2].startswith("error: nothing written: the output hooks refused or rejected every image")
    assert not list((tmp_path / "h").glob("*.png"))
    assert [row["status"] for row in manifest(tmp_path / "h")] == ["blocked", "blocked"]


# --- watermark detect: header first, every file answered --------------------------------------------

def png_claiming(path, width, height):
    """A valid PNG header claiming width x height, with a few bytes of pixel data: what a
    decompression bomb looks like to a reader, at no cost to make."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_watermark_detect_answers_every_file_and_never_decodes_a_bomb(tmp_path, monkeypatch):
    bomb = png_claiming(tmp_path / "bomb.png", 20000, 20000)
    real = tmp_path / "real.png"
    Image.new("RGB", (256, 256), (90, 120, 200)).save(real)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    cut = tmp_path / "cut.png"
    cut.write_bytes(real.read_bytes()[:200])
    missing = tmp_path / "missing.png"
    loaded = []
    original_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loaded.append(self.filename) or original_load(self))

    r = invoke("watermark", "detect", bomb, real, missing, text, cut, "--outputs", tmp_path / "none")
    assert r.exit_code == 2, r.output
    lines = error_lines(r.output)
    assert lines[0] == (f"{bomb}: skipped: 20000x20000 is 400,000,000 pixels, over the limit of 40,000,000 "
                        "(--max-pixels); not decoded")
    assert lines[1].startswith(f"{real}: not found (check bits ") and lines[1].endswith(" at best), unknown")
    assert lines[2:] == [f"{missing}: skipped: no such file", f"{text}: skipped: not an image PIL can read",
                         f"{cut}: skipped: cannot decode (image file is truncated)"]
    assert str(bomb) not in loaded and str(real) in loaded

    r = invoke("watermark", "detect", real, "--max-pixels", "1000", "--outputs", tmp_path / "none")
    assert r.exit_code == 2 and "256x256 is 65,536 pixels, over the limit of 1,000" in r.output
    r = invoke("watermark", "detect", real, "--outputs", tmp_path / "none")
    assert r.exit_code == 1 and ": not found" in r.output  # checked, unmarked: 1, not 2
    r = invoke("watermark", "detect", real, "--max-pixels", "0")
    assert r.exit_code == 1 and error_lines(r.output) == ["error: --max-pixels: must be at least 1, got 0"]


def test_watermark_detect_escapes_control_characters_in_names(tmp_path):
    odd = tmp_path / "a\nb: found.png"
    Image.new("RGB", (256, 256), (90, 120, 200)).save(odd)
    r = invoke("watermark", "detect", odd, "--outputs", tmp_path / "none")
    (line,) = error_lines(r.output)  # the newline cannot forge a second answer
    assert line.startswith(repr(str(odd)) + ": not found")


def test_watermark_detect_reads_manifests_like_every_other_reader(tmp_path):
    from finetune.hooks.watermark import KnownPayload, known_payloads

    outputs = tmp_path / "outputs"
    mark = {"hook": "watermark", "watermarked": True, "payload": "ab" * 8, "method": "dwtDctSvd", "strength": 30,
            "payload_bits": 64}
    (outputs / "g").mkdir(parents=True)
    (outputs / "g" / "manifest.jsonl").write_text("\n".join([
        "[1, 2]", "not json", "",  # rows no writer of ours makes: passed over, as next_index passes them
        json.dumps({"file": "00-a-cat-0.png", "prompt": "a cat", "verdicts": ["junk", mark]})]) + "\n")
    (outputs / "h").mkdir()
    (outputs / "h" / "manifest.jsonl").write_bytes(b"\xff\xfe not UTF-8\n")  # unreadable: the others still count
    (outputs / "i" / "manifest.jsonl").mkdir(parents=True)
    assert known_payloads(outputs) == {"ab" * 8: KnownPayload(images={"g/": ["00-a-cat-0.png"]})}


# --- validation samples during training --------------------------------------------------------------

def test_validation_samples_refused_or_rejected_during_training_are_printed(tiny_sd15, tmp_path):
    import yaml

    from .helpers import make_image_folder, tiny_recipe

    raw = tiny_recipe(tiny_sd15, make_image_folder(tmp_path / "data", n=2), tmp_path / "out", training__max_steps=1)
    raw["validation"]["prompts"] = ["a photo of sks ball", "a g\u043ere scene"]
    # 64 px samples are under the watermark's minimum area: `reject` turns each one away.
    raw["output"]["hooks"] = [{"type": "prompt_filter", "block": ["gore"]},
                              {"type": "watermark", "min_size_action": "reject"}]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    r = invoke("train", recipe, "--no-progress")
    assert r.exit_code == 0, r.output
    samples = tmp_path / "out" / "run" / "samples" / "step-000001"
    lines = r.output.splitlines()
    assert ("refused: prompt 'a g\u043ere scene' (1 image(s) not generated): prompt_filter: blocked term 'gore'"
            in lines), r.output
    assert [line for line in lines if line.startswith("rejected: ")] == [
        "rejected: 00-a-photo-of-sks-ball-0.png (watermark: 64x64 is below the watermark's minimum area of "
        "256x256 pixels; min_size_action: reject)"], r.output
    assert not list(samples.glob("*.png"))
    assert [row["status"] for row in manifest(samples)] == ["rejected", "blocked"]


def test_a_lora_of_another_model_is_one_line(tiny_run, tmp_path, capfd):
    """An SD1.5 LoRA on SDXL: diffusers logs each of its ~100 mismatched tensors before raising."""
    lora = tiny_run("sd1", "lora") / "pytorch_lora_weights.safetensors"
    from finetune.tiny_models import resolve_builtin

    resolve_builtin("tiny-sdxl")  # built (and its chatter printed) before the command is watched
    capfd.readouterr()
    r = generate("builtin:tiny-sdxl", tmp_path / "g", "--prompt", "x", "--lora", lora)
    printed = [line for line in (r.output + capfd.readouterr().err).splitlines() if line.strip()]
    assert r.exit_code == 1
    assert len(printed) == 1 and "does not fit builtin:tiny-sdxl" in printed[0], printed[:3]
    assert "tensors have other shapes" in printed[0] and not (tmp_path / "g").exists()
