"""`validation.metrics` during training, on the tiny SD1.5 with the tiny CLIP and DINOv2: a row of
sample metrics at each validation step, keep_best and early stopping by a sample metric (the kept
checkpoint is the logged best, the run stops where the patience rule applied to the logged values
says), and a metric whose model is missing is one warning and no rows, never 0."""

from __future__ import annotations

import json
import math

import pytest

from finetune.recipe import validate
from finetune.train import train
from finetune.train.decisions import observe

from .helpers import make_image_folder, patience_rule, tiny_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPTS = ["a photo of sks ball", "sks ball on the grass"]
METRICS = ["clip_score", "clip_i", "dino", "diversity"]
TINY_MODELS = {"clip": "builtin:tiny-clip", "dino": "builtin:tiny-dinov2"}
PATIENCE, MIN_DELTA, STEPS = 3, 1.0, 6  # cosines never improve by 1.0: the run stops at the 4th validation


def _recipe(tiny_sd15, tmp, **overrides) -> dict:
    data = make_image_folder(tmp / "data", n=8, sizes=((64, 64),))
    settings = {"validation__prompts": PROMPTS, "validation__images_per_prompt": 1, "validation__every_n_steps": 1,
                "validation__metrics": METRICS, "validation__metric_models": TINY_MODELS,
                "training__max_steps": STEPS, "training__learning_rate": 3e-2}
    return tiny_recipe(tiny_sd15, data, tmp / "out", **{**settings, **overrides})


def _rows(run_dir, metric: str) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[metric]) for r in rows if metric in r]


@pytest.fixture(scope="module")
def dino_run(tiny_sd15, tmp_path_factory):
    """Held-out images too (val_loss beside the sample metrics); the best checkpoint and early stopping by dino."""
    tmp, logs = tmp_path_factory.mktemp("dino-run"), []
    r = _recipe(tiny_sd15, tmp, data__validation_split=0.25, output__keep_best="dino", output__keep_last_checkpoints=1,
                training__early_stopping={"metric": "dino", "patience": PATIENCE, "min_delta": MIN_DELTA})
    return train(validate(r, "test"), log=logs.append, progress=False), logs


def test_a_metrics_row_at_each_validation_step(dino_run):
    result, logs = dino_run
    stop = result.steps
    for metric in METRICS + ["val_loss"]:
        assert [s for s, _ in _rows(result.run_dir, metric)] == list(range(1, stop + 1)), metric
    values = {m: dict(_rows(result.run_dir, m)) for m in METRICS}
    assert all(math.isfinite(v) for m in METRICS for v in values[m].values())
    assert all(0 <= v <= 100 for v in values["clip_score"].values())
    assert all(-1 <= values[m][s] <= 1 for m in ("clip_i", "dino") for s in values[m])
    line = "step 1: " + ", ".join(f"{m} {values[m][1]:.4g}" for m in METRICS)
    assert line in logs
    assert not [x for x in logs if "is not measured" in x]


def test_keep_best_keeps_the_checkpoint_of_the_highest_logged_dino(dino_run):
    result, logs = dino_run
    rows = _rows(result.run_dir, "dino")
    step, value = max(rows, key=lambda sv: sv[1])  # the first of equal values, as observe keeps it
    checkpoints = result.run_dir / "checkpoints"
    best = json.loads((checkpoints / "best.json").read_text())
    assert best == {"metric": "dino", "value": value, "step": step, "checkpoint": f"step-{step:06d}"}
    assert step < result.steps, "dino was highest at the last step: no older checkpoint needed keeping"
    # keep_last_checkpoints=1 keeps the newest (early stopping's) and the best besides.
    assert sorted(p.name for p in checkpoints.glob("step-*")) == [f"step-{step:06d}", f"step-{result.steps:06d}"]
    assert json.loads((checkpoints / best["checkpoint"] / "trainer.json").read_text())["step"] == step
    assert (checkpoints / best["checkpoint"] / "pytorch_lora_weights.safetensors").is_file()
    assert f"step {step}: dino {value:.4f} is the highest yet; checkpoints/step-{step:06d} is kept (output.keep_best)" \
        in logs
    card = (result.run_dir / "README.md").read_text()
    last_step, last = rows[-1]
    assert f"| dino | {last:.4f} at step {last_step}; highest {value:.4f} at step {step} |" in card
    assert f"`checkpoints/step-{step:06d}`: dino {value:.4f} at step {step}" in card
    assert "| diversity | " in card and "| held-out loss (val_loss) | " in card


def test_early_stopping_on_dino_stops_where_the_patience_rule_says(dino_run):
    result, logs = dino_run
    rows = _rows(result.run_dir, "dino")
    stop = patience_rule(rows, PATIENCE, MIN_DELTA, higher=True)
    assert stop is not None and result.steps == stop == rows[-1][0] < STEPS
    best_step, best = max(rows, key=lambda sv: sv[1])
    assert (f"early stopping at step {stop}: dino has not improved by {MIN_DELTA} for {PATIENCE} validations "
            f"(best {best:.4f} at step {best_step})") in logs
    assert (result.run_dir / "checkpoints" / f"step-{stop:06d}").is_dir()
    # The stopping step was sampled once, for its metrics, and not again by the end of the run.
    assert len(list((result.run_dir / "samples" / f"step-{stop:06d}").glob("*.png"))) == len(PROMPTS)
    assert (result.run_dir / "pytorch_lora_weights.safetensors").is_file()


def test_patience_rule_on_a_constructed_rising_series():
    series = [(1, 0.5), (2, 0.6), (3, 0.62), (4, 0.7), (5, 0.71), (6, 0.705), (7, 0.9)]
    record, stopped = {}, None
    for step, value in series:
        observe(record, step, value, min_delta=0.05, higher=True)
        if record["since"] >= 2 and stopped is None:
            stopped = step
    assert stopped == patience_rule(series, 2, 0.05, higher=True) == 6
    assert (record["best"], record["best_step"]) == (0.9, 7)


def test_a_missing_metric_model_is_one_warning_and_no_rows(tiny_sd15, tmp_path):
    """CLIP from an empty folder and one image per validation (too few for diversity): each is warned
    about once with its reason and never written; dino still is, at each validation and at the end."""
    (tmp_path / "empty").mkdir()
    logs = []
    r = _recipe(tiny_sd15, tmp_path, validation__prompts=PROMPTS[:1], validation__every_n_steps=2,
                validation__metrics=["clip_score", "dino", "diversity"], training__max_steps=3,
                validation__metric_models={**TINY_MODELS, "clip": str(tmp_path / "empty")},
                output__keep_best="clip_score")
    result = train(validate(r, "test"), log=logs.append, progress=False)
    assert result.steps == 3 and (result.run_dir / "README.md").is_file()
    assert [s for s, _ in _rows(result.run_dir, "dino")] == [2, 3]
    assert not _rows(result.run_dir, "clip_score") and not _rows(result.run_dir, "diversity")
    clip = [x for x in logs if x.startswith("warning: validation.metrics: clip_score is not measured")]
    assert len(clip) == 1 and f"the folder {tmp_path / 'empty'} does not hold a clip model" in clip[0]
    diversity = [x for x in logs if x.startswith("warning: validation.metrics: diversity is not measured")]
    assert diversity == ["warning: validation.metrics: diversity is not measured: diversity needs at least 2 "
                         "images, there is 1"]
    assert [x for x in logs if x.startswith("warning: output.keep_best")] == [
        "warning: output.keep_best: clip_score was not measured at step 2; it decides nothing until it is"]
    assert not (result.run_dir / "checkpoints" / "best.json").exists()
