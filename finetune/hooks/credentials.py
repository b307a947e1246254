"""The credential that signs C2PA Content Credentials: where it comes from, and a fail-closed check.

Order of lookup: explicit paths (recipe / `--c2pa-cert --c2pa-key`), then FINETUNE_C2PA_CERT /
FINETUNE_C2PA_KEY, then a local self-signed credential in the user's config folder
(`$XDG_CONFIG_HOME/finetune/c2pa/`, default `~/.config/finetune/c2pa/`), made once and reused.

c2pa refuses a lone self-signed certificate and a leaf without the emailProtection EKU, so the local
credential is a small CA plus an ES256 leaf (docs/design/c2pa-spike.md); a verifier that is given
`ca.pem` as a trust anchor reports it "trusted", any other "valid, signer not on a trust list".

c2pa and cryptography are imported inside the functions: every module of this package is imported
when the hooks are discovered, and that must not need either.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FinetuneError, safe_name

CHAIN_FILE = "signer.pem"  # leaf, then the CA
KEY_FILE = "signer.key"
CA_FILE = "ca.pem"  # the trust anchor to give a verifier; never used to sign
_VALID_DAYS = 3650
# Key type -> the c2pa algorithm name it signs with.
_ALGS = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512", "ed25519": "ed25519", "rsa": "ps256"}


@dataclass(frozen=True)
class SigningCredential:
    cert: Path  # PEM certificate chain, the signing (leaf) certificate first
    key: Path  # PEM private key (PKCS8, unencrypted)
    alg: str | None = None  # c2pa algorithm (es256, ps256, ed25519, ...); None: from the key's type
    ca: Path | None = None  # the local CA's certificate (self-signed credential only): a trust anchor
    source: str = "explicit"  # "explicit" | "environment" | "self-signed", for the record
    created: bool = field(default=False, compare=False)  # the self-signed credential was made just now


def default_config_dir(env=os.environ) -> Path:
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "finetune" / "c2pa"


def find_credential(cert=None, key=None, env=os.environ, config_dir=None) -> SigningCredential:
    """The credential to sign with; creates the local self-signed one on first use."""
    if cert or key:
        return _pair(cert, key, "--c2pa-cert/--c2pa-key", "explicit")
    if env.get("FINETUNE_C2PA_CERT") or env.get("FINETUNE_C2PA_KEY"):
        return _pair(env.get("FINETUNE_C2PA_CERT"), env.get("FINETUNE_C2PA_KEY"),
                     "FINETUNE_C2PA_CERT/FINETUNE_C2PA_KEY", "environment")
    folder = Path(config_dir) if config_dir is not None else default_config_dir(env)
    created = not (folder / KEY_FILE).exists()
    if created:
        _create_self_signed(folder)
    return SigningCredential(folder / CHAIN_FILE, folder / KEY_FILE, "es256", folder / CA_FILE, "self-signed", created)


def _pair(cert, key, where: str, source: str) -> SigningCredential:
    if not cert or not key:
        raise FinetuneError(f"C2PA signing: {where} needs both a certificate chain and a private key; "
                            f"only the {'certificate' if cert else 'key'} was given")
    return SigningCredential(Path(cert).expanduser(), Path(key).expanduser(), source=source)


def _create_self_signed(folder: Path) -> None:
    """Write the credential into a private temporary folder, then rename it into place: readers never
    see half a credential, and of two processes creating it at once one wins and both use its files."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    os.mkdir(tmp, 0o700)
    try:
        chain, ca_pem, key_pem = _make_ca_and_leaf()
        # The key is born 0600: O_EXCL|O_CREAT with the mode, never chmod'ed after the fact.
        fd = os.open(tmp / KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        (tmp / CHAIN_FILE).write_bytes(chain)
        (tmp / CA_FILE).write_bytes(ca_pem)
        try:
            os.rename(tmp, folder)  # replaces an empty folder; fails on one with files in it
        except OSError:
            if not (folder / KEY_FILE).exists():
                raise FinetuneError(f"C2PA signing: {safe_name(folder)} exists but holds no {KEY_FILE}; "
                                    "empty or remove it to let finetune create a local credential there") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _make_ca_and_leaf(start: dt.datetime | None = None, days: int = _VALID_DAYS,
                      eku: bool = True) -> tuple[bytes, bytes, bytes]:
    """(chain PEM, CA PEM, leaf key PEM); the arguments let tests make an expired or EKU-less one."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    # No user or host name in the subjects: they are copied into every image's manifest.
    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "finetune (self-signed)"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = start or dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate a little clock skew
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name, leaf_name = name("finetune local signing CA"), name("finetune local signer")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(ca_ski, critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(leaf_name).issuer_name(ca_name)
            .public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False))
    if eku:  # c2pa's default settings accept emailProtection; documentSigning alone is refused
        leaf = leaf.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
    leaf = leaf.sign(ca_key, hashes.SHA256())
    pem = serialization.Encoding.PEM
    key_pem = leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    ca_pem = ca.public_bytes(pem)
    return leaf.public_bytes(pem) + ca_pem, ca_pem, key_pem


def identity(credential: SigningCredential) -> dict:
    """What the manifest.jsonl records of the credential: where it came from, the signing certificate's
    subject, its SHA-256 fingerprint and expiry (public facts; never the key or its path)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    leaf = x509.load_pem_x509_certificates(_read(credential.cert, "certificate chain"))[0]

    def attr(oid):
        values = leaf.subject.get_attributes_for_oid(oid)
        return str(values[0].value) if values else None

    return {"credential": credential.source, "signer": attr(NameOID.COMMON_NAME),
            "organization": attr(NameOID.ORGANIZATION_NAME), "certificate_sha256": leaf.fingerprint(hashes.SHA256()).hex(),
            "expires": f"{leaf.not_valid_after_utc:%Y-%m-%d}"}


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:  # the message names the file and the reason, never the content
        raise FinetuneError(f"C2PA {what} {safe_name(path)}: cannot read it ({e.strerror or type(e).__name__})") from None


def precheck(credential: SigningCredential):
    """Check the credential before anything is generated and return a reusable `c2pa.Signer`;
    any problem is one FinetuneError line naming the file (never its content)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    cert_path, key_path = credential.cert, credential.key
    chain_pem, key_pem = _read(cert_path, "certificate chain"), _read(key_path, "private key")
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError:
        raise FinetuneError(f"C2PA certificate chain {safe_name(cert_path)}: not a PEM certificate chain") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):  # TypeError: the key is encrypted
        raise FinetuneError(f"C2PA private key {safe_name(key_path)}: not an unencrypted PEM private key") from None
    leaf, where = chain[0], f"C2PA certificate {safe_name(cert_path)}"
    now = dt.datetime.now(dt.timezone.utc)
    if now > leaf.not_valid_after_utc:
        raise FinetuneError(f"{where}: expired on {leaf.not_valid_after_utc:%Y-%m-%d}")
    if now < leaf.not_valid_before_utc:
        raise FinetuneError(f"{where}: not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    try:
        is_ca = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if is_ca or leaf.issuer == leaf.subject:
        raise FinetuneError(f"{where}: the first certificate is a CA or self-signed; C2PA needs a signing "
                            "certificate issued by a CA, listed first, then its CA")
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise FinetuneError(f"C2PA private key {safe_name(key_path)}: does not match the certificate "
                            f"{safe_name(cert_path)}")
    if isinstance(key, ec.EllipticCurvePrivateKey):
        kind = key.curve.name
    else:
        kind = "ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else "rsa" if isinstance(key, rsa.RSAPrivateKey) else "?"
    alg = credential.alg or _ALGS.get(kind)
    if alg is None:
        raise FinetuneError(f"C2PA private key {safe_name(key_path)}: key type {kind} cannot sign C2PA manifests "
                            "(use EC P-256/384/521, Ed25519 or RSA)")
    return _dry_run(_signer(chain_pem, key_pem, alg), credential)


def _signer(chain_pem: bytes, key_pem: bytes, alg: str):
    import c2pa

    try:
        return c2pa.Signer.from_info(c2pa.C2paSignerInfo(alg=alg.encode() if isinstance(alg, str) else alg,
                                                         sign_cert=chain_pem, private_key=key_pem, ta_url=None))
    except (c2pa.C2paError, ValueError, TypeError) as e:
        raise FinetuneError(f"C2PA signing: c2pa refused the credential ({_short(e)})") from None


def _dry_run(signer, credential: SigningCredential):
    """Sign a 1x1 PNG in memory and read it back: most problems (EKU, key usage, chain) surface only here."""
    import io

    from PIL import Image

    from . import c2pa_sign

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    where = f"C2PA certificate {safe_name(credential.cert)}"
    try:
        signed = c2pa_sign.sign(buf.getvalue(), "image/png", signer, {"precheck": True}, "precheck")
    except c2pa_sign.SigningFailed as e:
        raise FinetuneError(f"{where}: a test signature failed ({e.reason}); a C2PA signing certificate needs "
                            "the digitalSignature key usage and the emailProtection extended key usage") from None
    result = c2pa_sign.read(signed, "image/png")
    if result["status"] not in ("valid", "trusted"):
        raise FinetuneError(f"{where}: a test signature reads back {result['status']} "
                            f"({', '.join(result['codes']) or result.get('error') or 'no reason given'})")
    return signer


def _short(e: Exception) -> str:
    """An exception's text fit for one line; PEM blocks (if a library ever echoed one) are cut."""
    text = str(e).split("-----BEGIN", 1)[0].strip()
    return safe_name(text[:300])
