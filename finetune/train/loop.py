"""`train(recipe)`: check, claim the run folder, load, and hand over to the Trainer (trainer.py).

Started by a launcher (`finetune train --processes N`, `accelerate launch`, torchrun) this runs in
every process: the main one claims the folder and makes class images, the others receive what it
found; then all train together."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import RecipeError
from . import checkpoint as ckpt
from .held_out import split_examples
from .memory import check_memory_options
from .preflight import preflight
from .run_dir import open_run, owned
from .setup import resolve_family
from .trainer import RunResult, Trainer

__all__ = ["RunResult", "train"]


def train(recipe, recipe_path: Path | None = None, log: Callable[[str], None] = print,
          progress: bool = True, resume: str | None = None, allow_changed_data: bool = False) -> RunResult:
    """Train as `recipe` says. `resume`: "latest" or a run folder / checkpoint to continue exactly;
    refused when the training data changed since, unless `allow_changed_data`."""
    from ..data import ImageCaptionDataset, discover_examples
    from .distributed import process_state
    from .peak import reset_peak

    preflight(recipe)
    state = process_state()
    reset_peak(state.device)  # the measured peak covers loading and class images too
    log = log if state.is_main_process else _silent
    family, source = resolve_family(recipe.model)
    if why := family.method_problem(recipe.method):  # also for a recipe built in Python, or a hub model
        raise RecipeError([why])
    recipe = concrete_precision(recipe, family)
    check_memory_options(recipe, state.num_processes)
    base_dir = recipe_path.parent if recipe_path else None
    examples = discover_examples(recipe.data, base_dir, log=log)
    examples, held_out = split_examples(recipe, examples, base_dir, log)  # held-out images never train
    dataset = ImageCaptionDataset(examples, recipe.data, seed=recipe.training.seed)
    log(f"data: {len(examples)} images x {recipe.data.repeats} repeats from {recipe.data.path}")
    if recipe.data.masks:
        masked = sum(bool(getattr(e, "masked", False)) for e in examples)
        log(f"masks: {masked} of {len(examples)} images weighted by data.masks ({recipe.data.masks})"
            + ("" if masked == len(examples) else "; the others train unmasked (named above)"))

    # The folder is this run's (created, or locked for a resume) before any model loads.
    run_dir, run_name, resume_from, lock = _claim(state, recipe, recipe_path, resume, log,
                                                  lambda ckpt_dir: _may_resume(ckpt_dir, examples, state,
                                                                               allow_changed_data, log))
    with owned(run_dir, lock, log):
        run = _load(recipe, dict(log=log, progress=progress, family=family, source=source, examples=examples,
                                 dataset=dataset, run_dir=run_dir, run_name=run_name, resume_from=resume_from,
                                 held_out=held_out))
        trainer = Trainer(run)
        trainer.prepare()
        return trainer.fit()


def concrete_precision(recipe, family):
    """The recipe with `training.mixed_precision: auto` replaced by what this machine runs, so the
    saved recipe.yaml (and a resume's comparison with it) says what was used."""
    from ..devices import training_precision

    chosen = training_precision(recipe.training.mixed_precision, family=family)
    if chosen == recipe.training.mixed_precision:
        return recipe
    return recipe.model_copy(update={"training": recipe.training.model_copy(update={"mixed_precision": chosen})})


def _silent(*_args, **_kwargs) -> None:
    pass


def _claim(state, recipe, recipe_path, resume, log, check_resume):
    """open_run on the main process, which keeps the lock; every process learns the folder."""
    from .distributed import on_main

    held = {}

    def job():
        run_dir, name, resume_from, lock = open_run(recipe, recipe_path, resume, log)
        held["lock"] = lock
        if resume_from is not None:
            try:
                check_resume(resume_from)
            except BaseException:
                lock.release()
                raise
        return run_dir, name, resume_from

    run_dir, name, resume_from = on_main(state, job)
    return run_dir, name, resume_from, held.get("lock")


def _may_resume(resume_from: Path, examples, state, allow_changed_data: bool, log) -> None:
    ckpt.check_same_processes(resume_from, state.num_processes)
    ckpt.check_same_data(resume_from, ckpt.data_fingerprint(examples), allow_changed_data, log)


def _load(recipe, known: dict):
    """The Run: to what is `known` about it, the model loaded and placed, class images made, the
    method attached."""
    from ..hooks import build_pipeline
    from .memory import use_tf32
    from .setup import attach_method, class_images, load_components, make_accelerator
    from .trainer import Run

    # Before the model loads: a configured filter that cannot load stops the run now (fail closed).
    log, family = known["log"], known["family"]
    output_hooks = build_pipeline(recipe.output.hooks, log)
    for line in output_hooks.describe():
        log(line)
    accelerator = make_accelerator(recipe.training, recipe.output.trackers, known["run_dir"])
    use_tf32(recipe.memory, accelerator.device, log)
    log(f"loading {known['source'].label} ({family.name})")
    c = load_components(family, known["source"], recipe.model, recipe.training, accelerator.device, recipe.memory)
    class_files = class_images(recipe, c, accelerator, output_hooks, log, known["progress"])
    method, groups = attach_method(recipe, family, c, log)
    log(f"run folder: {known['run_dir']}")
    return Run(recipe=recipe, **known, accelerator=accelerator, c=c, method=method, groups=groups,
               output_hooks=output_hooks, class_files=class_files)
