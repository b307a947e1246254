"""Checkpoints that a killed run can trust, and resuming from them exactly.

A checkpoint folder `checkpoints/step-NNNNNN/` holds the method's files at that step (usable on
their own, like the final ones) and `state/`, what accelerate saves to continue the run: the
trained parameters (ours, as safetensors: the frozen base is never copied), optimizer (8-bit
states included), LR scheduler, gradient scaler and RNG states. `trainer.json` holds the loop's
own counters and position in the data order, and what the data was (each example's image size
and sha256, its caption's sha256): a position in the data order means nothing on other data, so a
resume on changed data is refused unless asked for. `checkpoint.json`, written last, lists every
file with its size and sha256.

It is written into `checkpoints/.tmp-*`, verified, then renamed: a kill at any moment leaves either
no new checkpoint or a complete one, never a damaged previous one. Only a folder whose
`checkpoint.json` matches its files is resumed from.

accelerate writes optimizer, scheduler and RNG state with `torch.save`; they are trainer state,
not weights, and accelerate loads them with `torch.load(weights_only=True)`, which executes no
code from the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import FinetuneError, safe_name
from ..files import atomic_save_safetensors, new_temp, write_text_atomically

MANIFEST = "checkpoint.json"
TRAINER = "trainer.json"
STATE = "state"
PARAMS = "trained_params_{}.safetensors"
# Head-room left on the disk after a checkpoint, for logs, samples and the final files.
DISK_MARGIN = 256 * 2**20


@dataclass
class TrainerState:
    """The loop's own position: enough, with accelerate's state, to continue exactly."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # instance batches already taken from this epoch
    class_batches: int = 0  # class batches taken so far (they cycle across epochs)
    skipped_steps: int = 0
    losses: list[float] = field(default_factory=list)
    method: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)  # data_fingerprint() of what this run trains on
    processes: int = 1  # the data order and RNG states are per process: a resume needs as many
    held_out: dict = field(default_factory=dict)  # decisions.Decisions' record: per metric best/patience, the kept checkpoint


def register_param_hooks(accelerator, groups: list[dict]) -> None:
    """Make accelerate's save_state/load_state keep only the trained parameters of each prepared
    model (named as in the model), in safetensors, instead of whole models."""
    from safetensors.torch import load_file

    trained = {id(p) for g in groups for p in g["params"]}

    def named(model):
        model = accelerator.unwrap_model(model)
        return {n: p for n, p in model.named_parameters() if id(p) in trained}

    def save_hook(models, weights, output_dir):
        for i, model in enumerate(models):
            params = named(model)
            if params and accelerator.is_main_process:  # the same on every process; one writer
                # Not save_file: safetensors writes 0600 whatever the umask.
                atomic_save_safetensors(os.path.join(output_dir, PARAMS.format(i)),
                                        {n: p.detach().contiguous().cpu() for n, p in params.items()})
        weights.clear()  # the frozen base is not part of a checkpoint

    def load_hook(models, input_dir):
        for i, model in enumerate(models):
            params = named(model)
            path = os.path.join(input_dir, PARAMS.format(i))
            if not params:
                continue
            saved = load_file(path)
            if set(saved) != set(params):
                missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
                raise FinetuneError(f"--resume: {path} does not match this run's trained parameters "
                                    f"(missing {missing[:3]}, unexpected {extra[:3]}); was the recipe changed?")
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n].to(p.device, p.dtype))
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _check_safetensors(path: Path) -> None:
    """The header parses and the tensors it declares fit in the file (a truncated write fails)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            f.get_slice(key)


def write_manifest(folder: Path, step: int) -> None:
    for p in _files(folder):
        if p.suffix == ".safetensors":
            _check_safetensors(p)
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(folder)}
    write_text_atomically(folder / MANIFEST, json.dumps({"step": step, "files": files}, indent=1), durable=True)


def verify(folder: Path) -> str | None:
    """Why this checkpoint cannot be trusted (None: it can)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {MANIFEST} (the save did not finish)"
    except (OSError, ValueError) as e:
        return f"{MANIFEST} unreadable ({e})"
    for rel, meta in manifest.get("files", {}).items():
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != meta["size"]:
            return f"{rel} has {p.stat().st_size} bytes, {meta['size']} were written"
        if _sha256(p) != meta["sha256"]:
            return f"{rel} changed since it was written (sha256 differs)"
    if not (folder / TRAINER).is_file() or not (folder / STATE).is_dir():
        return "it holds adapter files only, no training state"
    return None


