"""The one training loop, as a Trainer: `prepare` (data, optimizer, accelerate), `fit` (epochs of
`train_step`s, each ending in `end_step`: metrics, `validation`, `save_checkpoint`), `finish` (final
files, samples, model card). It knows nothing of SD1 vs FLUX or LoRA vs DreamBooth: the family
turns images and captions into model inputs and targets, the method decides what trains and what
is saved. On several processes only the main one writes; what one process decides, all act on."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .distributed import any_process, per_process, summed
from .decisions import Decisions
from .ema import Ema
from .held_out import HeldOut
from .peak import watch_memory
from .steps import NonFinite, Window
from .validation_metrics import SampleMetrics


@dataclass
class Run:
    """What a run is about, settled before training starts."""

    recipe: object
    log: object
    progress: bool
    family: object
    source: object
    examples: list
    dataset: object
    run_dir: Path
    run_name: str
    resume_from: Path | None
    accelerator: object
    c: object  # the components, never wrapped: methods, saving and sampling see the models themselves
    method: object
    groups: list[dict]
    output_hooks: object
    class_files: list[Path] = field(default_factory=list)
    held_out: list = field(default_factory=list)  # examples kept out of training (held_out.py)


@dataclass
class RunResult:
    run_dir: Path
    files: list[Path]
    losses: list[float]
    steps: int
    samples: list[Path] = field(default_factory=list)
    interrupted: str | None = None  # the signal's name when a run stopped early with a checkpoint
    checkpoint: Path | None = None
    # In-memory objects for callers that go on using them (tests, notebooks).
    components: object = None
    optimizer: object = None


class Trainer:
    def __init__(self, run: Run):
        self.run, self.recipe, self.tr = run, run.recipe, run.recipe.training
        self.accelerator, self.c, self.method, self.log = run.accelerator, run.c, run.method, run.log
        self.state = ckpt.TrainerState(processes=run.accelerator.num_processes)
        self.samples: list[Path] = []
        self.window = Window()
        self.non_finite = NonFinite(self.recipe, self.log)

    def prepare(self) -> None:
        from .block_swap import swap_of
        from .feed import build_feed
        from .memory import Offloaded, offload_part, place_denoiser
        from .optim import build_optimizer, build_scheduler

        r, a, mem = self.run, self.accelerator, self.recipe.memory
        self.peaks = watch_memory(r)
        self.offloaded, self.embed = Offloaded(a.device), None
        self.feed = build_feed(r, a, self._text_cached)  # captions first: their encoders leave before the VAE works
        offload_part(self.offloaded, "vae", {"VAE": self.c.vae}, mem.vae, self.feed.latents_precomputed, self.log)
        place_denoiser(self.c, mem, a.device, self.log)
        self.max_steps = self.tr.max_steps or self.tr.epochs * self.feed.sampler.steps_per_epoch
        self.n_epochs = math.ceil(self.max_steps / self.feed.sampler.steps_per_epoch)
        self._scale_learning_rates()
        optimizer = build_optimizer(r.groups, r.recipe.optimizer, self.tr.learning_rate)
        scheduler = build_scheduler(self.tr, optimizer, self.max_steps, a.num_processes)
        self.trainable = self.method.trainable_modules(self.c)
        # A model with parked blocks is placed already: accelerate would move them all to the GPU.
        placement = [swap_of(m) is None for m in self.trainable] + [True, True, True]
        *wrapped, self.optimizer, self.scheduler, self.loader = a.prepare(
            *self.trainable, optimizer, scheduler, self.feed.loader, device_placement=placement)
        # The forward pass goes through accelerate's wrappers (DDP syncs gradients there).
        swap = {id(m): w for m, w in zip(self.trainable, wrapped)}
        self.forward_c = replace(self.c, denoiser=swap.get(id(self.c.denoiser), self.c.denoiser),
                                 text_encoders={n: swap.get(id(t), t) for n, t in self.c.text_encoders.items()})
        self.wrapped = wrapped
        self.params = [p for g in r.groups for p in g["params"]]
        self.ema = Ema(self.tr.ema, r.groups, a.device, self.log)  # training.ema; inert when off
        ckpt.register_param_hooks(a, r.groups)
        self.batch_loss = self.feed.batch_loss(self.forward_c)
        if r.resume_from is not None:
            self.resume(r.resume_from)
        self.held_out, self.sample_metrics, self.last_saved = HeldOut(self), SampleMetrics(self), None
        self.decisions = Decisions(self)  # after a resume: it reads the resumed state
        self.validated: tuple[int | None, list[Path]] = (None, [])  # the last validation's step and samples

    def _text_cached(self, precomputed: bool) -> None:
        """Once every caption is encoded: the validation prompts too, then the text encoders may go."""
        from .memory import offload_choice, offload_part, validation_embeddings

        mem, a = self.recipe.memory, self.accelerator
        if offload_choice(mem.text_encoders, precomputed, a.device):
            self.embed = validation_embeddings(self.run.family, self.c, self.recipe.validation, a.autocast)
        encoders = {f"text encoder {n}": te for n, te in self.c.text_encoders.items()}
        offload_part(self.offloaded, "text_encoders", encoders, mem.text_encoders, precomputed, self.log)

    @property
    def global_batch(self) -> int:
        return self.tr.batch_size * self.accelerator.num_processes * self.tr.gradient_accumulation_steps

    def _scale_learning_rates(self) -> None:
        if not self.tr.scale_lr:
            return
        for group in self.run.groups:
            group["lr"] = group.get("lr", self.tr.learning_rate) * self.global_batch
        self.log(f"learning rates x {self.global_batch}, the global batch (training.scale_lr)")

    def resume(self, folder: Path) -> None:
        # After caching, which draws from the RNG exactly as the first run did; now the RNG, optimizer,
        # scheduler and trained weights become those of the checkpoint.
        self.accelerator.load_state(str(folder / ckpt.STATE))
        self.state = ckpt.read_trainer_state(folder)
        self.state.data = {}  # recorded afresh at the next save: the data may have changed (--allow-changed-data)
        self.method.load_state_dict(self.state.method, self.c)
        self.ema.load_checkpoint(folder)
        if self.accelerator.is_main_process:
            ckpt.discard_after(self.run.run_dir, folder, self.state.step)
        self.log(f"resuming from {folder} at step {self.state.step} (epoch {self.state.epoch}, "
                 f"batch {self.state.batches_in_epoch})")

    def fit(self) -> RunResult:
        from .tracking import open_metrics
        from .signals import GracefulStop

        self.metrics = open_metrics(self.run, self.accelerator)  # metrics.jsonl, and output.trackers
        self._announce()
        self.bar = self._progress_bar()
        for m in self.trainable:
            m.train()
        self.stop = GracefulStop(self.log)
        try:
            with self.stop:
                for epoch in range(self.state.epoch, self.n_epochs):
                    stopped = self.train_epoch(epoch)
                    if stopped is not None:
                        return stopped
                    if self.state.step >= self.max_steps:
                        break
        finally:
            self.bar.close()
            if self.metrics:
                self.metrics.close()
                self.metrics = None  # closed: later rows (the end-of-run held-out loss) open the file anew
        return self.finish()

    def _announce(self) -> None:
        tr, a, s = self.tr, self.accelerator, self.feed.sampler
        self.log(f"training {self.max_steps} steps ({self.n_epochs} epochs of {s.steps_per_epoch}), global batch "
                 f"{self.global_batch} = {tr.batch_size} per process x {a.num_processes} process(es) x "
                 f"{tr.gradient_accumulation_steps} accumulation, on {a.device}")

    def _progress_bar(self):
        from tqdm.auto import tqdm

        return tqdm(total=self.max_steps, initial=self.state.step, desc="train",
                    disable=not self.run.progress or not self.accelerator.is_main_process)

    def train_epoch(self, epoch: int) -> RunResult | None:
        """One epoch from the saved position; a RunResult when a stop signal ended the run here."""
        skip = self.state.batches_in_epoch if epoch == self.state.epoch else 0
        self.feed.sampler.start_at(epoch, skip)
        self.loader.set_epoch(epoch)
        self.batches_in_epoch = skip
        for batch in self.loader:
            self.train_step(batch)
            self.batches_in_epoch += 1
            if not self.accelerator.sync_gradients:
                continue
            stopped = self.end_step(epoch)
            if stopped is not None or self.state.step >= self.max_steps:
                return stopped
        return None

    def train_step(self, batch: dict) -> None:
        """One batch: forward, backward (or a skip all processes agree on), and at a window's end the
        optimizer step."""
        a = self.accelerator
        with a.accumulate(*self.wrapped):
            loss, stats = self.batch_loss(batch)
            finite = not any_process(a, not bool(torch.isfinite(loss)))
            if finite:
                a.backward(loss)
                self.window.add(stats)
                self.non_finite.ok()
            else:
                self.non_finite.skip(loss, self.state.step + 1, batch, self.state)
                if a.sync_gradients and self.window.has_grads:
                    # DDP averages gradients during the window's last backward: it must still run.
                    a.backward(sum(p.sum() for p in self.params) * 0.0)
            if a.sync_gradients and self.tr.max_grad_norm and self.window.has_grads:
                a.clip_grad_norm_(self.params, self.tr.max_grad_norm)
            if self.window.has_grads:  # every batch of this step skipped: nothing to apply (nor to unscale)
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if a.sync_gradients:
                self.method.after_step(self.c)
                self.ema.after_step(self.state.step + 1)  # end_step counts this step

    def end_step(self, epoch: int) -> RunResult | None:
        """After an optimizer step: metrics, samples and checkpoints as the recipe asks; a RunResult
        when a stop signal (on any process) ends the run here."""
        a, st, v_every, s_every = self.accelerator, self.state, self.recipe.validation.every_n_steps, \
            self.recipe.output.save_every_n_steps
        totals = summed(a, [*self.window.totals(), 1.0 if self.stop.requested else 0.0])
        step_loss = self.window.close(totals[:-1])
        st.step += 1
        st.losses.append(step_loss)
        st.epoch, st.batches_in_epoch = epoch, self.batches_in_epoch
        st.method = self.method.state_dict()
        self._report(step_loss)
        last = st.step >= self.max_steps
        if v_every and st.step % v_every == 0 and not last and self.validation(st.step):
            self.max_steps, last = st.step, True  # early stopping: finish() does not validate this step again
        stop = totals[-1] > 0
        if (s_every and st.step % s_every == 0 or stop) and not last:
            saved = self.save_checkpoint()
            if stop:
                return self._stopped(saved)
        return None

    def _report(self, step_loss: float) -> None:
        from .optim import step_size

        st, lr, size = self.state, self.scheduler.get_last_lr()[0], step_size(self.optimizer)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{size.get('effective_lr', lr):.2e}")
        if st.step % self.tr.log_every_n_steps and st.step != self.max_steps:
            return
        row = {**size, **self.window.rates(self.accelerator, per_process)}
        if st.skipped_steps:
            row["skipped_batches"] = st.skipped_steps
        if self.metrics:
            self.metrics.write(step=st.step, epoch=st.epoch, loss=step_loss, lr=lr, **row)

    def validation(self, step: int, end: bool = False) -> bool:
        """Sample, measure the samples and the held-out images, then decide (keep_best, early stopping) on
        what this step measured; True when early stopping ends the run here."""
        from .optim import averaged

        # A schedule-free optimizer's averaged weights are measured, the ones its files hold; the decisions
        # (which may save a checkpoint, whose state/ must hold the trained weights) come after.
        with averaged(self.optimizer):
            written = self.validate(step)
            self.samples += written
            self.validated = (step, written)
            values = {**self.sample_metrics.measure(step, written), **self.held_out.measure(step)}
        return self.decisions.decide(step, values, end=end)

    def validate(self, step: int) -> list[Path]:
        """Sample the validation prompts with the model as it is now (main process; the others wait); inside
        `validation`, which swaps in a schedule-free optimizer's averaged weights."""
        from ..hooks import Provenance
        from .memory import classifiers_on, onloaded
        from .sampling import Destination, Sampling, emit_images

        v, r, a = self.recipe.validation, self.run, self.accelerator
        if not v.prompts:
            return []
        written = []
        if a.is_main_process:
            for m in self.trainable:
                m.eval()
            pipe = self.c.pipeline
            pipe.set_progress_bar_config(disable=True)
            res = self.recipe.data.resolution
            try:
                how = Sampling(seed=v.seed, n=v.images_per_prompt, steps=v.num_inference_steps,
                               guidance=v.guidance_scale, negative_prompt=v.negative_prompt, width=v.width or res,
                               height=v.height or res, autocast=a.autocast, embed=self.embed)
                where = Destination(r.run_dir / "samples" / f"step-{step:06d}", r.output_hooks, log=self.log,
                                    provenance=Provenance(prompt="", base_model=r.source.label, run=r.run_name,
                                                          kind=f"validation step {step}"))
                # Sampled from the embeddings made before the text encoders left: only the VAE returns.
                with onloaded(self.offloaded, ["VAE"]), classifiers_on(r.output_hooks, a.device):
                    written = self.ema.validation_samples(lambda dest: emit_images(pipe, v.prompts, how, dest), where)
            finally:
                for m in self.trainable:
                    m.train()
        a.wait_for_everyone()
        return written

    def save_checkpoint(self) -> Path:
        from .optim import averaged

        r, a = self.run, self.accelerator
        if self.last_saved and self.last_saved[0] == self.state.step:  # keep_best saved this step already
            return self.last_saved[1]
        self.state.data = self.state.data or ckpt.data_fingerprint(r.examples)
        folder = r.run_dir / "checkpoints"

        def write_main(tmp: Path) -> None:
            self.method.save(self.c, tmp, self.recipe.output, r.run_name)  # usable on their own, like the final files
            self.ema.write_checkpoint(tmp, lambda folder: self.method.save(self.c, folder, self.recipe.output, r.run_name))

        def write_averaged(tmp: Path) -> None:
            # After state/ (written first) took the trained weights, which a resume continues from: the
            # files, like the final ones, are a schedule-free optimizer's averaged weights.
            with averaged(self.optimizer):
                write_main(tmp)

        saved = ckpt.save(a, folder, self.state, (lambda tmp: a.save_state(str(tmp / ckpt.STATE)), write_averaged),
                          ckpt.estimate_size(folder, r.groups), self.recipe.output.keep_last_checkpoints)
        self.last_saved = (self.state.step, saved)
        return saved

    def _stopped(self, saved: Path) -> RunResult:
        st = self.state
        self.log(f"{self.stop.name or 'stop'}: stopped at step {st.step} of {self.max_steps}; checkpoint {saved}")
        return RunResult(run_dir=self.run.run_dir, files=[], losses=st.losses, steps=st.step, samples=self.samples,
                         interrupted=self.stop.name or "SIGTERM", checkpoint=saved, components=self.c,
                         optimizer=self.optimizer)

    def finish(self) -> RunResult:
        """The final files, samples and model card, written by the main process."""
        from ..export.model_card import write_model_card
        from ..export.plots import write_plots
        from .optim import final_weights

        r, a, st = self.run, self.accelerator, self.state
        final_weights(self.optimizer)  # schedule-free: the averaged weights, for the files, samples and caller
        files = self.method.save(self.c, r.run_dir, self.recipe.output, r.run_name) if a.is_main_process else []
        if a.is_main_process:  # the same files again, averaged, into ema/
            self.ema.write_files(lambda folder: self.method.save(self.c, folder, self.recipe.output, r.run_name), r.run_dir)
        if self.validated[0] != st.step:  # early stopping validated this step already
            self.validation(st.step, end=True)  # before the card, which names the best checkpoint
        final_samples = self.validated[1]
        self.peaks.report(r)
        if a.is_main_process:
            write_plots(r.run_dir, self.log)  # best effort: a warning line, never a failed run
            card = write_model_card(r.run_dir, self.recipe, r.family, self.method, r.source, r.run_name, files,
                                    final_samples, st.losses)
            self.log(f"done: {st.step} steps, final loss {st.losses[-1]:.4f}; "
                     f"wrote {', '.join(str(f) for f in [*files, card])}")
        a.wait_for_everyone()
        return RunResult(run_dir=r.run_dir, files=files, losses=st.losses, steps=st.step, samples=self.samples,
                         components=self.c, optimizer=self.optimizer)
