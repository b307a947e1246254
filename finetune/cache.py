"""What finetune keeps between runs outside the run folders: built-in tiny models and file hashes,
under `$FINETUNE_CACHE` (default `~/.cache/finetune`)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .files import write_text_atomically

HASHES_FILE = "sha256.json"
_memory: dict[str, tuple[int, int, str]] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune"))


def _load_disk() -> dict:
    try:
        data = json.loads((cache_dir() / HASHES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # no cache, or a damaged one: hashing again is always correct
    return data if isinstance(data, dict) else {}


def _save_disk(entries: dict) -> None:
    try:
        # Only files that still exist; a cache that cannot be written costs time, not correctness.
        live = {k: v for k, v in entries.items() if Path(k).exists()}
        write_text_atomically(cache_dir() / HASHES_FILE, json.dumps(live))
    except OSError:
        pass


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) in this process and on disk,
    so detecting a watermark does not re-read every multi-GB checkpoint under outputs/ each time."""
    path = Path(path)
    st = path.stat()
    key = str(path.resolve())
    hit = _memory.get(key)
    if hit is None:
        disk = _load_disk().get(key)
        if isinstance(disk, list) and len(disk) == 3:
            hit = _memory[key] = tuple(disk)
    if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
        return hit[2]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    _memory[key] = (st.st_size, st.st_mtime_ns, digest)
    disk = _load_disk()
    disk[key] = list(_memory[key])
    _save_disk(disk)
    return digest
