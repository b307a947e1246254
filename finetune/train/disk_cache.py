"""`memory.cache_dir`: latents and text-encoder outputs as safetensors files, one per image or caption,
named by a digest of everything that made them (the image's bytes, its bucket, crop and flip, the
seed of its VAE sample, the VAE's config and weights, the dtype and device; the caption, the
tokenizers', encoders' configs and weights). A later run of the same data and settings finds them; a
change in any of these names other files. They are read back one batch at a time, so host RAM never
holds the cache.

Each process writes its share of the entries under a temporary name and renames it
(finetune/files.py): no reader, in this run or another, ever sees a file half-written. Each file holds a
checksum of its tensors, checked on every read: a truncated or damaged file (an interrupted copy, a
full disk, a bad sector) is computed again before training, or stops the run with one line if it
breaks while the run reads it."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import FinetuneError
from ..files import write_atomically
from .caches import encode_item, gather_dicts, latent_seed, my_share, progress

# Part of every name: bump it when what an entry holds, or how it is computed, changes.
FORMAT = "1"
LATENTS, TEXT = "latents", "text embeddings"
_FOLDERS = {LATENTS: "latents", TEXT: "text"}


class DamagedEntry(Exception):
    """A cache file that cannot be read whole, or whose tensors are not the ones it was written with."""


def cache_dir_problem(folder: str) -> str | None:
    """What stops `memory.cache_dir` from being a folder this process can write into, found without
    creating anything (so before any model loads); None if nothing."""
    path = Path(folder).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable" + ("" if existing == path else f" (to create {path} in it)")
    return None


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _tensor_digest(name: str, t: torch.Tensor) -> str:
    h = hashlib.sha256(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    # Raw bytes (bf16 and fp8 have no numpy dtype): one byte-typed view of the contiguous tensor.
    h.update(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    return digest([_tensor_digest(name, tensors[name]) for name in sorted(tensors)])


def module_identity(module: torch.nn.Module) -> str:
    """A digest of a frozen model: its class, its config and every weight's bytes. Hashing the weights
    as loaded covers every way of naming them (hub id, folder, single file, model.vae, a revision) at
    about 1 GB/s per core, once a run; the tensors are hashed in threads (hashlib releases the GIL)."""
    items = list(module.state_dict().items())
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        weights = list(pool.map(lambda kv: _tensor_digest(*kv), items))
    return digest({"class": type(module).__name__, "config": _config(module), "weights": weights})


def _config(module) -> dict:
    cfg = getattr(module, "config", None)
    values = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
    # Where it was loaded from and which release saved it do not change what it computes.
    return {k: v for k, v in values.items() if not k.startswith("_") and k != "transformers_version"}


def tokenizer_identity(tok) -> str:
    backend = getattr(tok, "backend_tokenizer", None)  # vocabulary, merges, normalizer: the whole tokenizer
    if backend is not None:
        spec = json.loads(backend.to_str())
        # Padding and truncation are whatever the last call asked for (each encode_prompts sets its own).
        for setting in ("padding", "truncation"):
            spec.pop(setting, None)
    else:
        spec = tok.get_vocab()
    return digest({"class": type(tok).__name__, "spec": spec, "max_length": tok.model_max_length, "size": len(tok)})


def image_digest(example) -> str:
    from ..cache import file_sha256

    if example.path is not None:
        return file_sha256(example.path)  # remembered per (path, size, mtime): a rerun reads no image
    if example.data is not None:
        return hashlib.sha256(example.data).hexdigest()
    image = example.image
    return hashlib.sha256(f"{image.mode}|{image.size}|".encode() + image.tobytes()).hexdigest()


def mask_digest(example) -> str | None:
    """An example's data.masks mask (its file's bytes, or "alpha": the image's bytes hold it); None: none."""
    from ..data.masks import image_mask_digest

    return image_mask_digest(example)


def latent_identity(family, c, dtype: torch.dtype, device: torch.device) -> dict:
    """What every latent entry of a run shares: the VAE, the family's scaling, dtype, device (a CUDA
    and a CPU sample of one seed differ)."""
    return {"format": FORMAT, "family": family.name, "vae": module_identity(c.vae), "dtype": str(dtype),
            "device": torch.device(device).type}


def text_identity(family, c, device: torch.device) -> dict:
    return {"format": FORMAT, "family": family.name, "device": torch.device(device).type,
            "encoders": {n: module_identity(m) for n, m in sorted(c.text_encoders.items())},
            "tokenizers": {n: tokenizer_identity(t) for n, t in sorted(c.tokenizers.items())}}


