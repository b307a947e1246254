"""A training run measures its own memory against `finetune plan`'s prediction for it: the prediction
is printed when training starts, the measured peaks when it ends, both written as one `memory` line of
metrics.jsonl and shown in the model card; and on the CPU the measured peak RSS of the tiny quickstart
is what the plan predicts for its host RAM."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
KEYS = ["device", "predicted_gpu_bytes", "predicted_ram_bytes", "peak_gpu_bytes", "peak_ram_bytes"]
# The plan's host RAM for a CPU run is a constant for the process (finetune/plan/calibration.py
# HOST_PROCESS_GIB: Python, torch, diffusers, transformers, peft, accelerate, bitsandbytes imported,
# 0.39 GiB of the 0.57 GiB this run peaks at alone) plus what the tiny model's run holds (~20 MiB). The
# constant was measured with torch 2.13 (CPU) and the pinned libraries on Linux; another release of
# one of them, another libc or allocator moves the imports by some tens of MiB. In CI, beside another
# test process, the same run has peaked 0.12 GiB higher than alone, three times out of many (0.66 and
# twice 0.69 GiB against 0.54 and 0.57; not reproduced outside CI, cause not found). So the measured
# peak may exceed the plan by up to 40% (~210 MiB), and the plan may exceed the peak by up to 30%: both
# still fail when the plan misses a real part of the run (the 1 GiB of the CUDA runtime counted on a
# CPU is +190%).
OVER, UNDER = 0.40, 0.30


@pytest.fixture(scope="module")
def measured_run(tmp_path_factory):
    """`finetune train quickstart` for three steps in its own process, so its peak RSS is the run's own."""
    from finetune.tiny_models import resolve_builtin

    resolve_builtin("tiny-sd15")  # built here, not in the measured process
    out = tmp_path_factory.mktemp("measured")
    cmd = [sys.executable, "-m", "finetune", "train", "quickstart", "training.max_steps=3",
           "validation.every_n_steps=null", "validation.num_inference_steps=2", "output.save_every_n_steps=null",
           f"output.dir={out}", "output.run_name=run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return out / "run", done.stdout


def _memory_lines(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "memory" in rows[-1], "the memory line is the run's last"
    return [r for r in rows if "memory" in r]


def test_the_memory_line_has_the_keys_the_benchmarks_read(measured_run):
    run_dir, _ = measured_run
    lines = _memory_lines(run_dir)
    assert len(lines) == 1 and list(lines[0]) == ["memory"]
    m = lines[0]["memory"]
    assert list(m) == KEYS
    assert m["device"] == "cpu" and m["peak_gpu_bytes"] is None  # no GPU: no GPU peak
    assert all(isinstance(m[k], int) and m[k] > 0 for k in KEYS[1:3] + KEYS[4:])


def test_the_prediction_printed_at_start_is_the_one_written(measured_run):
    run_dir, stdout = measured_run
    m = _memory_lines(run_dir)[0]["memory"]
    start = re.search(r"^plan: predicted peak ([0-9.]+) GiB GPU, ([0-9.]+) GiB host RAM$", stdout, re.M)
    assert start, stdout
    assert (float(start[1]), float(start[2])) == (round(m["predicted_gpu_bytes"] / GIB, 2),
                                                  round(m["predicted_ram_bytes"] / GIB, 2))
    end = re.search(r"^memory: no GPU peak on cpu \(plan said ([0-9.]+) GiB, for a GPU\), host RAM ([0-9.]+) GiB "
                    r"\(plan said ([0-9.]+)\)$", stdout, re.M)
    assert end, stdout
    assert float(end[1]) == float(start[1]) and float(end[3]) == float(start[2])
    assert float(end[2]) == round(m["peak_ram_bytes"] / GIB, 2)
    assert stdout.index(start[0]) < stdout.index("training 3 steps") < stdout.index(end[0])


def test_measured_peak_rss_is_the_plans_host_ram(measured_run):
    run_dir, _ = measured_run
    m = _memory_lines(run_dir)[0]["memory"]
    error = (m["peak_ram_bytes"] - m["predicted_ram_bytes"]) / m["predicted_ram_bytes"]
    assert -UNDER <= error <= OVER, (m["peak_ram_bytes"] / GIB, m["predicted_ram_bytes"] / GIB)


def test_the_model_card_shows_the_peak_beside_the_prediction(measured_run):
    run_dir, _ = measured_run
    m = _memory_lines(run_dir)[0]["memory"]
    card = (run_dir / "README.md").read_text(encoding="utf-8")
    row = next(line for line in card.splitlines() if line.startswith("| memory |"))
    peak, plan = m["peak_ram_bytes"] / GIB, m["predicted_ram_bytes"] / GIB
    assert f"host RAM {peak:.2f} GiB peak (plan said {plan:.2f} GiB)" in row
    assert f"GPU not measured on cpu (plan said {m['predicted_gpu_bytes'] / GIB:.2f} GiB for a GPU)" in row


def test_a_model_the_plan_cannot_describe_costs_one_line_not_the_run(tmp_path):
    """A diffusers folder of a pipeline the planner has no tracer for: the prediction is skipped with one
    line, and the run would go on."""
    from finetune.recipe import validate
    from finetune.train.peak import predict

    folder = tmp_path / "model"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                         "transformer": ["diffusers", "SomeNewTransformer"]}))
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "SomeNewTransformer"}))
    recipe = validate({"model": {"base": str(folder), "family": "flux"}, "data": {"path": str(tmp_path)}}, "test")
    said: list[str] = []
    run = SimpleNamespace(recipe=recipe, examples=[], log=said.append)
    assert predict(run, "cpu") == (None, None)
    assert len(said) == 1 and said[0].startswith("plan: no prediction for this run (") and "\n" not in said[0]
