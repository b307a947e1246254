"""C2PA Content Credentials: sign an encoded image in memory, and read one back for a checker.

Signing must be the last thing done to the bytes: a PNG text chunk or JPEG segment added afterwards
breaks the manifest's hash (docs/design/c2pa-spike.md). So the caller encodes the final image with
every chunk it wants, passes the bytes here, and writes what comes back in one go.

c2pa is imported inside the functions: every module of this package is imported when the hooks
are discovered, and that must not need it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from ..errors import FinetuneError, safe_name

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
RECORD_LABEL = "org.finetune.generation"
MIME_TYPES = {"image/png": "image/png", "image/jpeg": "image/jpeg", "image/jpg": "image/jpeg", "image/webp": "image/webp"}
# Validation codes that mean the bytes or the manifest changed after signing (not a credential problem).
_TAMPER_CODES = ("assertion.dataHash.mismatch", "assertion.hashedURI.mismatch", "assertion.boxesHash.mismatch",
                 "assertion.bmffHash.mismatch", "claimSignature.mismatch", "assertion.hashedURI.missing")


class SigningFailed(FinetuneError):
    """c2pa refused to sign; `reason` is its message (about the certificate, never the key's bytes)."""

    def __init__(self, reason: str):
        self.reason = safe_name(reason)
        super().__init__(f"C2PA signing failed: {self.reason}")


class UnsupportedFormat(FinetuneError):
    """This image format cannot carry our credentials; the caller writes it without and warns."""


def _mime(mime: str) -> str:
    m = MIME_TYPES.get(str(mime).lower())
    if m is None:
        raise UnsupportedFormat(f"C2PA credentials: {safe_name(mime)} is not supported (PNG, JPEG and WebP are); "
                                "the image is written without them")
    return m


def _context(config: dict):
    import c2pa

    return c2pa.Context.from_dict(config)


def manifest(record: dict, generator_version: str) -> dict:
    agent = {"name": "finetune", "version": generator_version}
    return {
        "claim_generator_info": [agent],
        "assertions": [
            {"label": "c2pa.actions", "data": {"actions": [
                {"action": "c2pa.created", "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA, "softwareAgent": agent}]}},
            {"label": RECORD_LABEL, "data": record},
        ],
    }


def sign(image_bytes: bytes, mime: str, signer, record: dict, generator_version: str) -> bytes:
    """`image_bytes` with a signed manifest embedded: `c2pa.created` by trained algorithmic media,
    claim generator finetune/<version>, and `record` as the `org.finetune.generation` assertion."""
    import c2pa

    fmt = _mime(mime)
    try:
        definition = json.dumps(manifest(record, generator_version))
    except (TypeError, ValueError) as e:
        raise FinetuneError(f"C2PA credentials: the generation record is not JSON ({e})") from None
    # No thumbnail: it would cost tens of KB to ~1 MB per image (3.8 KB without, measured).
    context = _context({"builder": {"thumbnail": {"enabled": False}}})
    dest = io.BytesIO()
    try:
        with c2pa.Builder(definition, context=context) as builder:
            builder.sign(signer, fmt, io.BytesIO(image_bytes), dest)
    except c2pa.C2paError as e:
        raise SigningFailed(str(e).split("-----BEGIN", 1)[0].strip()[:300]) from None
    return dest.getvalue()


def sniff_mime(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def read(path_or_bytes, mime: str | None = None, trust_anchors: str | None = None) -> dict:
    """What an image's Content Credentials say, offline (no remote manifest, no OCSP).

    status: "absent" (no manifest, or not a format that carries one), "valid" (intact, signer not
    on a trust list), "trusted" (intact, signer chains to `trust_anchors`: PEM text or a PEM file),
    "tampered" (bytes or assertions changed after signing), "invalid" (any other failure).
    The other fields come from the manifest as claimed; only "valid"/"trusted" vouch for them.
    """
    import c2pa

    data = path_or_bytes if isinstance(path_or_bytes, (bytes, bytearray)) else Path(path_or_bytes).read_bytes()
    result = {"status": "absent", "signer": None, "generator": None, "digital_source_type": None,
              "record": None, "codes": [], "error": None}
    fmt = MIME_TYPES.get(str(mime).lower()) if mime else sniff_mime(bytes(data[:16]))
    if fmt is None:
        result["error"] = "not a PNG, JPEG or WebP image"
        return result
    config = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}
    if trust_anchors:
        text = trust_anchors if "-----BEGIN" in trust_anchors else Path(trust_anchors).read_text()
        # Settings().set("trust.user_anchors") is accepted but ignored (0.38.1): it must be a Context.
        config["trust"] = {"user_anchors": text}
    try:
        reader = c2pa.Reader.try_create(fmt, io.BytesIO(bytes(data)), context=_context(config))
    except c2pa.C2paError as e:
        return {**result, "status": "invalid", "error": f"{type(e).__name__}: {str(e)[:300]}"}
    if reader is None:
        return result
    with reader:
        state = reader.get_validation_state()
        codes = _failure_codes(reader.get_validation_results())
        store = json.loads(reader.json())
    active = store.get("manifests", {}).get(store.get("active_manifest"), {})
    result.update(_fields(active), codes=codes)
    if state == "Trusted":
        result["status"] = "trusted"
    elif state == "Valid":
        result["status"] = "valid"
    else:
        result["status"] = "tampered" if any(c in _TAMPER_CODES for c in codes) else "invalid"
    return result


def _failure_codes(results) -> list[str]:
    """Every failure code in the validation results, active manifest and ingredients alike."""
    codes = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "failure" and isinstance(v, list):
                    codes.extend(e.get("code") for e in v if isinstance(e, dict) and e.get("code"))
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(results or {})
    return sorted(set(codes))


def _fields(m: dict) -> dict:
    info = m.get("signature_info") or {}
    gen = (m.get("claim_generator_info") or [{}])[0]
    out = {"signer": {"issuer": info.get("issuer"), "common_name": info.get("common_name"), "alg": info.get("alg")},
           "generator": f"{gen.get('name')}/{gen.get('version')}" if gen.get("name") else m.get("claim_generator")}
    for a in m.get("assertions") or []:
        label = a.get("label", "")
        if label.startswith("c2pa.actions"):  # read back as c2pa.actions.v2
            for action in (a.get("data") or {}).get("actions") or []:
                if action.get("action") == "c2pa.created":
                    out["digital_source_type"] = action.get("digitalSourceType")
        elif label == RECORD_LABEL:
            out["record"] = a.get("data")
    return out