def check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed + DISK_MARGIN:
        raise FinetuneError(
            f"not enough disk space for a checkpoint in {folder}: it needs about {_gib(needed)} and "
            f"{_gib(DISK_MARGIN)} head-room, {_gib(free)} is free. Free some space, or set output.keep_last_checkpoints "
            "(or a larger output.save_every_n_steps); the previous checkpoint is intact")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def estimate_size(checkpoints: Path, groups: list[dict]) -> int:
    """The last checkpoint's size, or before the first: the trained parameters in fp32 four times
    over (weights, two optimizer moments, the method's files)."""
    done = completed(checkpoints)
    if done:
        return folder_size(done[-1])
    return 4 * 4 * sum(p.numel() for g in groups for p in g["params"])


def completed(checkpoints: Path) -> list[Path]:
    if not checkpoints.is_dir():
        return []
    return sorted(p for p in checkpoints.glob("step-*") if p.is_dir() and (p / MANIFEST).is_file())


def save(accelerator, checkpoints: Path, state: TrainerState, writers: tuple[Callable[[Path], None], ...],
         needed: int, keep: int | None) -> Path:
    """The checkpoint of step `state.step`: every process writes its part through `writers[0](folder)`
    (accelerate's state: an RNG file each), the main process the rest through `writers[1](folder)`
    and `state`; then it verifies, renames and prunes to `keep`. Atomic: a kill leaves no new
    checkpoint or a complete one."""
    from .distributed import on_main

    step, (write_all, write_main) = state.step, writers

    tmp = on_main(accelerator, lambda: _begin(checkpoints, step, needed))
    try:
        write_all(tmp)
    except OSError as e:
        raise _save_failed(e, step, checkpoints) from e
    accelerator.wait_for_everyone()
    return on_main(accelerator, lambda: _commit(tmp, checkpoints, step, write_main, state, keep))


def _save_failed(e: OSError, step: int, checkpoints: Path) -> FinetuneError:
    return FinetuneError(f"could not write the checkpoint for step {step} in {checkpoints}: {e.strerror or e}; "
                         "the previous checkpoint is intact")


def _begin(checkpoints: Path, step: int, needed: int) -> Path:
    try:
        checkpoints.mkdir(parents=True, exist_ok=True)
        check_free_space(checkpoints, needed)
        return new_temp(checkpoints, ".tmp-", Path.mkdir)
    except OSError as e:
        raise _save_failed(e, step, checkpoints) from e


def _commit(tmp: Path, checkpoints: Path, step: int, write_main, state: TrainerState, keep: int | None) -> Path:
    final = checkpoints / f"step-{step:06d}"
    try:
        write_main(tmp)
        (tmp / TRAINER).write_text(json.dumps(asdict(state)), encoding="utf-8")
        write_manifest(tmp, step)
        if final.exists():  # an unverified leftover of a killed run at this step
            shutil.rmtree(final)
        tmp.rename(final)
    except OSError as e:
        raise _save_failed(e, step, checkpoints) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if keep:
        # Only now that the new one is complete do older ones go; output.keep_best's stays.
        for old in completed(checkpoints)[:-keep]:
            if old.name != state.held_out.get("checkpoint"):
                shutil.rmtree(old)
    return final


