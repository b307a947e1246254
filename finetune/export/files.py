"""Writing files so that a crash never leaves half of one: a temporary file in the same folder,
fsynced, renamed over the target, and the rename itself made durable.

Final files get the mode the umask gives any new file (0644 under the usual 022): safetensors
writes its files 0600 whatever the umask, and a LoRA that a ComfyUI service account cannot read
is as good as lost to it."""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable, Mapping
from pathlib import Path

import torch


def atomic_save_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                            metadata: Mapping[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp_file(path)
    mode = _mode(tmp)
    try:
        save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata else None)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return path


def replace_as_output(written: Path, target: Path) -> Path:
    """Move a file another library wrote (diffusers, through safetensors) over `target`, with the
    mode of any new output file."""
    os.chmod(written, _output_mode(target))
    os.replace(written, target)
    return target


def give_output_modes(tree: Path) -> Path:
    """Give every file another library wrote under `tree` (diffusers' `save_pretrained`, whose
    safetensors files are 0600) the mode of any new output file."""
    mode = _output_mode(tree / "probe")
    for path in tree.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)
    return tree


def new_temp(parent: Path, prefix: str, create: Callable[[Path], object]) -> Path:
    """A new file or folder (`create` makes it, raising FileExistsError when the name is taken) under
    a name no one else holds. Unlike mkstemp's 0600 and mkdtemp's 0700, its mode is that of any
    output: the umask's (and the folder's default ACL)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            create(path)
            return path
        except FileExistsError:
            continue


def _new_temp_file(path: Path) -> Path:
    return new_temp(path.parent, f".{path.name}.tmp-",
                    lambda p: os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))


def _output_mode(path: Path) -> int:
    """The mode a new file beside `path` gets (umask, the folder's default ACL), found by making one."""
    probe = _new_temp_file(path)
    try:
        return _mode(probe)
    finally:
        probe.unlink(missing_ok=True)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)
