"""`finetune eval` as a user runs it on a trained run, a checkpoint or a bare LoRA file: the same seeds
without and with the adapter, every metric with the tiny CLIP and DINOv2, eval.json + report + grids,
the model card's link; and bad input as one line each, with nothing half-written."""

import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from finetune.cli import app
from finetune.eval.inputs import split_prompts, without_trigger
from finetune.prompts import PromptRow

from .helpers import make_image_folder, tiny_recipe, train_quietly

runner = CliRunner()
TINY = ["--clip", "builtin:tiny-clip", "--dino", "builtin:tiny-dinov2"]
SUBJECT_METRICS = {"clip_score", "clip_i", "dino", "diversity", "kid_dinov2"}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_sd15, one_torch_thread):
    """A LoRA trained enough to change the images, with validation prompts and a trigger word."""
    tmp = tmp_path_factory.mktemp("eval")
    data = make_image_folder(tmp / "data", n=4, sizes=((64, 64),), caption="a photo of sks ball")
    r = tiny_recipe(tiny_sd15, data, tmp / "out", training__max_steps=30, training__batch_size=2)
    r["validation"] = {"prompts": ["a photo of sks ball", "sks ball on grass"], "num_inference_steps": 3,
                       "metric_models": {"clip": "builtin:tiny-clip", "dino": "builtin:tiny-dinov2"}}
    r["output"]["trigger_words"] = ["sks ball"]
    r["output"]["save_every_n_steps"] = 15
    return train_quietly(r).run_dir


@pytest.fixture(scope="module")
def evaluated(run):
    r = invoke("eval", run, "--n", 2)
    assert r.exit_code == 0, r.output
    return run / "eval", json.loads((run / "eval" / "eval.json").read_text())


def test_eval_of_a_run_measures_both_sides_and_the_prior(evaluated):
    folder, record = evaluated
    metrics = record["metrics"]
    for name in SUBJECT_METRICS:  # from the run's own metric models, on both sides
        assert set(metrics[name]) == {"base", "adapter"}, name
        assert all(np.isfinite(v) for v in metrics[name].values())
    for name in ("prior_clip_i", "prior_dino"):
        assert 0.5 < metrics[name]["adapter"] <= 1.0 + 1e-6
    assert record["prompts"] == {"subject": ["a photo of sks ball", "sks ball on grass"],
                                 "prior": ["a photo of ball", "ball on grass"]}
    assert record["reference"]["count"] == 4
    # Too few images for a Fréchet distance: missing with the count it needs, never 0; no Inception unless asked.
    assert "fd_dinov2" not in metrics and "50 images" in record["missing"]["fd_dinov2"]
    assert "fid" not in metrics and "pickled" in record["missing"]["fid"]


def test_same_seeds_without_and_with_the_adapter(evaluated):
    folder, record = evaluated
    assert len(record["images"]) == 4 * 2  # 4 prompts x --n 2
    assert sorted(i["seed"] for i in record["images"]) == [0, 1, 2, 3, 4, 5, 6, 7]
    moved = []
    for item in record["images"]:
        base, adapted = (np.asarray(Image.open(folder / item[side]), dtype=np.float32) for side in ("base", "adapter"))
        assert (folder / item["base"]).name == (folder / item["adapter"]).name
        moved.append(np.abs(base - adapted).mean())
    assert max(moved) > 0.5  # the adapter changed what the same noise becomes


def test_report_grids_and_card_link(evaluated, run):
    folder, record = evaluated
    report = (folder / "report.md").read_text()
    grids = sorted((folder / "grids").glob("*.png"))
    assert len(grids) == 4
    for g in grids:
        assert f"(grids/{g.name})" in report
        with Image.open(g) as im:
            assert im.size == (2 * 64, 2 * 64)  # the base row above the adapter row, a column per seed
    assert "| clip_i |" in report and "fd_dinov2: needs at least 50" in report
    card = (run / "README.md").read_text()
    assert "[eval/report.md](eval/report.md)" in card and card.count("## Evaluation") == 1


def test_eval_again_replaces_the_card_section_and_is_reproducible(evaluated, run):
    _, first = evaluated
    r = invoke("eval", run, "--n", 2)
    assert r.exit_code == 0, r.output
    again = json.loads((run / "eval" / "eval.json").read_text())
    assert again["metrics"] == first["metrics"]
    assert (run / "README.md").read_text().count("## Evaluation") == 1


