"""The run folder: outputs/<run>/ with the resolved recipe, adapters, samples, metrics, model card.

A run owns its folder from the moment it starts, before any model loads: a new run creates it
with one mkdir, so of two runs given one name exactly one gets it, and every run, new or resumed,
holds `.lock` until it ends. The lock is an flock: the kernel releases it however the process ends
(kill -9 included), so a lock nobody holds is stale by definition, and its pid/host/start say whose
it was."""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import shutil
import socket
import time
from pathlib import Path

from ..errors import FinetuneError, safe_name
from ..recipe import dump_recipe

LOCK = ".lock"
# What a run writes about itself; a failed run with nothing else (and no complete checkpoint) has
# nothing worth keeping, and its folder goes so that the name is free again.
BOOKKEEPING = frozenset({"recipe.yaml", "metrics.jsonl", "samples", "checkpoints", "logs", LOCK})


def open_run(recipe, recipe_path: Path | None, resume: str | None, log) -> tuple[Path, str, Path | None, RunLock]:
    """(run folder, run name, checkpoint to resume from or None, the folder's lock): a new run's
    folder created, or a resumed run's found; locked either way, before any model loads."""
    if not resume:
        run_dir, name, lock = claim_run_dir(recipe, recipe_path, log)
        return run_dir, name, None, lock
    run_dir, name, ckpt = find_resume(recipe, recipe_path, resume, log)
    lock = RunLock.take(run_dir, "--resume")
    lock.record(log)
    return run_dir, name, ckpt, lock


