"""Several processes on the CPU (gloo), started the way users start them: `finetune train --processes 2`.

Two processes with batch 1 must train what one process with batch 2 trains (same global batches,
each image's noise from its own seed, gradients averaged); only the main process writes; a run
killed with SIGKILL resumes to the same weights as one never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune.errors import FinetuneError
from finetune.recipe import validate
from finetune.train import train

from .helpers import make_image_folder, tiny_recipe, step_rows

pytestmark = pytest.mark.distributed

# SGD: an update is the averaged gradient itself, so the comparison sees gradient averaging directly
# (Adam's normalisation would magnify float rounding of near-zero gradients).
OPTIMIZER = {"type": "sgd", "momentum": 0.9, "weight_decay": 0.0}


def _env() -> dict:
    # One thread each: two processes on two cores, no OpenMP spinning against each other.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _recipe(tmp_path: Path, data: Path, **overrides) -> dict:
    r = tiny_recipe("builtin:tiny-sd15", data, tmp_path / "out", training__batch_size=1,
                    training__learning_rate=0.05, **overrides)
    r["optimizer"] = OPTIMIZER
    # With class images: made once by the main process, then sliced across processes like the rest.
    r["prior_preservation"] = {"enabled": True, "class_prompt": "a photo of a ball", "num_class_images": 3,
                               "class_data_dir": str(data.parent / "class"), "num_inference_steps": 2,
                               "sample_batch_size": 2}
    return r


def _launch(recipe: dict, folder: Path, *extra: str, processes: int = 2) -> subprocess.Popen:
    path = folder / f"recipe-{len(list(folder.glob('recipe-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    cmd = [sys.executable, "-m", "finetune", "train", str(path), "--no-progress", "--processes", str(processes), *extra]
    return subprocess.Popen(cmd, cwd=folder, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in step_rows(run)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    # Two buckets of two images: every global batch of two comes from one bucket.
    return make_image_folder(tmp_path_factory.mktemp("dist") / "data", n=4, sizes=((64, 64), (96, 64)))


STEPS = 10
BASE = dict(training__max_steps=STEPS, output__save_every_n_steps=2)


def _two_machines(recipe: dict, folder: Path) -> list[subprocess.Popen]:
    """The README's two-machine commands, both machines on this host over 127.0.0.1."""
    from finetune.train.launch import free_port

    path = folder / "recipe-machines.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    port = str(free_port())
    return [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2", "--num_processes",
         "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "finetune", "train", str(path), "--no-progress"],
        cwd=folder, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for rank in (0, 1)]


@pytest.fixture(scope="module")
def whole(tmp_path_factory, data) -> tuple[Path, str]:
    """A run of STEPS steps on two "machines" of one process each, uninterrupted: its folder and what
    the main machine printed."""
    tmp = tmp_path_factory.mktemp("whole")
    main, other = _two_machines(_recipe(tmp, data, output__run_name="whole", **BASE), tmp)
    out = _finish(main)
    assert "done:" not in _finish(other)  # the second machine writes nothing and says nothing of it
    return tmp / "out" / "whole", out


def test_two_processes_train_what_one_process_trains_with_twice_the_batch(tmp_path, data, whole):
    two, out = whole
    one_recipe = _recipe(tmp_path, data, output__run_name="one", **BASE)
    one_recipe["training"]["batch_size"] = 2
    one = train(validate(one_recipe, "test"), log=lambda *_: None, progress=False).run_dir

    assert "global batch 2 = 1 per process x 2 process(es)" in out
    assert out.count("generating 3 class images") == 1
    assert sorted(p.name[:11] for p in (data.parent / "class").iterdir()) == [
        "class-00000", "class-00001", "class-00002"]  # each once, no temporary file left behind
    assert all("prior_loss" in row for row in step_rows(two))
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    a, b = load_file(two / "pytorch_lora_weights.safetensors"), load_file(one / "pytorch_lora_weights.safetensors")
    early = load_file(two / "checkpoints" / "step-000002" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(a[k], early[k]) for k in a)  # training went on after the checkpoint
    # One set of files, written once: one metrics row a step, one line per message.
    assert sorted(p.name for p in two.iterdir()) == sorted(
        ["README.md", "checkpoints", "metrics.jsonl", "plots", "pytorch_lora_weights.safetensors", "recipe.yaml",
         "whole.safetensors"])
    assert [row["step"] for row in step_rows(two)] == \
        list(range(1, STEPS + 1))
    assert out.count(f"done: {STEPS} steps") == 1
    state = two / "checkpoints" / "step-000002" / "state"
    assert sorted(p.name for p in state.glob("random_states_*")) == ["random_states_0.pkl", "random_states_1.pkl"]
    assert json.loads((two / "checkpoints" / "step-000002" / "trainer.json").read_text())["processes"] == 2


