"""C2PA Content Credentials: the signing credential (found, created once, checked fail-closed) and
signing / reading PNG, JPEG and WebP in memory. The config folder is always under tmp_path."""

from __future__ import annotations

import datetime as dt
import io
import stat
import struct
import zlib

import pytest
from PIL import Image

from finetune.errors import FinetuneError
from finetune.hooks import c2pa_sign
from finetune.hooks.credentials import (
    SigningCredential,
    _create_self_signed,
    _make_ca_and_leaf,
    find_credential,
    precheck,
)

from .helpers import png_chunks

RECORD = {"base_model": "tiny-sd", "adapters": [{"path": "run/lora.safetensors", "sha256": "ab" * 32, "weight": 0.8}],
          "prompt_sha256": "cd" * 32, "seed": 7, "steps": 4, "guidance": 7.5, "run": "outputs/run1"}
SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


@pytest.fixture(scope="module")
def cred(tmp_path_factory):
    return find_credential(env={}, config_dir=tmp_path_factory.mktemp("config") / "c2pa")


@pytest.fixture(scope="module")
def signer(cred):
    return precheck(cred)


def encode(fmt: str, **kw) -> bytes:
    img = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def check_fields(result, status):
    assert result["status"] == status, result
    assert result["signer"]["issuer"] == "finetune (self-signed)"
    assert result["signer"]["common_name"] == "finetune local signer"
    assert result["generator"] == "finetune/1.2.3"
    assert result["digital_source_type"] == SOURCE_TYPE
    assert result["record"] == RECORD


@pytest.mark.parametrize("fmt,mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_signed_image_reads_valid_then_trusted_with_the_ca(cred, signer, fmt, mime, tmp_path):
    original = encode(fmt)
    signed = c2pa_sign.sign(original, mime, signer, RECORD, "1.2.3")
    assert len(signed) - len(original) < 8000  # no thumbnail
    assert Image.open(io.BytesIO(signed)).size == (64, 64)  # still an image every reader opens
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(signed)
    result = c2pa_sign.read(path)  # mime sniffed from the bytes
    check_fields(result, "valid")
    assert result["codes"] == ["signingCredential.untrusted"]
    trusted = c2pa_sign.read(signed, mime, trust_anchors=str(cred.ca))
    check_fields(trusted, "trusted")
    assert trusted["codes"] == []
    assert c2pa_sign.read(signed, mime, trust_anchors=cred.ca.read_text())["status"] == "trusted"
    other_ca = find_credential(env={}, config_dir=tmp_path / "other").ca
    assert c2pa_sign.read(signed, mime, trust_anchors=str(other_ca))["status"] == "valid"


def test_an_existing_empty_config_folder_is_used(tmp_path):
    (tmp_path / "c2pa").mkdir()
    cred = find_credential(env={}, config_dir=tmp_path / "c2pa")
    assert cred.key.exists() and stat.S_IMODE(cred.key.stat().st_mode) == 0o600
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(FinetuneError, match="holds no signer.key"):
        find_credential(env={}, config_dir=tmp_path / "full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c2pa", "full"]


def test_pixel_edit_in_place_reads_tampered(signer):
    signed = c2pa_sign.sign(encode("PNG", compress_level=0), "image/png", signer, RECORD, "1.2.3")
    types = [t for _, t, _ in png_chunks(signed)]
    assert b"caBX" in types  # the manifest chunk, which the edit keeps
    pos, _, idat = next(c for c in png_chunks(signed) if c[1] == b"IDAT")
    raw = bytearray(zlib.decompress(idat))
    raw[200] ^= 0x40  # one byte of one pixel
    new = zlib.compress(bytes(raw), 0)
    assert len(new) == len(idat)  # stored blocks: same length, so every other byte stays where it was
    chunk = struct.pack(">I", len(new)) + b"IDAT" + new + struct.pack(">I", zlib.crc32(b"IDAT" + new))
    edited = signed[:pos] + chunk + signed[pos + len(chunk):]
    assert Image.open(io.BytesIO(edited)).tobytes() != Image.open(io.BytesIO(signed)).tobytes()
    result = c2pa_sign.read(edited)
    check_fields(result, "tampered")  # what it claimed is still reported, but not vouched for
    assert "assertion.dataHash.mismatch" in result["codes"]


def test_jpeg_scan_byte_changed_reads_tampered(signer):
    signed = bytearray(c2pa_sign.sign(encode("JPEG"), "image/jpeg", signer, RECORD, "1.2.3"))
    i = signed.rindex(b"\xff\xda") + 40  # inside the entropy-coded scan
    while signed[i] == 0xFF or signed[i] ^ 0x01 == 0xFF:
        i += 1
    signed[i] ^= 0x01
    assert c2pa_sign.read(bytes(signed))["status"] == "tampered"


def test_reencoding_strips_the_manifest(signer):
    signed = c2pa_sign.sign(encode("PNG"), "image/png", signer, RECORD, "1.2.3")
    buf = io.BytesIO()
    Image.open(io.BytesIO(signed)).save(buf, format="JPEG")
    result = c2pa_sign.read(buf.getvalue())
    assert result["status"] == "absent" and result["record"] is None
    assert c2pa_sign.read(encode("PNG"))["status"] == "absent"
    assert c2pa_sign.read(b"GIF89a not ours")["status"] == "absent"


def test_unsupported_format_is_a_clear_error(signer):
    with pytest.raises(c2pa_sign.UnsupportedFormat, match="image/gif is not supported"):
        c2pa_sign.sign(encode("GIF"), "image/gif", signer, RECORD, "1.2.3")


def test_credential_is_created_once_private_and_reused(tmp_path):
    folder = tmp_path / "c2pa"
    first = find_credential(env={}, config_dir=folder)
    assert first.source == "self-signed" and first.alg == "es256"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(first.key.stat().st_mode) == 0o600
    assert sorted(p.name for p in folder.iterdir()) == ["ca.pem", "signer.key", "signer.pem"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c2pa"]  # no temporary folder left behind
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (first.cert, first.key, first.ca)}
    second = find_credential(env={}, config_dir=folder)
    assert second == first
    _create_self_signed(folder)  # what a second process racing the first does: it loses the rename
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c2pa"]
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (second.cert, second.key, second.ca)} == before


