"""The watermark hook: the payload names what made an image and reads back (also after JPEG);
images we did not make are "not found"; small images are handled as configured, never silently;
a detected payload is matched to its run folder; the hook runs through the output pipeline."""

import hashlib
import io
import json
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from finetune.hooks import build_hooks, validate_hook_configs
from finetune.hooks import watermark as wm
from finetune.hooks.base import OutputImage, Provenance
from finetune.hooks.pipeline import OutputPipeline, write_outputs

from .helpers import draw_subject


@pytest.fixture(scope="module")
def generated(tiny_sd15):
    """Two 256 px images from the tiny SD1.5 (the method's minimum area is 256x256)."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15)
    pipe.set_progress_bar_config(disable=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared CPU, OpenMP oversubscription can make this 30x slower
    try:
        return pipe(["a photo of a dog", "a red car"], num_inference_steps=2, width=256, height=256,
                    generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images
    finally:
        torch.set_num_threads(threads)


def drawn(seed: int, size=512) -> Image.Image:
    """A drawn scene: gradient sky, a disc and ridges, with grain."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, size)[:, None, None]
    a = rng.uniform(40, 160, 3) * (1 - y) + rng.uniform(120, 255, 3) * y
    img = Image.fromarray(np.broadcast_to(a, (size, size, 3)).astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.ellipse([size // 3, size // 8, size // 2, size // 4], fill=(250, 240, 200))
    xs = np.linspace(0, size, 10)
    d.polygon([(0, size)] + list(zip(xs.tolist(), (size * 0.6 - rng.uniform(0, size / 4, 10)).tolist())) + [(size, size)],
              fill=tuple(int(v) for v in rng.integers(20, 120, 3)))
    arr = np.asarray(img, dtype=np.float64) + rng.normal(0, 2, (size, size, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def prov(**kw) -> Provenance:
    base = dict(prompt="a photo of sks dog", seed=1, base_model="builtin:tiny-sd15",
                adapters=[{"path": "outputs/run-a/run-a.safetensors", "sha256": "ab" * 32, "weight": 1.0}])
    base.update(kw)
    return Provenance(**base)


def hook(**cfg):
    (h,) = build_hooks([{"type": "watermark", **cfg}])
    return h


def jpeg(im: Image.Image, q: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_round_trip_on_generated_images_recovers_the_payload(generated):
    for i, image in enumerate(generated):
        p = prov(seed=i)
        item = hook().process(OutputImage(image.copy(), p))
        expected = wm.bits_to_hex(wm.payload_for(p))
        (v,) = item.verdicts
        assert v.action == "transform" and v.details["payload"] == expected and v.details["watermarked"]
        assert json.loads(item.text["finetune_watermark"])["payload"] == expected
        assert np.abs(np.asarray(item.image, float) - np.asarray(image, float)).mean() < 2  # invisible-ish
        r = wm.detect(item.image)
        assert r["verdict"] == "found" and r["payload"] == expected and r["check_bits"] == (20, 20)
        assert wm.detect(image)["verdict"] == "not found"  # the unmarked original


def test_detected_after_jpeg_q90(generated):
    p = prov()
    for image in [*generated, drawn(3)]:
        marked = hook().process(OutputImage(image, p)).image
        r = wm.detect(jpeg(marked, 90))
        assert r["verdict"] == "found" and r["payload"] == wm.bits_to_hex(wm.payload_for(p))


def test_images_we_did_not_make_are_not_found(generated, tmp_path):
    rng = np.random.default_rng(0)
    others = [Image.fromarray(rng.integers(0, 256, (320, 320, 3), dtype=np.uint8)),
              draw_subject(1, (512, 512)), drawn(7), drawn(8, 384), Image.new("RGB", (512, 512), (30, 90, 200)),
              generated[0], jpeg(drawn(9), 75).convert("RGB")]
    known = {wm.bits_to_hex(wm.payload_for(prov(run=f"r{i}", adapters=[]))): f"r{i}" for i in range(50)}
    paths = []
    for i, im in enumerate(others):
        assert wm.detect(im)["verdict"] == "not found", i
        r = wm.detect(im, known)
        assert r["verdict"] == "not found" and r["match"] is None, i
        im.save(tmp_path / f"other{i}.png")
        paths.append(tmp_path / f"other{i}.png")
    lines, code = wm.detect_report(paths, tmp_path / "no-outputs")
    assert code == 1 and len(lines) == len(paths)
    assert all(": not found" in line and line.endswith("unknown") for line in lines)


def test_check_bits_reject_a_payload_that_is_not_ours():
    bits = wm.payload_for(prov())
    assert wm.check_ok(bits) == wm.CHECK_BITS
    flipped = bits.copy()
    flipped[3] ^= 1  # one identifying bit wrong: the check no longer agrees
    assert wm.check_ok(flipped) < wm.CHECK_BITS
    marked = wm.embed_bits(drawn(1), flipped)
    assert wm.detect(marked)["verdict"] == "not found"


def test_small_images_are_handled_explicitly():
    small = drawn(2, 128)  # 128x128: below the 256x256 minimum area
    p = prov()
    expected = wm.bits_to_hex(wm.payload_for(p))

    item = hook(min_size_action="reject").process(OutputImage(small.copy(), p))
    assert item.rejected and "below the watermark's minimum" in item.rejected
    assert item.verdicts[-1].action == "reject" and item.verdicts[-1].details["watermarked"] is False

    item = hook(min_size_action="skip_with_verdict").process(OutputImage(small.copy(), p))
    assert not item.rejected
    v = item.verdicts[-1]
    assert v.action == "pass" and "below the watermark's minimum" in v.reason and v.details["watermarked"] is False
    assert np.array_equal(np.asarray(item.image), np.asarray(small))
    assert json.loads(item.text["finetune_watermark"])["watermarked"] is False

    for side, factor in ((128, 2), (64, 4)):  # default: upscale, embed, add the change back at the small size
        small = drawn(2, side)
        item = hook().process(OutputImage(small.copy(), p))
        v = item.verdicts[-1]
        assert v.action == "transform" and v.details["upscaled"] == factor and v.details["watermarked"] is True
        assert item.image.size == small.size and not np.array_equal(np.asarray(item.image), np.asarray(small))
        r = wm.detect(item.image)
        assert r["verdict"] == "found" and r["payload"] == expected and r["size"] == (256, 256)


def test_a_mark_that_does_not_read_back_is_reported_not_claimed():
    white = Image.new("RGB", (512, 512), (255, 255, 255))  # saturated: the mark clips away
    item = hook().process(OutputImage(white.copy(), prov()))
    v = item.verdicts[-1]
    assert v.action == "pass" and "did not read back" in v.reason and v.details["watermarked"] is False
    assert np.array_equal(np.asarray(item.image), np.asarray(white))
    item = hook(on_failure="reject").process(OutputImage(white.copy(), prov()))
    assert item.rejected and "did not read back" in item.rejected


def test_payload_is_deterministic_and_names_the_adapter_run_and_base():
    a = wm.payload_for(prov())
    assert np.array_equal(a, wm.payload_for(prov(base_model="/models/tiny-sd15/", seed=9, prompt="other")))
    assert not np.array_equal(a, wm.payload_for(prov(adapters=[{"path": "x", "sha256": "cd" * 32, "weight": 1}])))
    assert not np.array_equal(a[:32], wm.payload_for(prov(adapters=[], run="run-a"))[:32])
    other_base = wm.payload_for(prov(base_model="sdxl-base"))
    assert np.array_equal(a[:32], other_base[:32]) and not np.array_equal(a[32:44], other_base[32:44])


def _run_folder(root, name, base, files):
    from safetensors.numpy import save_file

    run = root / name
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(f"model:\n  base: {base}\noutput:\n  dir: {root}\n", encoding="utf-8")
    paths = []
    for i, fname in enumerate(files):
        (run / fname).parent.mkdir(parents=True, exist_ok=True)
        # content unique to the run and file (equal content is one adapter, whichever run holds it)
        save_file({"w": np.full((4, 4), zlib.crc32(name.encode()) % 100_000 * 10 + i, dtype=np.float32)}, str(run / fname))
        paths.append(run / fname)
    return paths


def test_known_payloads_map_a_detected_payload_to_its_run_folder(tmp_path):
    outputs = tmp_path / "outputs"
    (a_file,) = _run_folder(outputs, "run-a", "builtin:tiny-sd15", ["run-a.safetensors"])
    _run_folder(outputs, "run-b", "builtin:tiny-sd15", ["run-b.safetensors", "checkpoints/step-000002/run-b.safetensors"])
    digest = hashlib.sha256(a_file.read_bytes()).hexdigest()
    # generated with run-a's adapter; the base is spelled as a path this time
    p = prov(adapters=[{"path": str(a_file), "sha256": digest, "weight": 0.8}], base_model="/models/tiny-sd15")
    known = wm.known_payloads(outputs)
    payload = wm.bits_to_hex(wm.payload_for(p))
    assert known[payload] == wm.KnownPayload(sources=["run run-a, adapter run-a.safetensors"])
    # validation samples of run-b while it trained
    samples = wm.bits_to_hex(wm.payload_for(prov(adapters=[], run="run-b")))
    assert known[samples].sources == ["run run-b (samples while training)"]

    marked = hook().process(OutputImage(drawn(4), p)).image
    marked.save(tmp_path / "made.png")
    jpeg(marked, 90).save(tmp_path / "made.jpg")
    drawn(5).save(tmp_path / "not-made.png")
    lines, code = wm.detect_report([tmp_path / "made.png", tmp_path / "made.jpg", tmp_path / "not-made.png"], outputs)
    assert code == 1  # one image is not ours
    for line in lines[:2]:
        assert f": found, payload {payload}" in line and line.endswith("run run-a, adapter run-a.safetensors")
        assert "one of" not in line and "run-b" not in line
    r = wm.detect(marked, known)
    assert r["match"] == "run run-a, adapter run-a.safetensors" and r["candidates"] == [r["match"]]
    assert "not found" in lines[2] and "run-a" not in lines[2]
    lines, code = wm.detect_report([tmp_path / "made.png"], outputs)
    assert code == 0


def _publish(folder, items):
    """Mark each (name, Provenance) on its own drawn image and write it through the output pipeline."""
    pipeline = OutputPipeline([hook()])
    return write_outputs([(folder / name, pipeline.process(OutputImage(drawn(i, 256), p)))
                          for i, (name, p) in enumerate(items)], folder)


def test_images_from_the_base_alone_name_the_base_and_every_folder_not_a_run(tmp_path):
    """Every image made from one base model without adapters carries one payload: attribution names
    the base model and all the folders such images were seen in, and no run as their source."""
    outputs = tmp_path / "outputs"
    plain = prov(adapters=[], run=None)
    gen = _publish(outputs / "gen", [(f"{i:02d}-a-cat-0.png", plain) for i in range(4)])
    (batch,) = _publish(outputs / "batch", [("00-a-dog-0.png", plain)])
    payload = wm.bits_to_hex(wm.payload_for(plain))

    # no run folder yet: only the images are known, and both folders are listed
    (line,), code = wm.detect_report([batch], outputs)
    assert code == 0 and f"found, payload {payload}" in line
    assert line.endswith(": seen in 2 output folders: batch/: 1 image (00-a-dog-0.png); "
                         "gen/: 4 images (00-a-cat-0.png, 01-a-cat-0.png, 02-a-cat-0.png, ...)")

    _run_folder(outputs, "run-a", "builtin:tiny-sd15", ["run-a.safetensors"])
    _run_folder(outputs, "run-b", "/models/tiny-sd15", ["run-b.safetensors"])
    known = wm.known_payloads(outputs)
    assert known[payload].sources == ["base model tiny-sd15 without adapters"]  # one source, from both recipes
    assert list(known[payload].images) == ["batch/", "gen/"]
    r = wm.detect(Image.open(gen[0]), known)
    assert r["match_payload"] == payload
    assert r["candidates"] == ["base model tiny-sd15 without adapters", "batch/: 1 image (00-a-dog-0.png)",
                               "gen/: 4 images (00-a-cat-0.png, 01-a-cat-0.png, 02-a-cat-0.png, ...)"]
    lines, code = wm.detect_report([gen[0], batch], outputs)
    assert code == 0
    for line in lines:
        assert line.endswith(": base model tiny-sd15 without adapters; seen in batch/ (1 image), gen/ (4 images)")
        assert "run-a" not in line and "run-b" not in line


def test_one_adapter_copied_into_two_runs_lists_both_runs(tmp_path):
    outputs = tmp_path / "outputs"
    (a_file,) = _run_folder(outputs, "run-a", "builtin:tiny-sd15", ["run-a.safetensors"])
    (outputs / "run-b").mkdir()
    (outputs / "run-b" / "recipe.yaml").write_text((outputs / "run-a" / "recipe.yaml").read_text())
    (outputs / "run-b" / "copy.safetensors").write_bytes(a_file.read_bytes())
    adapter = {"path": str(a_file), "sha256": hashlib.sha256(a_file.read_bytes()).hexdigest(), "weight": 1.0}
    both = ["run run-a, adapter run-a.safetensors", "run run-b, adapter copy.safetensors"]

    marked = hook().process(OutputImage(drawn(4), prov(adapters=[adapter]))).image
    r = wm.detect(marked, wm.known_payloads(outputs))
    assert r["verdict"] == "found" and r["candidates"] == both
    assert r["match"] == "one of 2 known sources (the watermark cannot tell them apart): " + "; ".join(both)

    # the same adapter on a base neither recipe names: still both runs, each said to be on another base
    other = hook().process(OutputImage(drawn(4), prov(adapters=[adapter], base_model="other-base"))).image
    r = wm.detect(other, wm.known_payloads(outputs))
    assert r["candidates"] == [f"{c}, but on another base model" for c in both]
    assert r["match"].startswith("one of 2 known sources")


def test_hook_through_build_hooks_and_the_output_pipeline(tmp_path):
    pipeline = OutputPipeline(build_hooks([{"type": "watermark"}, {"type": "provenance"}]))
    p = prov(adapters=[], run="my-run")
    item = pipeline.process(OutputImage(drawn(6), p))
    assert [v.hook for v in item.verdicts] == ["watermark", "provenance"]
    out = tmp_path / "gen"
    (path,) = write_outputs([(out / "00.png", item)], out)
    expected = wm.bits_to_hex(wm.payload_for(p))
    saved = Image.open(path)
    assert json.loads(saved.text["finetune_watermark"])["payload"] == expected
    row = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert row["verdicts"][0]["payload"] == expected and row["verdicts"][0]["watermarked"] is True
    # the manifest is a known source too: the detector names the file it wrote
    lines, code = wm.detect_report([path], tmp_path)
    assert code == 0 and ": found, payload" in lines[0]
    assert lines[0].endswith(": seen in gen/: 1 image (00.png)")


def test_config_is_validated():
    assert validate_hook_configs([{"type": "watermark"}])[0]["method"] == "dwtDctSvd"
    for bad in ({"min_size_action": "ignore"}, {"method": "rivaGan"}, {"strength": 0}, {"payload_bits": 50}, {"colour": 1}):
        with pytest.raises(ValueError):
            validate_hook_configs([{"type": "watermark", **bad}])


def test_vectorised_decoding_matches_the_library_vote_for_vote():
    from imwatermark.dwtDctSvd import EmbedDwtDctSvd
    from imwatermark.maxDct import EmbedMaxDct

    frame = np.random.default_rng(0).normal(100, 60, (64, 96))
    for method, cls in (("dwtDctSvd", EmbedDwtDctSvd), ("dwtDct", EmbedMaxDct)):
        lib = cls([], wmLen=16).decode_frame(frame, 30, [[] for _ in range(16)])
        ours = wm.block_votes(frame, method, 30)
        assert [ours[i::16].tolist() for i in range(16)] == lib


def test_adapter_hashes_are_remembered_on_disk_until_the_file_changes(tmp_path, monkeypatch):
    """`watermark detect` hashes every file under outputs/; a multi-GB checkpoint is read once,
    not on every call, and a changed file is read again."""
    import hashlib
    import os

    from finetune import cache

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "a.safetensors"
    f.write_bytes(b"one")
    assert cache.file_sha256(f) == hashlib.sha256(b"one").hexdigest()
    cache.flush()  # as at exit
    cache._memory.clear()  # a new process
    cache._disks.clear()
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: (reads.append(str(p)), real_open(p, *a, **k))[1])
    assert cache.file_sha256(f) == hashlib.sha256(b"one").hexdigest()
    assert str(f) not in reads  # answered from the cache file
    f.write_bytes(b"two!")
    os.utime(f, ns=(1, 1))
    assert cache.file_sha256(f) == hashlib.sha256(b"two!").hexdigest()
    assert str(f) in reads
    (tmp_path / "cache" / cache.HASHES_FILE).write_text("{not json")  # a damaged cache is ignored, not fatal
    cache._memory.clear()
    cache._disks.clear()
    assert cache.file_sha256(f) == hashlib.sha256(b"two!").hexdigest()