def claim_run_dir(recipe, recipe_path: Path | None, log) -> tuple[Path, str, RunLock]:
    """Create and lock this new run's folder, or refuse in one line; writes recipe.yaml."""
    out = Path(recipe.output.dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if recipe.output.run_name:
            run_dir, name = _named(out, recipe.output.run_name), recipe.output.run_name
        else:
            stem = recipe_path.stem if recipe_path else "run"
            run_dir, name = _unnamed(out, f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    except OSError as e:
        raise FinetuneError(f"output.dir: cannot create a run folder in {out}: {e.strerror or e}") from None
    _refuse_if_taken(run_dir, name)  # before touching it: a finished run's folder stays as it was
    lock = RunLock.take(run_dir, "output.run_name")
    try:
        _refuse_if_taken(run_dir, name)  # again under the lock: another run may have got in between
        lock.record(log)
        (run_dir / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
    except FinetuneError:
        lock.release()
        raise
    except OSError as e:
        lock.release()
        shutil.rmtree(run_dir, ignore_errors=True)  # empty but for what failed to be written
        raise FinetuneError(f"output.dir: cannot write in {run_dir}: {e.strerror or e}") from None
    return run_dir, name, lock


def _refuse_if_taken(run_dir: Path, name: str) -> None:
    if any(p.name != LOCK for p in run_dir.iterdir()):
        raise FinetuneError(f"output.run_name: {run_dir} already exists and is not empty; choose another run name "
                            f"(e.g. output.run_name={name}-2) or remove that folder")


def _named(out: Path, name: str) -> Path:
    run_dir = out / name
    try:
        run_dir.mkdir()
    except FileExistsError:
        if not run_dir.is_dir():
            raise FinetuneError(f"output.run_name: {run_dir} exists and is not a folder; "
                                "choose another run name") from None
        # An empty folder (made by hand) is taken as it is: emptiness is checked under the lock.
    return run_dir


def _unnamed(out: Path, stem: str) -> tuple[Path, str]:
    """A new folder named after the recipe and the second it started, with -2, -3... when that
    second already has a run (two runs started together)."""
    for n in itertools.count(1):
        name = stem if n == 1 else f"{stem}-{n}"
        try:
            (out / name).mkdir()
            return out / name, name
        except FileExistsError:
            continue


class RunLock:
    """`.lock` in a run folder, held for the run's life; it says which process holds it."""

    def __init__(self, run_dir: Path, fd: int):
        self.run_dir, self.path, self.fd = run_dir, run_dir / LOCK, fd

    @classmethod
    def take(cls, run_dir: Path, key: str) -> RunLock:
        """The lock, or a one-line refusal (under `key`, the option at fault) naming the folder and
        the run that holds it."""
        path = run_dir / LOCK
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise FinetuneError(f"{key}: cannot lock {run_dir}: {e.strerror or e}") from None
            if not _try_lock(fd):
                holder = _holder(fd)
                os.close(fd)
                raise FinetuneError(f"{key}: {run_dir} is in use by another run ({holder or 'just starting'}); "
                                    "wait for it to end, or use another run folder")
            if _same_file(fd, path):
                return cls(run_dir, fd)
            os.close(fd)  # its last holder removed it while we opened it: lock the file there now

    def record(self, log) -> None:
        """Write who holds the lock now, after saying whose stale lock this was, if anyone's."""
        stale = _holder(self.fd)
        if stale:
            log(f"warning: {self.run_dir} was locked by a run that did not end cleanly ({stale}); "
                "it is no longer running, taking the folder over")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.write(self.fd, json.dumps(info).encode())

    def release(self) -> None:
        # Removed while still held: whoever opened it meanwhile sees it is gone and locks anew.
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)


def _try_lock(fd: int) -> bool:
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False


def _holder(fd: int) -> str:
    """Whose lock this is, from what its holder wrote: "pid 12 on host, since ..." ("": nobody's)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096) or b"null")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}" if info else ""
    except (OSError, ValueError, TypeError, KeyError):
        return "a lock file that does not say whose it is"


def worth_keeping(run_dir: Path) -> list[str]:
    """What a failed run must not lose: its final files (adapters, model card) and complete checkpoints."""
    from .checkpoint import completed

    if not run_dir.is_dir():
        return []
    finals = sorted(p.name for p in run_dir.iterdir() if p.name not in BOOKKEEPING and not p.name.startswith("."))
    return finals + [f"checkpoints/{c.name}" for c in completed(run_dir / "checkpoints")]


@contextlib.contextmanager
def owned(run_dir: Path, lock: RunLock | None, log):
    """The run's time in its folder. However it ends the lock is released; when it fails, the folder
    is removed only if it holds nothing worth keeping, and otherwise the log says what it kept.
    `lock` None: a process other than the main one, which owns nothing."""
    if lock is None:
        yield
        return
    before = worth_keeping(run_dir)
    try:
        yield
    except BaseException as e:
        kept = worth_keeping(run_dir)
        if not kept:
            shutil.rmtree(run_dir, ignore_errors=True)
        storage = _storage_error(e)
        if storage is not None:
            raise FinetuneError(_cannot_write(storage, run_dir, kept)) from e
        if kept and kept != before:
            log(f"the run failed; {run_dir} keeps what it completed: {', '.join(kept)}")
        raise
    finally:
        lock.release()


# Failures of the storage, not of the run: the user frees space or fixes the mount, then resumes.
_STORAGE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EROFS: "the file system is read-only"}
if hasattr(errno, "EDQUOT"):  # not on Windows
    _STORAGE_ERRNOS[errno.EDQUOT] = "the disk quota is exceeded"


def _storage_error(e: BaseException) -> OSError | None:
    """The full disk, quota or read-only file system behind `e`, if any (libraries may wrap it); a
    FinetuneError already says what failed."""
    seen = set()
    while e is not None and id(e) not in seen and not isinstance(e, FinetuneError):
        if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
            return e
        seen.add(id(e))
        e = e.__cause__ if e.__cause__ is not None or e.__suppress_context__ else e.__context__
    return None


def _cannot_write(e: OSError, run_dir: Path, kept: list[str]) -> str:
    what = safe_name(e.filename) if e.filename else f"to {run_dir}"
    outcome = (f"{run_dir} keeps what it completed: {', '.join(kept)}" if kept
               else f"nothing was complete yet, so {run_dir} was removed")
    return f"cannot write {what}: {_STORAGE_ERRNOS[e.errno]}; {outcome}"


class MetricsLog:
    """metrics.jsonl: one JSON object a line, appended and flushed as training goes."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "a", encoding="utf-8")

    def write(self, **row) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: Path) -> list[dict]:
    """A metrics.jsonl's rows, oldest first; lines that are not JSON objects (a torn last line of a run
    that was killed) are passed over, and a missing file has none."""
    rows = []
    for text in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            row = json.loads(text)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


# Sections a resumed run may change: they decide what is written and sampled, not what is trained.
RESUME_MAY_CHANGE = ("description", "output", "validation", "memory")


def find_resume(recipe, recipe_path: Path | None, resume: str, log) -> tuple[Path, str, Path]:
    """The run folder, its name and the checkpoint to continue from, for `--resume` (`latest`) or
    `--resume PATH` (a run folder or one of its checkpoints)."""
    from .checkpoint import MANIFEST, latest_valid, verify

    if resume != "latest":
        path = Path(resume)
        if (path / MANIFEST).is_file() or path.parent.name == "checkpoints":
            problem = verify(path) if path.is_dir() else "no such folder"
            if problem:
                raise FinetuneError(f"--resume: {path} cannot be resumed from: {problem}")
            ckpt, run_dir = path, path.parent.parent
        elif path.is_dir():
            run_dir, ckpt = path, latest_valid(path, log)
        else:
            raise FinetuneError(f"--resume: {path} is neither a run folder nor a checkpoint")
    else:
        run_dir, ckpt = _latest_run(recipe, recipe_path, log)
    if (run_dir / "README.md").is_file():  # the model card is the last thing a finished run writes
        raise FinetuneError(f"--resume: {run_dir} already finished; its final files are in that folder")
    if ckpt is None:
        raise FinetuneError(f"--resume: {run_dir} has no complete checkpoint to resume from; set "
                            "output.save_every_n_steps so runs leave checkpoints, or start afresh without --resume")
    _check_same_recipe(recipe, run_dir)
    return run_dir, run_dir.name, ckpt


def _latest_run(recipe, recipe_path, log):
    from .checkpoint import latest_valid

    out = Path(recipe.output.dir)
    if recipe.output.run_name:
        candidates = [out / recipe.output.run_name]
    else:
        stem = recipe_path.stem if recipe_path else "run"
        candidates = [p for p in out.glob(f"{stem}-*") if p.is_dir()]
    found = [(run, ckpt) for run in candidates if (ckpt := latest_valid(run, log)) is not None]
    if not found:
        where = candidates[0] if recipe.output.run_name else out / f"{recipe_path.stem if recipe_path else 'run'}-*"
        raise FinetuneError(f"--resume: no checkpoint to resume from in {where}; give the run folder "
                            "(--resume outputs/<run>) or start afresh without --resume")
    return max(found, key=lambda rc: rc[1].stat().st_mtime)


def _check_same_recipe(recipe, run_dir: Path) -> None:
    import yaml

    try:
        saved = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise FinetuneError(f"--resume: cannot read {run_dir / 'recipe.yaml'} ({e})") from None
    now = recipe.model_dump(mode="json")
    diffs = [k for k in _differences(saved or {}, now) if k.split(".")[0] not in RESUME_MAY_CHANGE]
    if diffs:
        raise FinetuneError(f"--resume: the recipe differs from the one {run_dir.name} was started with at "
                            f"{', '.join(diffs[:6])}; a resumed run must train the same way (only "
                            f"{', '.join(RESUME_MAY_CHANGE)} may change). Resume with that run's recipe.yaml")


def _differences(a, b, prefix: str = "") -> list[str]:
    """Key paths where a and b differ, for keys both have (a newer version's new keys are not a change)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in a.keys() & b.keys():
            out += _differences(a[k], b[k], f"{prefix}{k}.")
        return sorted(out)
    return [] if a == b else [prefix.rstrip(".")]
