"""`finetune provenance check`: what made an image, from both kinds of evidence we leave in it.

C2PA Content Credentials (c2pa_sign.read) are signed and say a lot (signer, generator, base model,
adapters, the watermark payload embedded), but any re-encoding strips them. The invisible watermark
(watermark.detect) carries few bits, but survives re-encoding. So an image keeps telling its origin
if either survives, and when both are there they must agree: a disagreement is reported, not hidden.

Verdicts, per image (exit code of a set of images: the worst, 2 > 1 > 3 > 0):
  "made by finetune, credentials intact"                       0: a valid manifest, generator finetune/
  "made by finetune, credentials tampered, [no] watermark found" 3: a finetune manifest that no longer
  "made by finetune, credentials invalid, [no] watermark found"    verifies (tampered: the bytes changed)
  "made by finetune, credentials stripped, watermark found"    3: no manifest, our watermark
  "made by finetune, credentials replaced, watermark found"    3: another generator's manifest, our watermark
  "no sign of finetune"                                        1: neither
  a file that cannot be read is `skipped: why`                 2
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import FinetuneError, safe_name
from . import c2pa_sign
from . import watermark as wm

INTACT = "made by finetune, credentials intact"
STRIPPED = "made by finetune, credentials stripped, watermark found"
REPLACED = "made by finetune, credentials replaced, watermark found"
NO_SIGN = "no sign of finetune"
# Exit codes, and their precedence when images differ (a skipped file outranks everything).
EXIT_INTACT, EXIT_NOT_INTACT, EXIT_NO_SIGN, EXIT_SKIPPED = 0, 3, 1, 2
_RANK = {EXIT_INTACT: 0, EXIT_NOT_INTACT: 1, EXIT_NO_SIGN: 2, EXIT_SKIPPED: 3}


def _broken(status: str, watermark_found: bool) -> str:
    return f"made by finetune, credentials {status}, {'watermark found' if watermark_found else 'no watermark found'}"


# --- reading the evidence ------------------------------------------------------------------------

def _text(value) -> str | None:
    return None if value is None else str(value)


def _credentials(c: dict) -> dict:
    """What the manifest says, every field of the record optional (a hand-made manifest may hold anything)."""
    record = c.get("record") if isinstance(c.get("record"), dict) else {}
    adapters = []
    for a in record.get("adapters") if isinstance(record.get("adapters"), list) else []:
        if isinstance(a, dict):
            adapters.append({"name": _text(a.get("name")), "sha256": _text(a.get("sha256")), "weight": a.get("weight")})
    mark = record.get("watermark") if isinstance(record.get("watermark"), dict) else {}
    return {"status": c["status"], "signer": c.get("signer"), "generator": _text(c.get("generator")),
            "digital_source_type": _text(c.get("digital_source_type")), "base_model": _text(record.get("base_model")),
            "adapters": adapters, "run": _text(record.get("run")), "watermark_payload": _text(mark.get("payload")),
            "codes": list(c.get("codes") or []), "error": c.get("error")}


def _claims_finetune(c: dict) -> bool:
    return (c["generator"] or "").startswith("finetune/")


def _bits_apart(a: str, b: str) -> int | None:
    try:
        x, y = bytes.fromhex(a), bytes.fromhex(b)
    except ValueError:
        return None
    return sum(bin(p ^ q).count("1") for p, q in zip(x, y)) if len(x) == len(y) else None


def _conflicts(c: dict, w: dict) -> list[str]:
    """Where intact credentials and the watermark disagree about the payload. A few bits apart is the
    same payload read with errors (the detector's own tolerance: 1 bit in KNOWN_TOLERANCE)."""
    recorded = c["watermark_payload"]
    if c["status"] not in ("valid", "trusted") or not recorded:
        return []
    if not w["found"]:
        return [f"the credentials record watermark payload {safe_name(recorded)}, but no watermark was found"]
    apart = _bits_apart(recorded, w["payload"])
    if apart is None or apart > len(w["payload"]) * 4 // wm.KNOWN_TOLERANCE:
        return [f"the credentials record watermark payload {safe_name(recorded)}, "
                f"but the image carries {w['payload']}"]
    return []


def _verdict(c: dict, found: bool) -> str:
    intact = c["status"] in ("valid", "trusted")
    if intact and _claims_finetune(c):
        return INTACT
    if c["status"] in ("tampered", "invalid") and _claims_finetune(c):
        return _broken(c["status"], found)
    if found:
        return STRIPPED if c["status"] == "absent" else REPLACED
    return NO_SIGN


def check(path, known, profiles, trust_anchors: str | None = None,
          max_pixels: int = wm.DETECT_MAX_PIXELS) -> dict:
    """Both kinds of evidence for one image file, and the verdict. `known`, `profiles`: from
    `watermark._known(outputs)`; `trust_anchors`: PEM text. A file that cannot be read (missing,
    not an image, over `max_pixels`) raises FinetuneError, one line saying why."""
    path = Path(path)
    image = wm.open_within(path, max_pixels)  # refuses an oversized image before its pixels are decoded
    r = wm.detect(image, known, profiles, max_pixels)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FinetuneError(f"cannot read ({e.strerror or type(e).__name__})") from None
    c = _credentials(c2pa_sign.read(data, trust_anchors=trust_anchors))
    found = r["verdict"] == "found"
    w = {"found": found, "payload": r["payload"] if found else None, "match": r.get("match") if found else None,
         "candidates": list(r.get("candidates") or []) if found else []}
    verdict = _verdict(c, found)
    return {"file": str(path), "c2pa": c, "watermark": w, "conflicts": _conflicts(c, w), "verdict": verdict,
            "made_by_finetune": verdict != NO_SIGN}


def exit_code(result: dict) -> int:
    if result.get("skipped"):
        return EXIT_SKIPPED
    if result["verdict"] == INTACT:
        return EXIT_INTACT
    return EXIT_NOT_INTACT if result["made_by_finetune"] else EXIT_NO_SIGN


# --- the report ----------------------------------------------------------------------------------

def trust_anchors(paths) -> str | None:
    """The PEM text of every --trust file, concatenated; a file that is not PEM certificates is an error
    here (c2pa would otherwise fail every image as "invalid")."""
    if not paths:
        return None
    from cryptography import x509

    texts = []
    for p in paths:
        try:
            text = Path(p).read_text(encoding="utf-8")
            x509.load_pem_x509_certificates(text.encode())
        except (OSError, UnicodeDecodeError) as e:
            raise FinetuneError(f"--trust {safe_name(p)}: cannot read it ({getattr(e, 'strerror', None) or type(e).__name__})") from None
        except ValueError:
            raise FinetuneError(f"--trust {safe_name(p)}: not a PEM certificate (give the CA certificate, "
                                "e.g. ca.pem of the local credential)") from None
        texts.append(text.strip() + "\n")
    return "".join(texts)


def _signer(s) -> str:
    if not isinstance(s, dict) or not (s.get("common_name") or s.get("issuer")):
        return "unknown signer"
    name = s.get("common_name") or "?"
    return safe_name(f"{name} ({s['issuer']})" if s.get("issuer") else name)


def _source_type(t: str | None) -> str:
    return safe_name(t.rstrip("/").rsplit("/", 1)[-1]) if t else "no digital source type"


def _credentials_line(c: dict, trust_given: bool) -> str:
    status = c["status"]
    if status == "absent":
        return "none (never signed, or stripped: re-saving an image drops them)"
    about = f"{_signer(c['signer'])}, {safe_name(c['generator'] or 'no generator')}, {_source_type(c['digital_source_type'])}"
    if status in ("valid", "trusted"):
        head = ("valid, signer trusted (chains to --trust)" if status == "trusted" else
                "valid (signer not on a trust list: it does not chain to --trust)" if trust_given else
                "valid (signer not on a trust list)")
        if not _claims_finetune(c):
            about = f"credentials by {safe_name(c['generator'] or 'an unnamed generator')}, not finetune; {_signer(c['signer'])}"
        return f"{head}: {about}"
    # "untrusted" is not why it fails (a valid manifest has it too); the trust list is the status's business.
    why = ", ".join(safe_name(x) for x in c["codes"] if x != "signingCredential.untrusted") \
        or safe_name(c["error"] or "no reason given")
    if status == "tampered":
        return f"tampered: the image no longer matches its credentials ({why}); they claim {about}"
    return f"invalid ({why}); they claim {about}"


def _recorded_line(c: dict) -> str | None:
    if c["status"] == "absent" or not (c["base_model"] or c["adapters"] or c["run"]):
        return None

    def adapter(a):
        digest = f" ({a['sha256'][:12]})" if a["sha256"] else ""
        weight = f" x{a['weight']}" if isinstance(a["weight"], (int, float)) else ""
        return safe_name(f"{a['name'] or '?'}{digest}{weight}")

    adapters = ", ".join(adapter(a) for a in c["adapters"]) or "none"
    head = "recorded" if c["status"] in ("valid", "trusted") else "claimed (not vouched for)"
    return f"{head}: base {safe_name(c['base_model'] or '?')}; adapters {adapters}; run {safe_name(c['run'] or '-')}"


def _watermark_line(w: dict, outputs_dir) -> str:
    if not w["found"]:
        return "watermark: not found"
    made = w["match"] or ("candidates: " + "; ".join(w["candidates"]) if w["candidates"] else
                          f"unknown (no run or manifest under {wm._shown(outputs_dir)} has this payload)")
    return f"watermark: found, payload {w['payload']}, {safe_name(made)}"


def _lines(r: dict, outputs_dir, trust_given: bool) -> list[str]:
    conflict = "; evidence conflict" if r["conflicts"] else ""
    lines = [f"{wm._shown(r['file'])}: {r['verdict']}{conflict}",
             f"  credentials: {_credentials_line(r['c2pa'], trust_given)}"]
    recorded = _recorded_line(r["c2pa"])
    if recorded:
        lines.append(f"  {recorded}")
    lines.append(f"  {_watermark_line(r['watermark'], outputs_dir)}")
    lines += [f"  evidence conflict: {x}" for x in r["conflicts"]]
    return lines


def check_report(paths, outputs_dir=Path("outputs"), trust=None, max_pixels: int | None = None,
                 as_json: bool = False) -> tuple[list[str], int]:
    """Printable lines for every image (or one JSON document, a list of per-image dicts), and the exit
    code: 0 all made by finetune with intact credentials; 3 all show finetune, some with credentials
    stripped, tampered or replaced; 1 some show no sign of finetune; 2 some file was skipped."""
    anchors = trust_anchors(trust)
    known, profiles = wm._known(Path(outputs_dir))
    profiles = [p for p in dict.fromkeys(profiles) if p]
    results, lines = [], []
    for path in paths:
        try:
            r = check(path, known, profiles, anchors, max_pixels or wm.DETECT_MAX_PIXELS)
        except FinetuneError as e:
            r = {"file": str(path), "skipped": str(e), "verdict": None, "made_by_finetune": False}
        except MemoryError:
            r = {"file": str(path), "skipped": "out of memory while decoding (a lower --max-pixels refuses it unread)",
                 "verdict": None, "made_by_finetune": False}
        results.append(r)
        if not as_json:
            lines += [f"{wm._shown(path)}: skipped: {r['skipped']}"] if r.get("skipped") else _lines(r, outputs_dir, bool(anchors))
    code = max((exit_code(r) for r in results), key=_RANK.__getitem__, default=EXIT_INTACT)
    if as_json:
        lines = [json.dumps(results, indent=2)]
    return lines, code