def _descendants(pid: int) -> list[int]:
    """Processes started by `pid`, at any depth (torch's launcher puts its workers in sessions of their own)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < end, "the run never got there"
        time.sleep(0.05)


def _wait_gone(pids: list[int], timeout: float = 60) -> None:
    def running(pid: int) -> bool:
        # A zombie leader whose other threads are still exiting keeps its files (the run lock) open.
        try:
            return len(list(Path(f"/proc/{pid}/task").iterdir())) > 1 or \
                Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    end = time.monotonic() + timeout
    while any(running(pid) for pid in pids):
        assert time.monotonic() < end, "killed processes still running"
        time.sleep(0.05)


def _rows(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def test_sigkill_and_sigterm_then_resume_equal_an_uninterrupted_run(tmp_path, data, whole):
    recipe = _recipe(tmp_path, data, output__run_name="killed", **BASE)
    run = tmp_path / "out" / "killed"
    killed = _launch(recipe, tmp_path)
    _wait_for(lambda: (run / "checkpoints" / "step-000002" / "checkpoint.json").exists(), killed)
    pids = [killed.pid, *_descendants(killed.pid)]
    for pid in pids:  # the launcher and both workers: no chance to save
        os.kill(pid, signal.SIGKILL)
    killed.wait()
    _wait_gone(pids)  # a killed process holds its run lock until the kernel has torn it down
    assert not (run / "README.md").exists()

    # Another number of processes cannot continue this run exactly: refused before any model loads
    # (here in this one process: what `--processes 1` starts).
    said = []
    with pytest.raises(FinetuneError, match=r"saved by a run on 2 process\(es\), this one has 1"):
        train(validate(recipe, "test"), log=said.append, progress=False, resume=str(run))
    assert not any("loading" in line for line in said), said

    # SIGTERM to the launcher: every process stops at the same step, saves, and exits.
    resumed = _launch(recipe, tmp_path, "--resume", str(run))
    _wait_for(lambda: _rows(run) <= 2, resumed)  # the killed run's later rows are dropped at the resume
    _wait_for(lambda: _rows(run) >= 3, resumed)
    workers = _descendants(resumed.pid)
    resumed.send_signal(signal.SIGTERM)
    text, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 143, text
    assert f"--resume {run} --processes 2" in text
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    stopped_at = int(text.split("stopped at step ")[1].split()[0])
    assert 3 <= stopped_at < STEPS and (run / "checkpoints" / f"step-{stopped_at:06d}").is_dir()

    _finish(_launch(recipe, tmp_path, "--resume", str(run)))
    a, b = load_file(run / "pytorch_lora_weights.safetensors"), load_file(whole[0] / "pytorch_lora_weights.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert _losses(run) == pytest.approx(_losses(whole[0]), rel=1e-6)
    assert [r["step"] for r in step_rows(run)] == \
        list(range(1, STEPS + 1))


def test_an_error_on_the_main_process_is_one_line_once(tmp_path, data, whole):
    """The run folder is taken: the main process refuses before any model loads, the other stops
    quietly, and the launcher adds nothing of its own."""
    recipe = _recipe(tmp_path, data, **BASE)
    recipe["output"].update(dir=str(whole[0].parent), run_name="whole")
    proc = _launch(recipe, tmp_path)
    text, _ = proc.communicate(timeout=180)
    assert proc.returncode == 1
    assert [line for line in text.splitlines() if line.strip() and not line.startswith("data: ")] == [
        f"error: output.run_name: {whole[0]} already exists and is not empty; choose another run name "
        "(e.g. output.run_name=whole-2) or remove that folder"]


def test_the_launcher_names_a_process_that_died_not_those_it_stopped_after():
    from types import SimpleNamespace as Failure

    from finetune.train.launch import _exit_status

    term, kill = -signal.SIGTERM, -signal.SIGKILL
    # A process printed its error and exited 1; the launcher then stopped the other with SIGTERM.
    assert _exit_status({0: Failure(exitcode=1, timestamp=2), 1: Failure(exitcode=term, timestamp=3)}, 2) == 1
    # A stop signal: every process saved and exited 143 (or was stopped on the way).
    assert _exit_status({0: Failure(exitcode=143, timestamp=2), 1: Failure(exitcode=term, timestamp=3)}, 2) == 143
    with pytest.raises(FinetuneError, match=r"training process 1 of 2 died \(killed by SIGKILL\)"):
        _exit_status({0: Failure(exitcode=term, timestamp=5), 1: Failure(exitcode=kill, timestamp=3)}, 2)
