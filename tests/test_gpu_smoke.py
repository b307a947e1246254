"""benchmarks/gpu_smoke.py and the random-weight FLUX.1 it builds: the builder makes the published
shapes in bf16 and a folder finetune loads; the script's measurements (per-process peak RSS, s/step from
metrics.jsonl) are right on real processes and a real run; one family's failure is its row's reason."""

import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import time

import pytest
import torch

from .conftest import REPO
from .helpers import make_image_folder

spec = importlib.util.spec_from_file_location("gpu_smoke", REPO / "benchmarks" / "gpu_smoke.py")
smoke = importlib.util.module_from_spec(spec)
sys.modules["gpu_smoke"] = smoke  # dataclasses look their module up there
spec.loader.exec_module(smoke)

# Parameters of FLUX.1 [dev]'s components as published (the hub's safetensors): the 11.9B transformer,
# the T5 v1.1 XXL encoder, CLIP ViT-L/14's text model, the 16-channel VAE.
PUBLISHED = {"transformer": 11_901_408_320, "text_encoder_2": 4_762_310_656, "text_encoder": 123_060_480,
             "vae": 83_819_683}


def test_flux_full_random_has_the_published_parameter_counts_in_bf16():
    from finetune.tiny_models.flux import random_component

    with torch.device("meta"):  # shapes only: 17B parameters, no memory
        for name, count in PUBLISHED.items():
            params = list(random_component(name).parameters())
            assert sum(p.numel() for p in params) == count, name
            assert {p.dtype for p in params} == {torch.bfloat16}, name


def _small_flux_configs(tmp_path):
    """The shipped FLUX.1 [dev] configs with every width and depth cut down (vocabularies kept)."""
    from finetune.tiny_models.flux import FLUX_DEV_CONFIGS

    configs = shutil.copytree(FLUX_DEV_CONFIGS, tmp_path / "configs")
    cuts = {"transformer": dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                axes_dims_rope=[4, 6, 6], joint_attention_dim=32, pooled_projection_dim=32),
            "text_encoder_2": dict(d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=1),
            "text_encoder": dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                                 projection_dim=32),
            "vae": dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1)}
    for name, cut in cuts.items():
        path = configs / name / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **cut}))
    return configs


