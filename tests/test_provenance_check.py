"""`finetune provenance check`: Content Credentials and the watermark read together. Intact, tampered
(one pixel changed in place), stripped (re-encoded), unmarked, another generator's credentials, a
missing file; the verdicts, the exit codes and their precedence, --trust, --json, through the CLI.
Offline and CPU only: a local credential under tmp_path, a drawn 256 px image, no model."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from finetune.cli import app
from finetune.hooks import build_hooks, c2pa_sign
from finetune.hooks import provenance_check as pc
from finetune.hooks.base import OutputImage, Provenance
from finetune.hooks.credentials import find_credential, precheck

from .helpers import png_chunks

INTACT = "made by finetune, credentials intact"
TAMPERED = "made by finetune, credentials tampered, watermark found"
STRIPPED = "made by finetune, credentials stripped, watermark found"
NO_SIGN = "no sign of finetune"


def scene(seed: int, size: int = 256) -> Image.Image:
    """A gradient sky, a disc and grain: enough texture for the watermark to read back."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, size)[:, None, None]
    sky = rng.uniform(40, 160, 3) * (1 - y) + rng.uniform(120, 255, 3) * y
    img = Image.fromarray(np.broadcast_to(sky, (size, size, 3)).astype(np.uint8))
    ImageDraw.Draw(img).ellipse([size // 3, size // 3, size * 2 // 3, size * 2 // 3], fill=(220, 60, 20))
    arr = np.asarray(img, dtype=np.float64) + rng.normal(0, 2, (size, size, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"compress_level": 0} if fmt == "PNG" else {"quality": 95}))
    return buf.getvalue()


def record(payload, sha) -> dict:
    return {"toolkit": "finetune 0.1.0", "kind": "generate", "base_model": "builtin:tiny-sd15",
            "adapters": [{"name": "run-a.safetensors", "sha256": sha, "weight": 0.8}], "prompt": "a cat", "seed": 1,
            "steps": 4, "guidance": 7.5, "width": 256, "height": 256, "run": None,
            "watermark": {"payload": payload, "method": "dwtDctSvd"} if payload else None}


def one_pixel_changed(png: bytes) -> bytes:
    """The PNG with one pixel changed in place. Saved with compress_level=0, its zlib stream is stored
    blocks of raw rows, so the rows (re-serialised unfiltered, the same length) are written back where
    they lay, the adler32 and each IDAT's CRC recomputed: every chunk, the manifest's caBX too, keeps
    its length and position, and only the signed hash of the pixel data no longer matches."""
    pixels = np.array(Image.open(io.BytesIO(png)))
    pixels[100, 100, 0] ^= 0x10
    raw = b"".join(b"\0" + row.tobytes() for row in pixels)  # filter type 0 (None) on every row
    idats = [(pos, body) for pos, kind, body in png_chunks(png) if kind == b"IDAT"]
    stream = bytearray(b"".join(body for _, body in idats))
    pos, at, final = 2, 0, False  # after the zlib header
    while not final:
        assert stream[pos] & 0b110 == 0  # a stored block: header, LEN, NLEN, LEN raw bytes
        final, n = bool(stream[pos] & 1), int.from_bytes(stream[pos + 1:pos + 3], "little")
        stream[pos + 5:pos + 5 + n] = raw[at:at + n]
        pos, at = pos + 5 + n, at + n
    assert at == len(raw)
    stream[-4:] = struct.pack(">I", zlib.adler32(raw))
    out, at = bytearray(png), 0
    for pos, body in idats:
        new = bytes(stream[at:at + len(body)])
        at += len(body)
        out[pos + 8:pos + 12 + len(body)] = new + struct.pack(">I", zlib.crc32(b"IDAT" + new))
    assert len(out) == len(png)
    assert (np.asarray(Image.open(io.BytesIO(bytes(out)))) != np.asarray(Image.open(io.BytesIO(png)))).sum() == 1
    return bytes(out)


def sign_as(data: bytes, mime: str, signer, generator: str) -> bytes:
    """Credentials made by another tool (the same local signer, another claim generator)."""
    import c2pa

    definition = {"claim_generator_info": [{"name": generator, "version": "2.0"}],
                  "assertions": [{"label": "c2pa.actions", "data": {"actions": [{"action": "c2pa.created",
                  "digitalSourceType": "http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture"}]}}]}
    dest = io.BytesIO()
    with c2pa.Builder(json.dumps(definition), context=c2pa_sign._context({"builder": {"thumbnail": {"enabled": False}}})) as b:
        b.sign(signer, mime, io.BytesIO(data), dest)
    return dest.getvalue()


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Every image the tests check, written once: outputs/ holds the run whose adapter made them."""
    root = tmp_path_factory.mktemp("provenance")
    cred = find_credential(env={}, config_dir=root / "c2pa")
    signer = precheck(cred)
    run = root / "outputs" / "run-a"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text("model: {base: 'builtin:tiny-sd15'}\n")
    (run / "run-a.safetensors").write_bytes(b"stands in for an adapter: the watermark hashes the file")
    sha = hashlib.sha256((run / "run-a.safetensors").read_bytes()).hexdigest()
    prov = Provenance(prompt="a cat", seed=1, base_model="builtin:tiny-sd15",
                      adapters=[{"path": str(run / "run-a.safetensors"), "sha256": sha, "weight": 0.8}])
    (hook,) = build_hooks([{"type": "watermark"}])
    item = hook.process(OutputImage(scene(0), prov))
    payload = item.verdicts[0].details["payload"]
    marked, plain = item.image, scene(1)
    png, jpg = encode(marked, "PNG"), encode(marked, "JPEG")
    files = {
        "intact.png": c2pa_sign.sign(png, "image/png", signer, record(payload, sha), "0.1.0"),
        "intact.jpg": c2pa_sign.sign(jpg, "image/jpeg", signer, record(payload, sha), "0.1.0"),
        "plain.png": encode(plain, "PNG"),
        "other-tool.png": sign_as(encode(plain, "PNG"), "image/png", signer, "othertool"),
        "unmarked-tampered.png": one_pixel_changed(
            c2pa_sign.sign(encode(plain, "PNG"), "image/png", signer, record(None, sha), "0.1.0")),
        "conflict.png": c2pa_sign.sign(png, "image/png", signer, record("00" * 8, sha), "0.1.0"),
    }
    files["tampered.png"] = one_pixel_changed(files["intact.png"])
    reencoded = io.BytesIO()
    Image.open(io.BytesIO(files["intact.png"])).save(reencoded, format="JPEG", quality=90)
    files["reencoded.jpg"] = reencoded.getvalue()
    for name, data in files.items():
        (root / name).write_bytes(data)
    return {"root": root, "outputs": root / "outputs", "cred": cred, "payload": payload, "sha": sha}


def report(case, *names, **kw):
    return pc.check_report([case["root"] / n for n in names], case["outputs"], **kw)


def one(case, name, **kw) -> dict:
    (r,) = json.loads(report(case, name, as_json=True, **kw)[0][0])
    return r


def test_intact_png_and_jpeg_say_made_by_finetune_with_everything_recorded(case):
    lines, code = report(case, "intact.png", "intact.jpg")
    assert code == 0
    assert [line for line in lines if not line.startswith("  ")] == [
        f"{case['root'] / 'intact.png'}: {INTACT}", f"{case['root'] / 'intact.jpg'}: {INTACT}"]
    assert ("  credentials: valid (signer not on a trust list): finetune local signer (finetune (self-signed)), "
            "finetune/0.1.0, trainedAlgorithmicMedia") in lines
    assert (f"  recorded: base builtin:tiny-sd15; adapters run-a.safetensors ({case['sha'][:12]}) x0.8; run -") in lines
    for name in ("intact.png", "intact.jpg"):
        r = one(case, name)
        assert r["verdict"] == INTACT and r["made_by_finetune"] and r["conflicts"] == []
        c, w = r["c2pa"], r["watermark"]
        assert c["status"] == "valid" and c["generator"] == "finetune/0.1.0" and c["base_model"] == "builtin:tiny-sd15"
        assert c["adapters"] == [{"name": "run-a.safetensors", "sha256": case["sha"], "weight": 0.8}]
        assert c["watermark_payload"] == case["payload"] and c["digital_source_type"].endswith("trainedAlgorithmicMedia")
        assert w["found"] and w["payload"] == case["payload"]
        assert "run-a" in w["match"] and "run-a.safetensors" in w["match"]  # matched to the run folder's adapter


def test_trust_anchor_makes_the_signer_trusted(case, tmp_path):
    lines, code = report(case, "intact.png", trust=[case["cred"].ca])
    assert code == 0 and lines[1].startswith("  credentials: valid, signer trusted (chains to --trust): finetune local")
    assert one(case, "intact.jpg", trust=[case["cred"].ca])["c2pa"]["status"] == "trusted"
    other = find_credential(env={}, config_dir=tmp_path / "other").ca  # a CA that did not issue the signer
    lines, code = report(case, "intact.png", trust=[other])
    assert code == 0 and "valid (signer not on a trust list: it does not chain to --trust)" in lines[1]


def test_one_pixel_changed_reads_tampered_and_still_made_by_finetune(case):
    lines, code = report(case, "tampered.png")
    assert code == 3 and lines[0].endswith(f": {TAMPERED}")
    assert lines[1].startswith("  credentials: tampered: the image no longer matches its credentials "
                               "(assertion.dataHash.mismatch); they claim finetune local signer")
    assert lines[2].startswith("  claimed (not vouched for): base builtin:tiny-sd15")
    r = one(case, "unmarked-tampered.png")
    assert r["verdict"] == "made by finetune, credentials tampered, no watermark found" and r["made_by_finetune"]
    assert report(case, "unmarked-tampered.png")[1] == 3


def test_reencoded_image_has_credentials_stripped_but_the_watermark(case):
    lines, code = report(case, "reencoded.jpg")
    assert code == 3 and lines[0].endswith(f": {STRIPPED}")
    assert lines[1].startswith("  credentials: none")
    r = one(case, "reencoded.jpg")
    assert r["c2pa"]["status"] == "absent" and r["watermark"]["payload"] == case["payload"] and r["made_by_finetune"]


def test_unmarked_unsigned_and_other_generators_images_show_no_sign_of_finetune(case):
    lines, code = report(case, "plain.png")
    assert code == 1 and lines[0].endswith(f": {NO_SIGN}") and "  watermark: not found" in lines
    lines, code = report(case, "other-tool.png", "intact.png")
    assert code == 1 and lines[0].endswith(f": {NO_SIGN}")
    assert lines[1] == ("  credentials: valid (signer not on a trust list): credentials by othertool/2.0, not finetune; "
                        "finetune local signer (finetune (self-signed))")
    r = one(case, "other-tool.png")
    assert r["c2pa"]["status"] == "valid" and not r["made_by_finetune"] and not r["watermark"]["found"]


def test_recorded_payload_that_disagrees_with_the_watermark_is_reported(case):
    lines, code = report(case, "conflict.png")
    assert code == 0 and lines[0].endswith(f": {INTACT}; evidence conflict")
    assert f"  evidence conflict: the credentials record watermark payload {'00' * 8}, but the image carries " \
           f"{case['payload']}" in lines
    assert one(case, "conflict.png")["conflicts"] and not one(case, "intact.png")["conflicts"]


def test_unreadable_files_are_skipped_and_outrank_every_other_code(case, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    paths = [tmp_path / "missing.png", case["root"] / "plain.png", tmp_path / "notes.png", case["root"] / "tampered.png"]
    lines, code = pc.check_report(paths, case["outputs"])
    assert code == 2
    assert lines[0] == f"{tmp_path / 'missing.png'}: skipped: no such file"
    assert any(line.startswith(f"{tmp_path / 'notes.png'}: skipped: not an image") for line in lines)
    assert sum(1 for line in lines if not line.startswith("  ")) == 4  # the others were still checked
    lines, code = pc.check_report([case["root"] / "intact.png"], case["outputs"], max_pixels=100)
    assert code == 2 and "over the limit of 100" in lines[0]
    # 1 outranks 3, 3 outranks 0
    assert report(case, "tampered.png", "plain.png", "intact.png")[1] == 1
    assert report(case, "intact.png", "reencoded.jpg")[1] == 3


def test_json_is_one_document_with_every_field(case):
    (text,), code = report(case, "intact.png", "reencoded.jpg", "missing.png", as_json=True)
    assert code == 2
    results = json.loads(text)
    assert [r["verdict"] for r in results] == [INTACT, STRIPPED, None]
    assert set(results[0]) >= {"file", "c2pa", "watermark", "verdict", "made_by_finetune", "conflicts"}
    assert set(results[0]["c2pa"]) >= {"status", "signer", "generator", "digital_source_type", "base_model",
                                       "adapters", "run", "watermark_payload", "codes"}
    assert set(results[0]["watermark"]) >= {"found", "payload", "match", "candidates"}
    assert results[0]["c2pa"]["signer"]["common_name"] == "finetune local signer"
    assert results[2]["skipped"] == "no such file" and not results[2]["made_by_finetune"]


runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_cli(case, tmp_path):
    root = case["root"]
    r = invoke("provenance", "check", root / "intact.png", root / "intact.jpg", "--outputs", case["outputs"],
               "--trust", case["cred"].ca, "--json")
    assert r.exit_code == 0, r.output
    assert [x["c2pa"]["status"] for x in json.loads(r.output)] == ["trusted", "trusted"]
    r = invoke("provenance", "check", root / "reencoded.jpg", "--outputs", case["outputs"])
    assert r.exit_code == 3 and f"{root / 'reencoded.jpg'}: {STRIPPED}" in r.output
    r = invoke("provenance", "check", root / "plain.png", tmp_path / "gone.png", "--outputs", case["outputs"])
    assert r.exit_code == 2 and "gone.png: skipped: no such file" in r.output and NO_SIGN in r.output
    (tmp_path / "bad.pem").write_text("not a certificate")
    r = invoke("provenance", "check", root / "intact.png", "--trust", tmp_path / "bad.pem")
    assert r.exit_code == 1 and r.output.strip() == f"error: --trust {tmp_path / 'bad.pem'}: not a PEM certificate " \
                                                    "(give the CA certificate, e.g. ca.pem of the local credential)"
    r = invoke("provenance", "check", "--help")
    assert r.exit_code == 0 and "Exit 0" in r.output and "--trust" in r.output
