"""`training.ema`: an exponential moving average of the trained weights, through diffusers' EMAModel,
the same for every method: built from the method's parameter groups, updated after every
`update_every`-th optimizer step, and swapped into the model (EMAModel's store / copy_to / restore)
while the method writes its own files into `ema/`, or while validation samples with it. So every
file format a method writes exists for the average too, with no code per method.

A checkpoint holds `ema/` (the method's files, averaged), `ema_state.safetensors` (the average itself,
one tensor per trained parameter in the order of the groups; never pickled) and `ema_state.json`
(EMAModel's counters): a resumed run averages on exactly as an uninterrupted one. checkpoint.py's
manifest lists them like every other file, so a damaged one makes the checkpoint untrusted.

Every process keeps the same average (their parameters are the same after each step); only the
main one writes. Nothing here is a collective: the trainer calls the writers on the main process
alone.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from ..errors import FinetuneError
from ..files import atomic_save_safetensors, write_text_atomically

FOLDER = "ema"
STATE = "ema_state.safetensors"
COUNTERS = "ema_state.json"


class Ema:
    """The run's average, or nothing at all when `cfg` is None (every method is then a no-op)."""

    def __init__(self, cfg, groups: list[dict], device: torch.device, log: Callable[[str], None]):
        self.cfg, self.device, self.log = cfg, torch.device(device), log
        self.params = [p for g in groups for p in g["params"]]
        self.model = None
        if cfg is None:
            return
        # cpu: the average lives in host memory and visits the accelerator for each update only,
        # as diffusers' examples do with --offload_ema.
        self.home = torch.device("cpu") if cfg.device == "cpu" else self.device
        self.model = self._new()
        n = sum(p.numel() for p in self.params)
        log(f"EMA of {n:,} trained weights on {self.home} (decay {cfg.decay}, every {cfg.update_every} step(s))")

    def _new(self):
        """An average that starts at the parameters as they are now."""
        from diffusers.training_utils import EMAModel

        c = self.cfg
        # foreach makes one temporary the size of the whole average; an average kept in CPU memory
        # already visits the GPU whole for each update, so it goes tensor by tensor (finetune/plan counts both).
        model = EMAModel(self.params, decay=c.decay, update_after_step=c.update_after_step,
                         use_ema_warmup=c.warmup_power is not None, power=c.warmup_power or 2 / 3,
                         foreach=self.home == self.device)
        model.to(self.home)
        return model

    def after_step(self, step: int) -> None:
        """After optimizer step `step` (counted from 1): an update when one is due."""
        if self.model is None or step % self.cfg.update_every:
            return
        away = self.home != self.device
        if away:
            self.model.to(self.device)  # the gradients were just freed: it fits where they were
        self.model.step(self.params)
        if away:
            self.model.to(self.home)

    @contextmanager
    def swapped(self):
        """The averaged weights in the model for the block's duration; then the trained ones, exactly."""
        self.model.store(self.params)
        try:
            self.model.copy_to(self.params)
            yield
        finally:
            self.model.restore(self.params)

    def validation_samples(self, emit: Callable[[object], list[Path]], where) -> list[Path]:
        """`emit(destination)` with the weights `validate_with` names; returns the images that count
        (measured, on the model card): the EMA's for `ema`, the trained weights' for `raw` and `both`
        (`both` puts the EMA's into an `ema/` folder beside them)."""
        how = self.cfg.validate_with if self.model is not None else "raw"
        written = emit(where) if how != "ema" else []
        if how == "raw":
            return written
        prov = where.provenance and replace(where.provenance, kind=f"{where.provenance.kind}, EMA weights")
        dest = replace(where, folder=where.folder / FOLDER if how == "both" else where.folder, provenance=prov)
        with self.swapped():
            averaged = emit(dest)
        return written if how == "both" else averaged

    def write_files(self, save: Callable[[Path], list[Path]], folder: Path) -> list[Path]:
        """`save(folder / "ema")` (the method's own writer) with the averaged weights in the model.
        Main process only."""
        if self.model is None:
            return []
        (Path(folder) / FOLDER).mkdir(parents=True, exist_ok=True)
        with self.swapped():
            return save(Path(folder) / FOLDER)

    def write_checkpoint(self, folder: Path, save: Callable[[Path], list[Path]]) -> None:
        """Into a checkpoint being written: the averaged files, and the average with its counters.
        Main process only."""
        if self.model is None:
            return
        self.write_files(save, folder)
        state = self.model.state_dict()
        shadow = state.pop("shadow_params")
        atomic_save_safetensors(Path(folder) / STATE, {str(i): s.detach().contiguous().cpu() for i, s in enumerate(shadow)})
        write_text_atomically(Path(folder) / COUNTERS, json.dumps(state, indent=1))

    def load_checkpoint(self, folder: Path) -> None:
        """The average and counters a checkpoint saved (every process reads them)."""
        if self.model is None:
            return
        from safetensors.torch import load_file

        path = Path(folder) / STATE
        if not path.is_file():
            self.log(f"warning: {folder.name} holds no EMA (saved without training.ema): the average starts "
                     "from the resumed weights")
            self.model = self._new()
            return
        saved = load_file(path)
        shadow = [saved.get(str(i)) for i in range(len(self.params))]
        if len(saved) != len(self.params) or any(s is None or s.shape != p.shape for s, p in zip(shadow, self.params)):
            raise FinetuneError(f"--resume: {path} does not match this run's trained parameters "
                                f"({len(saved)} saved, {len(self.params)} now); was the recipe changed?")
        counters = json.loads((Path(folder) / COUNTERS).read_text(encoding="utf-8"))
        # The counter through EMAModel (it checks it); the tensors directly: its load_state_dict
        # deep-copies them first, a second full copy of a fine-tune's average in memory.
        self.model.load_state_dict({"optimization_step": int(counters["optimization_step"])})
        self.model.shadow_params = [s.to(self.home, p.dtype) for s, p in zip(shadow, self.params)]