def read_entry(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a cache file; DamagedEntry when it is not whole or not what its name says."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise DamagedEntry(str(e)) from e
    if meta.get("format") != FORMAT or digest(meta.get("key")) != path.stem:
        raise DamagedEntry("not the entry its name stands for")
    if meta.get("sha256") != tensors_digest(tensors):
        raise DamagedEntry("its tensors do not match their checksum")
    return tensors, meta


def write_entry(path: Path, key: str, tensors: dict[str, torch.Tensor], extra: dict[str, str]) -> None:
    from safetensors.torch import save_file

    meta = {**extra, "format": FORMAT, "key": key, "sha256": tensors_digest(tensors)}
    # Not durable (no fsync per file): a file a power cut leaves damaged fails its checksum and is redone.
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


class DiskEntries(Mapping):
    """{key: tensors} (or only the tensor named `only` of each), each read from its file when asked for."""

    def __init__(self, paths: dict[str, Path], only: str | None = None):
        self.paths, self.only = paths, only

    def __getitem__(self, key):
        path = self.paths[key]
        try:
            tensors = read_entry(path)[0]
        except (OSError, DamagedEntry) as e:
            reason = e.strerror if isinstance(e, OSError) else e
            raise FinetuneError(f"memory.cache_dir: {path} changed while the run was reading it ({reason}); "
                                "run again to compute it anew") from e
        return tensors[self.only] if self.only else tensors

    def __contains__(self, key) -> bool:
        return key in self.paths

    def __iter__(self) -> Iterator:
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class LatentEncoder:
    encode: Callable[[torch.Tensor], torch.Tensor]  # pixels -> latents (the family's VAE encode)
    dtype: torch.dtype
    identity: dict  # latent_identity
    shrink_mask: Callable[[torch.Tensor], torch.Tensor] | None = None  # data.masks -> the latent grid


@dataclass
class DiskCache:
    folder: Path
    accelerator: object
    log: Callable[[str], None]
    tallies: dict = field(default_factory=dict)  # kind -> [entries, reused, bytes]

    @classmethod
    def open(cls, folder: str, accelerator, log) -> DiskCache:
        path = Path(folder).expanduser()
        problem = cache_dir_problem(folder)
        if problem is None:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                problem = f"cannot create folder {path}: {e.strerror}"
        if problem:
            raise FinetuneError(f"memory.cache_dir: {problem}; name a folder you can write, or leave it unset "
                                "to cache in memory")
        return cls(path, accelerator, log)

    def latents(self, dataset, seed: int, encoder: LatentEncoder, bar: str | None) -> tuple[dict, dict]:
        """({key: path}, {key: sizes}) of every example of `dataset`, found or encoded."""
        cfg = dataset.cfg

        def entry(i: int):
            parts = {**encoder.identity, "image": image_digest(dataset.examples[i]), "crop": cfg.crop,
                     "flip": cfg.random_flip, "size": list(dataset.buckets[dataset.bucket_of_index[i]]),
                     "seed": latent_seed(seed, i)}
            if (mask := mask_digest(dataset.examples[i])) is not None:  # unmasked entries keep their names
                parts["mask"] = mask

            def make():
                latent, sizes, mask = encode_item(dataset, i, encoder.encode, seed, encoder.dtype, encoder.shrink_mask)
                tensors = {"latent": latent} if mask is None else {"latent": latent, "mask": mask}
                return tensors, {"sizes": json.dumps(sizes)}

            return parts, make

        found = self._fill(LATENTS, list(range(len(dataset.examples))), entry, bar)
        keys = {i: dataset.examples[i].key for i in found}
        sizes = {keys[i]: {k: tuple(v) for k, v in json.loads(meta["sizes"]).items()} for i, (_, meta) in found.items()}
        return {keys[i]: path for i, (path, _) in found.items()}, sizes

    def texts(self, captions: list[str], encode, identity: dict, bar: str | None) -> dict[str, Path]:
        """{caption: path} of every caption, found or encoded (`encode(caption)` -> tensors)."""
        entry = lambda cap: ({**identity, "caption": cap}, lambda: (encode(cap), {}))  # noqa: E731
        return {cap: path for cap, (path, _) in self._fill(TEXT, captions, entry, bar).items()}

    def _fill(self, kind: str, keys: list, entry: Callable, bar: str | None) -> dict:
        """{key: (path, metadata)} for every key on every process: each process finds or makes its share
        (`entry(key)` -> (name parts, make); make() -> (tensors, metadata))."""
        a, reused, mine = self.accelerator, 0, {}
        for k in progress(my_share(keys, a), bar, a):
            parts, make = entry(k)
            name = json.dumps(parts, sort_keys=True, default=str)
            path = self.folder / _FOLDERS[kind] / f"{digest(name)}.safetensors"
            meta = self._reusable(path)
            if meta is None:
                tensors, meta = make()
                self._write(path, name, tensors, meta)
            else:
                reused += 1
            mine[k] = (path, meta)
        found, counts = gather_dicts(a, mine, {a.process_index: reused})
        self._tally(kind, [p for p, _ in found.values()], sum(counts.values()))
        return found

    def _reusable(self, path: Path) -> dict | None:
        try:
            return read_entry(path)[1]
        except FileNotFoundError:
            return None
        except (OSError, DamagedEntry) as e:
            self.log(f"warning: cache file {path} is damaged ({e}); computing it again")
            return None

    def _write(self, path: Path, name: str, tensors: dict, meta: dict) -> None:
        try:
            write_entry(path, name, tensors, meta)
        except OSError as e:
            raise FinetuneError(f"memory.cache_dir: cannot write {path}: {e.strerror}") from e

    def _tally(self, kind: str, paths: list[Path], reused: int) -> None:
        unseen = [p for p in paths if not p.is_file()]
        if unseen:
            raise FinetuneError(f"memory.cache_dir: {unseen[0]}, written by another process, is not visible here: "
                                f"{self.folder} must be on a file system every process (every machine) shares")
        total = sum(p.stat().st_size for p in paths)
        was = self.tallies.get(kind, [0, 0, 0])
        self.tallies[kind] = [was[0] + len(paths), was[1] + reused, was[2] + total]
        self.log(f"{kind}: {len(paths)} cached on disk, {reused} reused ({_mb(total)}) in {self.folder}")

    def summary(self) -> str:
        held = " and ".join(f"{n} {kind} ({_mb(size)})" for kind, (n, _, size) in self.tallies.items())
        return f"disk cache: {held} on disk in {self.folder}; host RAM holds one batch"


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.1f} kB"