def test_flux_builder_writes_sharded_bf16_safetensors_that_finetune_generates_with(tmp_path):
    import numpy as np
    from safetensors import safe_open

    from finetune.generate import load_pipeline
    from finetune.tiny_models.flux import build_flux_full_random

    configs = _small_flux_configs(tmp_path)
    folder = build_flux_full_random(tmp_path / "flux", configs=configs, max_shard_size="1MB")
    assert (folder / "text_encoder_2" / "model.safetensors.index.json").is_file()  # 32128 x 32 bf16 > 1MB: sharded
    dtypes = set()
    for f in folder.glob("*/*.safetensors"):
        with safe_open(str(f), "pt") as st:
            dtypes |= {st.get_slice(k).get_dtype() for k in st.keys()}
    assert dtypes == {"BF16"}
    published_index = json.loads((configs / "model_index.json").read_text())
    assert json.loads((folder / "model_index.json").read_text()) == published_index

    pipe, family, _ = load_pipeline(str(folder), device="cpu", dtype="fp32")
    assert family.name == "flux"
    assert pipe.text_encoder_2.config.vocab_size == 32128 and pipe.text_encoder.config.vocab_size == 49408
    image = pipe("a photo of sks robot", num_inference_steps=1, width=64, height=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_each_child_reports_its_own_peak_rss_and_the_deadline_ends_it(tmp_path):
    # As the script runs: a parent without torch (a child's peak starts at its parent's RSS, which it
    # holds until exec), measuring a big child and then a small one.
    code = f"""
import importlib.util, json, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("gpu_smoke", {str(REPO / "benchmarks" / "gpu_smoke.py")!r})
m = importlib.util.module_from_spec(spec); sys.modules["gpu_smoke"] = m; spec.loader.exec_module(m)
m.resolved("flux-lora", [])
deadline, tmp = time.monotonic() + 120, Path({str(tmp_path)!r})
big = m.run_child([sys.executable, "-c", "b = b'x' * (300 * 2**20)"], tmp / "big.log", deadline)
small = m.run_child([sys.executable, "-c", "pass"], tmp / "small.log", deadline)
print(json.dumps({{"big": big.peak_rss, "small": small.peak_rss, "torch": "torch" in sys.modules}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    assert not peaks["torch"]
    assert peaks["big"] > 300 * 2**20
    assert peaks["small"] < 100 * 2**20  # its own, not the largest child's so far (as RUSAGE_CHILDREN says)

    deadline = time.monotonic() + 120
    failed = smoke.run_child([sys.executable, "-c", "print('error: the disk is full'); print('bye'); exit(1)"],
                             tmp_path / "failed.log", deadline)
    with pytest.raises(smoke.Failure, match=r"finetune train failed \(exit 1\): error: the disk is full"):
        smoke.check(failed, "finetune train")

    start = time.monotonic()
    slow = smoke.run_child([sys.executable, "-c", "import time; time.sleep(120)"], tmp_path / "slow.log",
                           time.monotonic() + 1)
    assert time.monotonic() - start < 30
    with pytest.raises(smoke.Failure, match="--timeout"):
        smoke.check(slow, "finetune train")


def test_seconds_per_step_and_memory_row_are_read_from_a_real_runs_metrics(tmp_path):
    from finetune.recipe import validate
    from finetune.train import train

    data = make_image_folder(tmp_path / "data", n=2, sizes=((64, 64),))
    recipe = {"model": {"base": "builtin:tiny-sd15"}, "data": {"path": str(data), "resolution": 64},
              "method": {"type": "lora", "rank": 4}, "training": {"max_steps": 7, "log_every_n_steps": 1},
              "output": {"dir": str(tmp_path / "out"), "run_name": "r", "save_dtype": "fp32"}}
    run = train(validate(recipe, "test"), log=lambda *_: None, progress=False).run_dir
    metrics = run / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    seconds, memory = smoke.parse_metrics(metrics)
    # The trainer's own rate of each step (batch 1: images/s = 1 / its duration), after the first three.
    expected = statistics.median(1 / r["images_per_second"] for r in rows if r.get("step", 0) > smoke.SKIP_STEPS)
    assert expected > 0
    assert seconds == pytest.approx(expected, rel=0.05, abs=0.002)
    assert memory == next((r["memory"] for r in rows if "memory" in r), None)  # None: a train writing no row

    row = {"device": "cuda", "predicted_gpu_bytes": 3 * 2**30, "predicted_ram_bytes": 5 * 2**30,
           "peak_gpu_bytes": 3.3 * 2**30, "peak_ram_bytes": 4 * 2**30}
    with open(metrics, "a") as f:
        f.write(json.dumps({"memory": row}) + '\n{"step": 8, "los')  # and a line cut by a kill
    assert smoke.parse_metrics(metrics) == (seconds, row)
    assert smoke.memory_cells(row) == ["3.30", "3.00", "1.10", "4.00 / 5.00"]


def test_a_family_that_fails_is_a_row_with_its_reason_and_the_next_family_still_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(smoke.FAMILIES, "sd15", smoke.Family("sd15-lora", "x", "x:y", "float16", "no-such-model"))
    monkeypatch.setitem(smoke.FAMILIES, "flux", smoke.Family("no-such-recipe", "x", "x:y", "bfloat16", "tiny-flux"))
    out = tmp_path / "table.md"
    smoke.main(["--tiny", "--families", "sd15,flux", "--out", str(out), "--work", str(tmp_path / "work")])
    rows = {line.split(" | ")[0].strip("| "): line for line in out.read_text().splitlines() if line.startswith("| ")}
    assert "model.base: unknown built-in model 'no-such-model'" in rows["sd15"]
    assert "recipe no-such-recipe:" in rows["flux"]
    assert "Tiny CPU dry run" in out.read_text()
