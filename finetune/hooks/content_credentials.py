"""The `c2pa` output hook: a signed C2PA manifest (Content Credentials) in every image we write.

The manifest says the image was created by trained algorithmic media, by finetune/<version>, and
carries the generation record (base model, adapters with sha256 and weight, prompt or its hash,
seed, steps, guidance, run, the watermark payload) as the `org.finetune.generation` assertion.

A signature covers the file's bytes, so the hook does not sign in `process`: it adds a finisher that
signs the encoded file after every hook has run and every text chunk is in (pipeline._save_image),
whatever the hooks' order. The credential is found and checked when the hook is built, which is
before any model loads: a bad certificate or key stops the run before anything is generated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from .. import __version__
from . import register_hook
from .base import Hook, HookConfig, OutputImage, Verdict
from .provenance import prompt_fields


class C2paConfig(HookConfig):
    type: Literal["c2pa"] = "c2pa"
    cert: str | None = Field(None, description=(
        "PEM certificate chain that signs (the signing certificate first, then its CA), e.g. your company's "
        "CA-issued one. Default: --c2pa-cert, else FINETUNE_C2PA_CERT, else a local self-signed credential."))
    key: str | None = Field(None, description="PEM private key (unencrypted PKCS8) of `cert`; given with it.")
    private_prompt: bool = Field(False, description=(
        "Record the prompt's and negative prompt's sha256 instead of their text (set the provenance hook's "
        "private_prompt too, or its text chunks still carry them)."))

    @model_validator(mode="after")
    def _pair(self):
        if bool(self.cert) != bool(self.key):
            raise ValueError("cert and key go together: give both, or neither (then --c2pa-cert/--c2pa-key, "
                             "FINETUNE_C2PA_CERT/FINETUNE_C2PA_KEY or the local self-signed credential is used)")
        return self


def generation_record(item: OutputImage, private_prompt: bool = False) -> dict:
    """The `org.finetune.generation` assertion: how this image was made, and the watermark it carries."""
    p = item.provenance
    mark = next((v.details for v in item.verdicts if v.hook == "watermark" and v.details.get("watermarked")), None)
    return {
        "toolkit": f"finetune {__version__}", "kind": p.kind, "base_model": p.base_model,
        # File names, not paths: a path can name the user or machine, and the hash identifies the file.
        "adapters": [{"name": Path(a["path"]).name, "sha256": a.get("sha256"), "weight": a.get("weight")}
                     for a in p.adapters],
        **prompt_fields(p.prompt, p.negative_prompt, private_prompt),
        "seed": p.seed, "steps": p.steps, "guidance": p.guidance, "width": p.width, "height": p.height, "run": p.run,
        "watermark": {k: mark[k] for k in ("payload", "method", "strength", "payload_bits")} if mark else None,
    }


@register_hook("c2pa")
class C2paHook(Hook):
    """Signs every written image's final bytes with a C2PA manifest."""

    name = "c2pa"
    Config = C2paConfig

    def __init__(self, cfg: C2paConfig):
        from .credentials import find_credential, identity, precheck

        super().__init__(cfg)
        self.credential = find_credential(cfg.cert, cfg.key)
        self.signer = precheck(self.credential)  # fails closed, one line, before anything is generated
        self.identity = identity(self.credential)

    def describe(self) -> str:
        c, who = self.credential, self.identity
        line = f"C2PA credentials: signed by {who['signer']} ({c.source}, certificate {who['certificate_sha256'][:16]})"
        if c.source == "self-signed":
            made = "created just now in" if c.created else "from"
            line += (f"; a local self-signed credential {made} {c.cert.parent}: verifiers report "
                     "'valid, signer not on a trust list' (README: Content Credentials)")
        return line

    def process(self, item: OutputImage) -> OutputImage:
        item.finishers.append(self.seal)
        return item

    def seal(self, item: OutputImage, data: bytes, mime: str) -> bytes:
        from . import c2pa_sign

        try:
            signed = c2pa_sign.sign(data, mime, self.signer, generation_record(item, self.cfg.private_prompt), __version__)
        except c2pa_sign.UnsupportedFormat as e:
            item.verdicts.append(Verdict(self.name, "pass", str(e), {"signed": False, "warning": True}))
            return data
        item.verdicts.append(Verdict(self.name, "metadata", details={"signed": True, **self.identity}))
        return signed
