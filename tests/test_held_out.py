"""Held-out images (data.validation_split / validation_path), the val_loss measured on them,
output.keep_best and training.early_stopping, on the tiny SD1.5: the split is deterministic and never
trains, val_loss rows appear where validations are, an offloaded (here: disabled) text encoder is
never needed for them, the kept checkpoint is the logged lowest, and early stopping stops where the
patience rule applied to the logged values says."""

from __future__ import annotations

import json
import math

import pytest

from finetune.errors import FinetuneError, RecipeError
from finetune.recipe import validate
from finetune.train import train
from finetune.train.decisions import _upgrade, observe
from finetune.train.held_out import held_out_keys, split_examples
from finetune.train.trainer import Trainer

from .helpers import make_image_folder, patience_rule, tiny_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N_IMAGES, SPLIT, EVERY, STEPS = 8, 0.25, 2, 6


def _recipe(tiny_sd15, tmp, memory=(), **overrides) -> dict:
    data = make_image_folder(tmp / "data", n=N_IMAGES, sizes=((64, 64),))
    settings = {"data__validation_split": SPLIT, "validation__every_n_steps": EVERY, "training__max_steps": STEPS,
                "output__keep_best": "val_loss", "output__save_every_n_steps": 1, "output__keep_last_checkpoints": 1}
    r = tiny_recipe(tiny_sd15, data, tmp / "out", **{**settings, **overrides})
    r.setdefault("memory", {}).update(memory)
    return r


def _val_rows(run_dir) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]


@pytest.fixture(scope="module")
def default_run(tiny_sd15, tmp_path_factory):
    """A run with 2 of 8 images held out, recording the image keys of every training batch."""
    tmp = tmp_path_factory.mktemp("held-out")
    trained_keys, logs = [], []
    original = Trainer.train_step

    def recording(self, batch):  # the real step, seen from outside
        trained_keys.extend(batch["instance"]["key"])
        return original(self, batch)

    Trainer.train_step = recording
    try:
        result = train(validate(_recipe(tiny_sd15, tmp), "test"), log=logs.append, progress=False)
    finally:
        Trainer.train_step = original
    return result, trained_keys, logs, tmp


def test_split_is_deterministic_disjoint_and_never_trained(default_run):
    _, trained_keys, logs, tmp = default_run
    recipe = validate(_recipe_path(tmp), "test")
    from finetune.data import discover_examples

    examples = discover_examples(recipe.data, log=lambda *_: None)
    train_a, held_a = split_examples(recipe, examples, None, lambda *_: None)
    _, held_b = split_examples(recipe, list(reversed(examples)), None, lambda *_: None)
    held = {e.key for e in held_a}
    assert held == {e.key for e in held_b} == set(held_out_keys([e.key for e in examples], 2, 0))
    assert len(held) == int(N_IMAGES * SPLIT) and held.isdisjoint(e.key for e in train_a)
    assert {e.key for e in train_a} | held == {e.key for e in examples}
    assert set(held_out_keys([e.key for e in examples], 2, 1)) != held  # the seed chooses them
    assert "validation: 2 of 8 images held out (data.validation_split 0.25, seed 0)" in logs
    assert trained_keys and held.isdisjoint(trained_keys)
    assert set(trained_keys) == {e.key for e in train_a}


def _recipe_path(tmp) -> dict:
    return tiny_recipe("builtin:tiny-sd15", tmp / "data", tmp / "out", data__validation_split=SPLIT)


def test_val_loss_rows_at_validation_steps_and_the_end(default_run):
    result, _, logs, _ = default_run
    rows = _val_rows(result.run_dir)
    assert [s for s, _ in rows] == list(range(EVERY, STEPS + 1, EVERY))
    assert all(math.isfinite(v) and v > 0 for _, v in rows)
    assert any(line.startswith(f"step {EVERY}: val_loss {rows[0][1]:.4f} on 2 held-out images") for line in logs)


