"""The `c2pa` output hook (issue 18): every image finetune writes carries signed Content Credentials
naming the base model, the adapters and the settings; the credential is checked before anything
is generated; the manifest.jsonl names it; keys never reach an output."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from finetune import __version__
from finetune.cache import file_sha256
from finetune.cli import app
from finetune.hooks import OutputImage, Provenance, build_pipeline, c2pa_sign
from finetune.hooks.credentials import _make_ca_and_leaf, _signer
from finetune.hooks.pipeline import write_outputs

from .helpers import draw_subject, make_image_folder, tiny_recipe

runner = CliRunner()
FAST = ["--steps", "2", "--width", "64", "--height", "64"]
SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False, env=env)


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def verdict(row: dict, hook: str) -> dict:
    return next(v for v in row["verdicts"] if v["hook"] == hook)


def credential_files(folder: Path, **kw) -> tuple[Path, Path, Path]:
    """A company-style credential (CA-issued signing certificate) written as PEM files."""
    folder.mkdir(parents=True, exist_ok=True)
    chain, ca, key = _make_ca_and_leaf(**kw)
    for name, data in (("chain.pem", chain), ("ca.pem", ca), ("key.pem", key)):
        (folder / name).write_bytes(data)
    return folder / "chain.pem", folder / "key.pem", folder / "ca.pem"


def item(prompt="a photo of sks dog", **prov) -> OutputImage:
    p = Provenance(prompt=prompt, seed=3, steps=2, guidance=7.5, width=256, height=256,
                   base_model="builtin:tiny-sd15", run="run-1", **prov)
    return OutputImage(draw_subject(1, (256, 256)), p)


def key_body(key_file: Path) -> bytes:
    return b"".join(key_file.read_bytes().splitlines()[1:-1])[:40]


def test_generated_png_and_jpeg_carry_valid_credentials_naming_what_made_them(tiny_sd15, tmp_path):
    from finetune.recipe import validate
    from finetune.train import train

    recipe = tiny_recipe(tiny_sd15, make_image_folder(tmp_path / "data", n=2), tmp_path / "runs",
                         training__max_steps=1, validation__prompts=["a photo of sks ball"])
    run = train(validate(recipe, "test"), log=lambda *_: None, progress=False).run_dir
    adapter = run / "run.safetensors"
    for fmt, suffix in (("png", ".png"), ("jpeg", ".jpg")):
        out = tmp_path / fmt
        r = invoke("generate", "--base", tiny_sd15, "--lora", f"{adapter}:0.8", "-p", "a red cube",
                   "--seed", "5", *FAST, "--format", fmt, "--out", out)
        assert r.exit_code == 0, r.output
        assert "C2PA credentials: signed by finetune local signer (self-signed" in r.output
        (image,) = out.glob(f"*{suffix}")
        got = c2pa_sign.read(image)
        assert got["status"] == "valid" and got["codes"] == ["signingCredential.untrusted"], got
        assert got["generator"] == f"finetune/{__version__}" and got["digital_source_type"] == SOURCE_TYPE
        rec = got["record"]
        assert rec["base_model"] == str(tiny_sd15) and rec["kind"] == "generate"
        assert rec["adapters"] == [{"name": adapter.name, "sha256": file_sha256(adapter), "weight": 0.8}]
        assert (rec["prompt"], rec["seed"], rec["steps"], rec["guidance"]) == ("a red cube", 5, 2, 7.5)
        (row,) = rows(out)
        assert rec["watermark"]["payload"] == verdict(row, "watermark")["payload"]
        # the manifest.jsonl row names the credential that signed, and nothing secret
        mark = verdict(row, "c2pa")
        assert mark["signed"] is True and mark["credential"] == "self-signed"
        config = Path(os.environ["XDG_CONFIG_HOME"]) / "finetune" / "c2pa"
        assert mark["certificate_sha256"] == _fingerprint(config / "signer.pem")
        secret = key_body(config / "signer.key")
        for f in out.iterdir():
            assert secret not in f.read_bytes() and b"PRIVATE KEY" not in f.read_bytes(), f
    # `provenance check` reads them back: intact, then re-encoded (credentials stripped, watermark kept)
    config = Path(os.environ["XDG_CONFIG_HOME"]) / "finetune" / "c2pa"
    png = next((tmp_path / "png").glob("*.png"))
    r = invoke("provenance", "check", png, "--outputs", tmp_path, "--trust", config / "ca.pem")
    assert r.exit_code == 0 and r.output.startswith(f"{png}: made by finetune, credentials intact\n"), r.output
    assert "valid, signer trusted" in r.output and f"adapters run.safetensors ({file_sha256(adapter)[:12]}) x0.8" in r.output
    Image.open(png).save(tmp_path / "shared.jpg", quality=90)
    r = invoke("provenance", "check", tmp_path / "shared.jpg", "--outputs", tmp_path)
    assert r.exit_code == 3 and ": made by finetune, credentials stripped, watermark found\n" in r.output, r.output
    # validation samples written while training are signed too, naming the run
    samples = sorted((run / "samples").rglob("*.png"))
    assert samples
    got = c2pa_sign.read(samples[0])
    assert got["status"] == "valid" and got["record"]["kind"] == "validation step 1" and got["record"]["run"] == run.name


def _fingerprint(chain: Path) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    return x509.load_pem_x509_certificates(chain.read_bytes())[0].fingerprint(hashes.SHA256()).hex()


@pytest.mark.parametrize("problem", ["missing", "expired", "other key", "key as cert"])
def test_a_bad_certificate_fails_closed_with_nothing_written(tmp_path, problem):
    cert, key, _ = credential_files(tmp_path / "cred")
    if problem == "missing":
        cert = tmp_path / "nowhere.pem"
    elif problem == "expired":
        cert, key, _ = credential_files(tmp_path / "old", start=dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc), days=30)
    elif problem == "other key":
        _, key, _ = credential_files(tmp_path / "other")
    else:
        cert = key
    out = tmp_path / "out"
    # a model that does not exist: a credential checked only after loading would fail on the model instead
    r = invoke("generate", "--base", tmp_path / "no-model", "-p", "a cat", *FAST, "--out", out,
               "--c2pa-cert", cert, "--c2pa-key", key)
    assert r.exit_code == 1
    (line,) = [x for x in r.output.splitlines() if x.strip()]
    assert line.startswith("error: C2PA ") and {"missing": "cannot read", "expired": "expired on 2020-01-31",
                                                "other key": "does not match", "key as cert": "not a PEM"}[problem] in line
    assert "BEGIN" not in line and not out.exists()


def test_an_expired_environment_credential_fails_closed_too(tmp_path):
    cert, key, _ = credential_files(tmp_path / "old", start=dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc), days=30)
    r = invoke("generate", "--base", tmp_path / "no-model", "-p", "a cat", *FAST, "--out", tmp_path / "out",
               env={"FINETUNE_C2PA_CERT": str(cert), "FINETUNE_C2PA_KEY": str(key)})
    assert r.exit_code == 1 and "expired on" in r.output and not (tmp_path / "out").exists()


def test_a_company_credential_from_the_environment_signs_and_is_trusted_with_its_ca(tmp_path, monkeypatch):
    cert, key, ca = credential_files(tmp_path / "company")
    monkeypatch.setenv("FINETUNE_C2PA_CERT", str(cert))
    monkeypatch.setenv("FINETUNE_C2PA_KEY", str(key))
    hooks = build_pipeline(None)
    assert any("(environment, certificate" in line for line in hooks.describe())
    out = tmp_path / "out"
    (path,) = write_outputs([(out / "00.png", hooks.process(item()))], out)
    assert c2pa_sign.read(path)["status"] == "valid"
    assert c2pa_sign.read(path, trust_anchors=str(ca))["status"] == "trusted"
    mark = verdict(rows(out)[0], "c2pa")
    assert mark["credential"] == "environment" and mark["certificate_sha256"] == _fingerprint(cert)
    assert str(key) not in (out / "manifest.jsonl").read_text()


def test_the_local_credential_is_made_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    first = build_pipeline([{"type": "c2pa"}]).describe()
    folder = tmp_path / "cfg" / "finetune" / "c2pa"
    chain = (folder / "signer.pem").read_bytes()
    second = build_pipeline([{"type": "c2pa"}]).describe()
    assert "created just now in" in first[0] and "created just now" not in second[0] and " from " in second[0]
    assert (folder / "signer.pem").read_bytes() == chain
    assert (folder / "signer.key").stat().st_mode & 0o777 == 0o600 and folder.stat().st_mode & 0o777 == 0o700


def test_the_signature_covers_the_final_bytes_whatever_the_hook_order(tmp_path):
    # c2pa listed first: it still signs after the watermark changed the pixels and provenance added chunks
    hooks = build_pipeline([{"type": "c2pa"}, {"type": "watermark"}, {"type": "provenance"}])
    out = tmp_path / "out"
    (path,) = write_outputs([(out / "00.png", hooks.process(item()))], out)
    got = c2pa_sign.read(path)
    assert got["status"] == "valid", got
    text = Image.open(path).text
    assert "parameters" in text and json.loads(text["finetune_watermark"])["payload"] == got["record"]["watermark"]["payload"]


def test_webp_is_signed_and_a_format_without_credentials_is_written_with_a_warning(tmp_path):
    hooks = build_pipeline(None)
    out = tmp_path / "out"
    webp, bmp = write_outputs([(out / "00.webp", hooks.process(item())), (out / "01.bmp", hooks.process(item()))], out)
    assert c2pa_sign.read(webp)["status"] == "valid"
    assert Image.open(bmp).format == "BMP" and c2pa_sign.read(bmp)["status"] == "absent"
    row_webp, row_bmp = rows(out)
    assert "warnings" not in row_webp
    assert verdict(row_bmp, "c2pa")["signed"] is False
    assert row_bmp["status"] == "written" and "image/bmp is not supported" in row_bmp["warnings"][0]


def test_private_prompts_are_recorded_as_hashes(tmp_path):
    hooks = build_pipeline([{"type": "watermark"}, {"type": "provenance", "private_prompt": True},
                            {"type": "c2pa", "private_prompt": True}])
    out = tmp_path / "out"
    (path,) = write_outputs([(out / "00.jpg", hooks.process(item("secret launch product")))], out)
    rec = c2pa_sign.read(path)["record"]
    assert "prompt" not in rec and len(rec["prompt_sha256"]) == 64
    assert b"secret launch" not in path.read_bytes() and b"s\x00e\x00c\x00r\x00e\x00t" not in path.read_bytes()


def test_a_signature_refused_mid_run_writes_nothing_unsigned(tmp_path):
    hooks = build_pipeline([{"type": "c2pa"}])
    chain, _, key = _make_ca_and_leaf(start=dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc), days=30)
    hooks.hooks[0].signer = _signer(chain, key, "es256")  # the certificate expired while the run went on
    out, lines = tmp_path / "out", []
    assert write_outputs([(out / "00.png", hooks.process(item()))], out, log=lines.append) == []
    (row,) = rows(out)
    assert row["status"] == "rejected" and row["file"] is None and "C2PA signing failed" in row["reason"]
    assert lines == [f"rejected: 00.png ({row['reason']})"] and not (out / "00.png").exists()


def test_certificate_options_need_a_c2pa_hook_and_the_recipe_pairs_cert_with_key(tmp_path):
    r = invoke("generate", "--base", "builtin:tiny-sd15", "-p", "a cat", "--no-hooks", "--c2pa-cert", "a.pem",
               "--c2pa-key", "b.pem", "--out", tmp_path / "out")
    assert r.exit_code == 1 and "no c2pa hook is on" in r.output
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {base: builtin:tiny-sd15}\ndata: {path: .}\nmethod: {type: lora}\n"
                      "output: {hooks: [{type: c2pa, cert: chain.pem}]}\n")
    r = invoke("validate", recipe)
    assert r.exit_code == 1 and "output.hooks" in r.output and "cert and key go together" in r.output