def check_same_processes(ckpt: Path, processes: int) -> None:
    """Refuse a resume on another number of processes: each one's place in the data and RNG state
    were saved for that number."""
    saved = read_trainer_state(ckpt).processes
    if saved != processes:
        raise FinetuneError(f"--resume: {ckpt.name} was saved by a run on {saved} process(es), this one has "
                            f"{processes}; resume with {saved} (finetune train ... --processes {saved}) to continue "
                            "exactly, or start a new run")


def latest_valid(run_dir: Path, log: Callable[[str], None]) -> Path | None:
    for ckpt in reversed(completed(run_dir / "checkpoints")):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        log(f"warning: skipping checkpoint {ckpt}: {problem}")
    return None


def read_trainer_state(ckpt: Path) -> TrainerState:
    return TrainerState(**json.loads((ckpt / TRAINER).read_text(encoding="utf-8")))


def data_fingerprint(examples) -> dict[str, list]:
    """{example key: [image bytes, image sha256, caption sha256]}; the caption as it trains, whether
    it came from a .txt file, a metadata row or data.instance_prompt."""
    return {e.key: [*_image_fingerprint(e), hashlib.sha256((e.caption or "").encode()).hexdigest(),
                    *_mask_fingerprint(e)] for e in examples}


def _mask_fingerprint(example) -> list:
    """The mask's digest under data.masks (a changed mask changes what trains); nothing without masks, so
    checkpoints of unmasked runs keep their fingerprints."""
    from ..data.masks import image_mask_digest

    digest = image_mask_digest(example)
    return [digest] if digest is not None else []


def _image_fingerprint(example) -> list:
    if example.path is not None:
        return [example.path.stat().st_size, _sha256(example.path)]
    raw = example.data if example.data is not None else example.image.tobytes()
    return [len(raw), hashlib.sha256(raw).hexdigest()]


def check_same_data(ckpt: Path, now: dict, allow_changed: bool, log: Callable[[str], None]) -> None:
    """Refuse to resume from `ckpt` on other data than it was saved with, unless `allow_changed`."""
    saved = read_trainer_state(ckpt).data
    if not saved:
        log(f"note: {ckpt} records no fingerprint of its training data (saved by an older version); "
            "the data is not compared")
        return
    changes = _changes(saved, now)
    if not changes:
        return
    if allow_changed:
        log(f"warning: --allow-changed-data: resuming on changed training data ({changes}); "
            "the run no longer continues exactly as it would have")
        return
    raise FinetuneError(f"--resume: the training data changed since {ckpt.name} was saved: {changes}; a resumed "
                        "run continues exactly only on the same data. Restore it, or pass --allow-changed-data "
                        "to go on with the data as it is now")


def _changes(saved: dict, now: dict) -> str:
    both = saved.keys() & now.keys()
    found = {"added": now.keys() - saved.keys(), "removed": saved.keys() - now.keys(),
             "image changed": {k for k in both if saved[k][:2] != now[k][:2]},
             "caption changed": {k for k in both if saved[k][2:3] != now[k][2:3]},
             "mask changed": {k for k in both if saved[k][3:] != now[k][3:]}}
    return ", ".join(f"{len(keys)} {what} ({_some(keys)})" for what, keys in found.items() if keys)


def _some(keys, n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(map(safe_name, keys[:n])) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def discard_after(run_dir: Path, ckpt: Path, step: int) -> None:
    """What the interrupted run wrote after `ckpt`: unfinished saves, later samples and metrics."""
    for p in (run_dir / "checkpoints").glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in (run_dir / "samples").glob("step-*"):
        if p.is_dir() and int(p.name.split("-")[1]) > step:
            shutil.rmtree(p)
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        rows = [line for line in metrics.read_text(encoding="utf-8").splitlines() if _row_step(line) <= step]
        metrics.write_text("".join(line + "\n" for line in rows), encoding="utf-8")


def _row_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # a torn last line from the kill: dropped