def test_checkpoint_and_bare_lora_file(run, tiny_sd15, tmp_path):
    ckpt = run / "checkpoints" / "step-000015"
    r = invoke("eval", ckpt, "--n", 1, "--steps", 2)
    assert r.exit_code == 0, r.output
    assert (run / "eval-step-000015" / "eval.json").is_file()
    lora = run / "pytorch_lora_weights.safetensors"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of sks ball\na photo of a ball\n")
    out = tmp_path / "bare"
    r = invoke("eval", lora, "--base", tiny_sd15, "--prompts", prompts, "--trigger", "sks ball", "--n", 1,
               "--steps", 2, "--out", out, "--inception", *TINY)
    assert r.exit_code == 0, r.output
    assert "no --reference images" in r.output
    record = json.loads((out / "eval.json").read_text())
    assert record["prompts"] == {"subject": ["a photo of sks ball"], "prior": ["a photo of a ball"]}
    assert "clip_score" in record["metrics"] and "prior_dino" in record["metrics"]
    assert "reference" in record["missing"]["clip_i"]
    if importlib.util.find_spec("torch_fidelity") is None:  # asked for, not installed: missing, and why
        assert "torch-fidelity is not installed" in record["missing"]["fid"]


def _refused(args, fragment, out_dir):
    r = invoke("eval", *args)
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and fragment in lines[-1], r.output
    assert "Traceback" not in r.output
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_bad_input_is_one_line_and_writes_nothing(run, tmp_path):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"prompt": "a photo of sks ball"}\n{"prompt": \n')
    no_trigger = tmp_path / "plain.txt"
    no_trigger.write_text("a photo of a ball\n")
    cases = [
        ([tmp_path / "nothing-here"], "no such run folder"),
        ([run / "recipe.yaml"], "not a .safetensors file"),
        ([run / "pytorch_lora_weights.safetensors"], "--base"),
        ([run, "--base", "builtin:tiny-sdxl"], "is a sdxl model"),
        ([run, "--reference", empty], "reference images"),
        ([run, "--prompts", bad_jsonl], "bad.jsonl:2: not valid JSON"),
        ([run, "--prompts", no_trigger], "no prompt holds a trigger word"),
        ([run, "--n", 0], "--n: must be from 1"),
    ]
    for args, fragment in cases:
        _refused([*args, "--out", out], fragment, out)


def test_a_lora_of_another_family_fails_in_one_line_and_keeps_the_last_eval(run, tmp_path):
    out = tmp_path / "kept"
    out.mkdir()
    (out / "eval.json").write_text("{}")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of sks ball\n")
    r = invoke("eval", run / "pytorch_lora_weights.safetensors", "--base", "builtin:tiny-sdxl", "--prompts", prompts,
               "--trigger", "sks ball", "--n", 1, "--steps", 1, "--out", out, *TINY)
    assert r.exit_code == 1 and "error: --lora" in r.output and "Traceback" not in r.output
    assert sorted(os.listdir(out)) == ["eval.json"] and (out / "eval.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_prior_prompts_from_the_trigger_words():
    triggers = ["sks robot"]
    assert without_trigger("a photo of SKS robot on a beach", triggers, {}) == "a photo of robot on a beach"
    assert without_trigger("a lighthouse in the style of mystyle", ["in the style of mystyle"], {}) == "a lighthouse"
    assert without_trigger("<sks-robot> on a table", ["<sks-robot>"], {"<sks-robot>": "robot"}) == "robot on a table"
    subject, prior = split_prompts([PromptRow("a photo of sks robot"), PromptRow("a dog")], triggers, None)
    assert [r.prompt for r in subject] == ["a photo of sks robot"] and [r.prompt for r in prior] == ["a dog"]
    subject, prior = split_prompts([PromptRow("a photo of sks robot")], [], None)
    assert prior == []  # no trigger known: no prior to measure


@pytest.mark.parametrize("method", ["textual_inversion", "dreambooth"])
def test_textual_inversion_and_dreambooth_runs(tiny_run, method, tmp_path):
    """The adapter as each method saved it: embeddings loaded into the base, or the fine-tuned model in its place."""
    run = tiny_run("sd1", method)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of <sks-ball> ball\na photo of a ball\n")
    r = invoke("eval", run, "--prompts", prompts, "--n", 1, "--steps", 2, *TINY)
    assert r.exit_code == 0, r.output
    record = json.loads((run / "eval" / "eval.json").read_text())
    assert record["method"] == method and record["prompts"]["prior"] == ["a photo of a ball"]
    assert {"clip_i", "dino", "prior_dino"} <= set(record["metrics"])
