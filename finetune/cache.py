"""What finetune keeps between runs outside the run folders: built-in tiny models and file hashes,
under `$FINETUNE_CACHE` (default `~/.cache/finetune`)."""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import time
from pathlib import Path

from .files import write_text_atomically

HASHES_FILE = "sha256.json"
SAVE_EVERY_S = 2.0  # hashes learnt are written at most this often (and at exit)
_memory: dict[str, tuple[int, int, str]] = {}
_disks: dict[Path, dict] = {}  # cache folder -> its hashes file, as read and added to
_unsaved: set[Path] = set()
_last_save = 0.0


def cache_dir() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune"))


def _load_disk() -> dict:
    try:
        data = json.loads((cache_dir() / HASHES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # no cache, or a damaged one: hashing again is always correct
    return data if isinstance(data, dict) else {}


def _save_disk(entries: dict, folder: Path) -> None:
    try:
        # Only files that still exist; a cache that cannot be written costs time, not correctness.
        live = {k: v for k, v in entries.items() if Path(k).exists()}
        write_text_atomically(folder / HASHES_FILE, json.dumps(live))
    except OSError:
        pass


def _disk_entries() -> dict:
    # Read once a process (per cache folder): reading it per file made hashing a dataset quadratic.
    folder = cache_dir()
    if folder not in _disks:
        _disks[folder] = _load_disk()
    return _disks[folder]


def flush() -> None:
    """Write the hashes learnt since the last write (also at exit)."""
    global _last_save
    for folder in list(_unsaved):
        _save_disk(_disks[folder], folder)
    _unsaved.clear()
    _last_save = time.monotonic()


def _remember(key: str, entry: tuple[int, int, str]) -> None:
    _disk_entries()[key] = list(entry)
    _unsaved.add(cache_dir())
    if time.monotonic() - _last_save > SAVE_EVERY_S:
        flush()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) in this process and on disk,
    so detecting a watermark does not re-read every multi-GB checkpoint under outputs/ each time."""
    path = Path(path)
    st = path.stat()
    key = str(path.resolve())
    hit = _memory.get(key)
    if hit is None:
        disk = _disk_entries().get(key)
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
    _remember(key, _memory[key])
    return digest


atexit.register(flush)
