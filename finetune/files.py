"""Writing files and folders so that a crash never leaves half of one: each is written under a
hidden temporary name beside its target (`.tmp-<random>-<name>`), then renamed to its own.

What is written gets the mode the umask gives any new file (0644 under the usual 022), not the
0600/0700 of mkstemp, mkdtemp and safetensors' own files: a LoRA that a ComfyUI service account
cannot read is as good as lost to it."""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

# torch only for annotations: the hash cache and image writers use this module without it.
if TYPE_CHECKING:
    import torch

TEMP_PREFIX = ".tmp-"


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object], *, folder: bool = False,
                     durable: bool = False, overwrite: bool = True) -> Path:
    """Make `path` through `write(tmp)`, `tmp` being a new empty file (or folder) beside it, then
    rename `tmp` to `path`; returns the name it got. A failed `write` leaves `path` as it was.

    folder: `tmp` is a folder, and an existing `path` is replaced whole.
    durable: fsync the file and the rename, for what a power cut must not take (weights, manifests).
    overwrite=False: never replace anything; take the first free name of `path`, `<stem>-2<suffix>`, ...
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp_beside(path, folder)
    try:
        mode = _mode(tmp)
        write(tmp)
        _as_output(tmp, mode, folder)
        if durable and not folder:
            _fsync_file(tmp)
        final = _rename(tmp, path, folder) if overwrite else _claim(tmp, path)
    finally:
        _remove(tmp)
    if durable:
        _fsync_folder(final.parent)
    return final


def write_text_atomically(path: str | os.PathLike, text: str, *, durable: bool = False) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable=durable)


def atomic_save_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                            metadata: Mapping[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata else None)

    return write_atomically(path, write, durable=True)


def save_pretrained_atomically(model, folder: str | os.PathLike) -> Path:
    """`model.save_pretrained` (a diffusers pipeline or model) into `folder`, replacing it whole."""
    return write_atomically(folder, lambda tmp: model.save_pretrained(tmp, safe_serialization=True), folder=True)


def give_output_modes(tree: Path) -> Path:
    """Give every file another library wrote under `tree` (diffusers' `save_pretrained`, whose
    safetensors files are 0600) the mode of any new output file."""
    mode = _output_mode(tree)
    for path in tree.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)
    return tree


def new_temp(parent: Path, prefix: str, create: Callable[[Path], object], suffix: str = "") -> Path:
    """A new file or folder (`create` makes it, raising FileExistsError when the name is taken) under
    a name no one else holds. Unlike mkstemp's 0600 and mkdtemp's 0700, its mode is that of any
    output: the umask's (and the folder's default ACL)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            create(path)
            return path
        except FileExistsError:
            continue


def _new_temp_beside(path: Path, folder: bool) -> Path:
    return new_temp(path.parent, TEMP_PREFIX, Path.mkdir if folder else _create_file, suffix=f"-{path.name}")


def _create_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _as_output(tmp: Path, mode: int, folder: bool) -> None:
    # safetensors writes its files 0600 whatever the umask; give them the mode `tmp` was made with.
    if folder:
        give_output_modes(tmp)
    else:
        os.chmod(tmp, mode)


def _rename(tmp: Path, path: Path, folder: bool) -> Path:
    if folder and path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)  # a folder cannot be renamed over one that has files
    os.replace(tmp, path)
    return path


def _claim(tmp: Path, path: Path) -> Path:
    """Give `tmp` the name `path`, or `<stem>-2<suffix>`, `-3`, ... when that is taken: nothing is
    ever replaced, not even a file another process wrote a moment ago."""
    for k in itertools.count(1):
        target = path if k == 1 else path.with_name(f"{path.stem}-{k}{path.suffix}")
        try:
            os.link(tmp, target)  # fails if the name exists, atomically
        except FileExistsError:
            continue
        except OSError:  # a file system without hard links: check, then rename
            if target.exists() or target.is_symlink():
                continue
            tmp.replace(target)
        return target


def _remove(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable, where the file system allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _output_mode(folder: Path) -> int:
    """The mode a new file in `folder` gets (umask, the folder's default ACL), found by making one."""
    probe = new_temp(folder, TEMP_PREFIX, _create_file, suffix="-probe")
    try:
        return _mode(probe)
    finally:
        probe.unlink(missing_ok=True)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)