def test_keep_best_keeps_the_checkpoint_of_the_lowest_logged_val_loss(default_run):
    result, *_ = default_run
    rows = _val_rows(result.run_dir)
    step, value = min(rows, key=lambda sv: sv[1])
    checkpoints = result.run_dir / "checkpoints"
    best = json.loads((checkpoints / "best.json").read_text())
    assert (best["step"], best["value"], best["checkpoint"]) == (step, value, f"step-{step:06d}")
    kept = sorted(p.name for p in checkpoints.glob("step-*"))
    # keep_last_checkpoints=1 keeps the newest (step 5, the last before the end) and the best besides.
    assert f"step-{step:06d}" in kept and len(kept) <= 2
    best_dir = checkpoints / best["checkpoint"]
    assert (best_dir / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((best_dir / "trainer.json").read_text())["step"] == step
    card = (result.run_dir / "README.md").read_text()
    assert f"`checkpoints/step-{step:06d}`: val_loss {value:.4f} at step {step}" in card


def test_keep_last_never_deletes_the_best(tiny_sd15, tmp_path):
    """A learning rate that makes the held-out loss worse after the first validation: the best is then
    an old checkpoint that keep_last_checkpoints=1 would have deleted."""
    r = _recipe(tiny_sd15, tmp_path, training__learning_rate=0.5, training__max_steps=4,
                validation__every_n_steps=1)
    result = train(validate(r, "test"), log=lambda *_: None, progress=False)
    step, _ = min(_val_rows(result.run_dir), key=lambda sv: sv[1])
    best = json.loads((result.run_dir / "checkpoints" / "best.json").read_text())
    assert best["step"] == step
    assert step < 3, "the run's loss did not get worse: the best is among the last checkpoints anyway"
    assert (result.run_dir / "checkpoints" / best["checkpoint"] / "trainer.json").is_file()


def test_val_loss_needs_no_text_encoder_once_cached_and_early_stopping(default_run, tiny_sd15, tmp_path,
                                                                         monkeypatch):
    """The same run with memory.text_encoders=offload and a text encoder that fails if it runs once the
    captions are cached (what offloading means; on a CPU nothing moves): the same val_loss values. Early
    stopping with a min_delta nothing reaches ends it where the patience rule says."""
    reference, _, _, _ = default_run
    original = Trainer._text_cached

    def refuse(*_):
        raise AssertionError("a text encoder ran after the captions were cached")

    def then_disabled(self, precomputed):
        original(self, precomputed)
        for te in self.c.text_encoders.values():
            te.register_forward_pre_hook(refuse)

    monkeypatch.setattr(Trainer, "_text_cached", then_disabled)
    patience, min_delta, logs = 1, 1.0, []
    r = _recipe(tiny_sd15, tmp_path, memory={"text_encoders": "offload"},
                training__early_stopping={"patience": patience, "min_delta": min_delta})
    result = train(validate(r, "test"), log=logs.append, progress=False)

    rows = _val_rows(result.run_dir)
    expected = dict(_val_rows(reference.run_dir))
    # Bitwise equal on a CPU with one thread; a GPU may differ in the last bits between any two runs.
    assert rows and [v for _, v in rows] == pytest.approx([expected[s] for s, _ in rows], rel=1e-6)
    stop = patience_rule(rows, patience, min_delta)
    assert stop is not None and result.steps == stop == rows[-1][0] < STEPS
    best_step, best = min(rows, key=lambda sv: sv[1])
    assert (f"early stopping at step {stop}: val_loss has not improved by {min_delta} for {patience} validations "
            f"(best {best:.4f} at step {best_step})") in logs
    assert (result.run_dir / "checkpoints" / f"step-{stop:06d}").is_dir()
    assert (result.run_dir / "pytorch_lora_weights.safetensors").is_file() and (result.run_dir / "README.md").is_file()


def test_patience_rule_on_a_constructed_series():
    series = [(1, 1.0), (2, 0.8), (3, 0.79), (4, 0.7), (5, 0.69), (6, 0.695), (7, 0.5)]
    record, stopped = {}, None
    for step, value in series:
        observe(record, step, value, min_delta=0.05)
        if record["since"] >= 2 and stopped is None:
            stopped = step
    assert stopped == patience_rule(series, 2, 0.05) == 6
    assert (record["best"], record["best_step"]) == (0.5, 7)


def test_a_record_saved_when_only_val_loss_decided_resumes_as_val_loss():
    """A trainer state of a run saved before any other metric could keep a checkpoint: its record is val_loss's."""
    record = {"best": 0.5, "best_step": 2, "reference": 0.5, "since": 1, "checkpoint": "step-000002"}
    _upgrade(record)
    assert record == {"metrics": {"val_loss": {"best": 0.5, "best_step": 2, "reference": 0.5, "since": 1}},
                      "checkpoint": "step-000002", "kept_by": "val_loss"}


@pytest.mark.parametrize("overrides, fragment", [
    ({"output__keep_best": "val_loss"}, "output.keep_best: val_loss needs held-out images"),
    ({"output__keep_best": "val_loss", "data__validation_split": 0.2}, "output.keep_best: val_loss needs held-out"),
    ({"training__early_stopping": {"patience": 2}, "validation__every_n_steps": 2},
     "training.early_stopping.metric: val_loss needs held-out images"),
    # A sample metric: listed in validation.metrics, with prompts to sample and validation steps.
    ({"output__keep_best": "dino", "validation__every_n_steps": 2},
     "output.keep_best: dino needs validation.metrics to include it"),
    ({"output__keep_best": "clip_i", "validation__every_n_steps": 2, "validation__metrics": ["clip_i"]},
     "output.keep_best: clip_i needs validation.metrics to include it, validation.prompts"),
    ({"output__keep_best": "dino", "validation__metrics": ["dino"], "validation__prompts": ["a photo"]},
     "output.keep_best: dino needs validation.metrics to include it, validation.prompts and validation.every_n_steps"),
    ({"training__early_stopping": {"metric": "clip_score"}, "validation__every_n_steps": 2,
      "validation__metrics": ["dino"], "validation__prompts": ["a photo"]},
     "training.early_stopping.metric: clip_score needs validation.metrics to include it"),
    ({"output__keep_best": "diversity", "validation__metrics": ["diversity"]}, "output.keep_best"),
    ({"validation__metrics": ["fid"]}, "validation.metrics"),
    ({"data__validation_split": 0.6}, "data.validation_split: expected less than or equal to 0.5"),
    ({"data__validation_split": 0.2, "data__validation_path": "x"}, "data.validation_path: set it or"),
    ({"output__keep_best": "loss"}, "output.keep_best"),
])
def test_recipe_refusals(tmp_path, overrides, fragment):
    with pytest.raises(RecipeError) as e:
        validate(tiny_recipe("builtin:tiny-sd15", tmp_path, tmp_path / "out", **overrides), "test")
    assert fragment in str(e.value) and len(str(e.value).splitlines()) == 1


def test_too_few_images_and_an_empty_validation_path_refused_before_loading(tiny_sd15, tmp_path):
    data = make_image_folder(tmp_path / "data", n=3, sizes=((64, 64),))
    with pytest.raises(FinetuneError, match=r"^data.validation_split: 0.25 of 3 images holds none out; use at "
                                            r"least 4 images"):
        train(validate(tiny_recipe(tiny_sd15, data, tmp_path / "out", data__validation_split=0.25), "t"),
              log=lambda *_: None, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FinetuneError, match=r"^data.validation_path: no images found"):
        train(validate(tiny_recipe(tiny_sd15, data, tmp_path / "out",
                                   data__validation_path=str(tmp_path / "empty")), "t"),
              log=lambda *_: None, progress=False)
    assert not (tmp_path / "out" / "run").exists()
