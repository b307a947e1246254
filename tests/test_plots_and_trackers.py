"""A run ends with pictures (plots/metrics.png, plots/samples.png, linked from its model card) and
sends its metrics to the trackers `output.trackers` names, through accelerate; a tracker that cannot
run is one line before anything loads, and a plot that cannot be made is a warning, never a failure."""

import importlib.util
import json

import numpy as np
import pytest
from PIL import Image

from finetune.errors import RecipeError
from finetune.export import plots

from .helpers import train_quietly, two_image_recipe

PROMPTS = ["a photo of sks ball", "a red cube on a table"]


@pytest.fixture(scope="module")
def run(tiny_sd15, tmp_path_factory, one_torch_thread):
    """4 steps, validation samples at steps 2 and 4, logged to TensorBoard."""
    tmp = tmp_path_factory.mktemp("plots")
    trackers = ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    recipe = two_image_recipe(tiny_sd15, tmp, validation__prompts=PROMPTS, validation__every_n_steps=2,
                              output__trackers=trackers)
    result = train_quietly(recipe)
    return result.run_dir


def step_losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "step" in r}


def test_the_run_draws_its_metrics(run):
    with Image.open(run / "plots" / "metrics.png") as im:
        assert im.format == "PNG" and im.height > im.width / 2  # a panel a metric: loss, lr and more
    series = plots.step_series(run / "metrics.jsonl")
    assert {"loss", "lr", "images_per_second"} <= set(series) and "step" not in series
    assert series["loss"][0] == [1, 2, 3, 4]


def test_the_sample_grid_is_prompts_by_steps(run):
    """One row a prompt, one column a validation step, each cell the image that prompt made then."""
    cell = 64  # the samples' side (resolution 64)
    with Image.open(run / "plots" / "samples.png") as im:
        grid = np.asarray(im.convert("RGB"))
    assert grid.shape[:2] == (plots.HEADER + len(PROMPTS) * cell, plots.LABEL + 2 * cell)
    for row, prompt in enumerate(PROMPTS):
        for col, step in enumerate((2, 4)):
            [file] = (run / "samples" / f"step-{step:06d}").glob(f"*-{prompt.replace(' ', '-')}-0.png")
            y, x = plots.HEADER + row * cell, plots.LABEL + col * cell
            with Image.open(file) as sample:
                assert np.array_equal(grid[y:y + cell, x:x + cell], np.asarray(sample.convert("RGB"))), (prompt, step)


def test_the_card_links_both_plots(run):
    card = (run / "README.md").read_text(encoding="utf-8")
    assert "](plots/metrics.png)" in card and "](plots/samples.png)" in card


def test_a_broken_metrics_file_is_a_warning_not_a_failure(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": \nnot json\n["a list"]\n')
    lines = []
    assert plots.write_plots(tmp_path, lines.append) == []
    assert len(lines) == 1 and lines[0].startswith("warning: plots/metrics.png not made"), lines
    assert "metrics.jsonl" in lines[0]
    assert plots.card_lines(tmp_path) == []


def test_a_torn_last_line_still_plots(tmp_path):
    rows = [json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-4, "val_loss": 0.5}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"memory": {}}\n{"step": 4, "lo')
    assert plots.write_plots(tmp_path, pytest.fail) == [tmp_path / "plots" / "metrics.png"]
    assert set(plots.step_series(tmp_path / "metrics.jsonl")) == {"loss", "lr", "val_loss"}


def test_smoothing_follows_a_constant_and_lags_a_jump():
    assert plots.ema([2.0] * 5) == pytest.approx([2.0] * 5)  # bias-corrected: no pull towards 0
    smoothed = plots.ema([0.0] * 5 + [1.0] * 5)
    assert 0 < smoothed[5] < smoothed[-1] < 1


@pytest.mark.skipif(not importlib.util.find_spec("tensorboard"), reason="tensorboard is not installed")
def test_tensorboard_receives_every_logged_loss(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "logs" / "run"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("loss")}
    assert logged == pytest.approx(step_losses(run))
    assert "lr" in events.Tags()["scalars"]


def test_an_unknown_tracker_is_refused_naming_the_known_ones(tiny_sd15, tmp_path):
    recipe = two_image_recipe(tiny_sd15, tmp_path, output__trackers=["tensorbord"])
    with pytest.raises(RecipeError) as e:
        train_quietly(recipe)
    from accelerate.utils import LoggerType

    known = ", ".join(t.value for t in LoggerType)  # all, aim, tensorboard, wandb, ... as this accelerate has them
    assert str(e.value) == f"output.trackers: unknown tracker 'tensorbord'; accelerate knows: {known}"
    assert not (tmp_path / "out" / "run").exists()  # refused before the run folder, before loading


@pytest.mark.skipif(importlib.util.find_spec("comet_ml") is not None, reason="comet_ml is installed")
def test_a_tracker_not_installed_names_the_package_to_install(tiny_sd15, tmp_path):
    recipe = two_image_recipe(tiny_sd15, tmp_path, output__trackers=["comet_ml"])
    with pytest.raises(RecipeError) as e:
        train_quietly(recipe)
    assert str(e.value) == ("output.trackers: comet_ml needs the comet-ml package (pip install comet-ml), "
                            "or remove it from output.trackers")