def test_lookup_order_explicit_then_environment_then_xdg_config(tmp_path):
    env = {"FINETUNE_C2PA_CERT": "/env/cert.pem", "FINETUNE_C2PA_KEY": "/env/key.pem", "XDG_CONFIG_HOME": str(tmp_path)}
    explicit = find_credential("/a/cert.pem", "/a/key.pem", env=env)
    assert (str(explicit.cert), str(explicit.key), explicit.source) == ("/a/cert.pem", "/a/key.pem", "explicit")
    from_env = find_credential(env=env)
    assert (str(from_env.cert), from_env.source) == ("/env/cert.pem", "environment")
    with pytest.raises(FinetuneError, match="needs both"):
        find_credential(env={"FINETUNE_C2PA_CERT": "/env/cert.pem"})
    local = find_credential(env={"XDG_CONFIG_HOME": str(tmp_path)})
    assert local.key == tmp_path / "finetune" / "c2pa" / "signer.key" and local.key.exists()


def fails_precheck(credential: SigningCredential, match: str, names, secret: bytes):
    with pytest.raises(FinetuneError, match=match) as e:
        precheck(credential)
    message = str(e.value)
    assert "\n" not in message and str(names) in message
    body = b"".join(secret.splitlines()[1:-1]).decode()  # the key's base64, without the armour lines
    assert "PRIVATE KEY" not in message and body[:24] not in message and body[-24:] not in message
    return message


def test_bad_credentials_fail_closed_with_one_line(cred, tmp_path):
    secret = cred.key.read_bytes()
    # Expired: a chain issued two years ago for one year, with its own key.
    chain, _, key = _make_ca_and_leaf(start=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=730), days=365)
    (tmp_path / "old.pem").write_bytes(chain)
    (tmp_path / "old.key").write_bytes(key)
    fails_precheck(SigningCredential(tmp_path / "old.pem", tmp_path / "old.key"), "expired on", tmp_path / "old.pem", key)
    # No emailProtection EKU: every static check passes, the test signature does not.
    chain, _, key = _make_ca_and_leaf(eku=False)
    (tmp_path / "noeku.pem").write_bytes(chain)
    (tmp_path / "noeku.key").write_bytes(key)
    fails_precheck(SigningCredential(tmp_path / "noeku.pem", tmp_path / "noeku.key"), "a test signature",
                   tmp_path / "noeku.pem", key)
    # A key from another credential.
    fails_precheck(SigningCredential(cred.cert, tmp_path / "old.key"), "does not match", tmp_path / "old.key", key)
    # The CA itself as the signing certificate.
    fails_precheck(SigningCredential(cred.ca, cred.key), "is a CA or self-signed", cred.ca, secret)
    # Missing files, and files that are not PEM.
    fails_precheck(SigningCredential(tmp_path / "nope.pem", cred.key), "cannot read it", tmp_path / "nope.pem", secret)
    fails_precheck(SigningCredential(cred.cert, tmp_path / "nope.key"), "cannot read it", tmp_path / "nope.key", secret)
    (tmp_path / "junk.pem").write_text("hello")
    fails_precheck(SigningCredential(tmp_path / "junk.pem", cred.key), "not a PEM certificate chain",
                   tmp_path / "junk.pem", secret)
    # A certificate file given as the key: its content must not be echoed either.
    fails_precheck(SigningCredential(cred.cert, cred.cert), "not an unencrypted PEM private key", cred.cert, secret)


def test_precheck_returns_a_reusable_signer(cred, signer):
    a = c2pa_sign.sign(encode("PNG"), "image/png", signer, {"n": 1}, "1.2.3")
    b = c2pa_sign.sign(encode("JPEG"), "image/jpeg", signer, {"n": 2}, "1.2.3")
    assert c2pa_sign.read(a)["record"] == {"n": 1} and c2pa_sign.read(b)["record"] == {"n": 2}
