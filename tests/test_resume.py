"""Runs that survive: killed with SIGKILL (also in the middle of a checkpoint save) or stopped with
SIGTERM, a run resumes from its last checkpoint and ends with exactly the weights of a run that was
never interrupted; checkpoints are verified, pruned only after a new one is complete, and not
started when the disk cannot hold them."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune.errors import FinetuneError
from finetune.recipe import validate
from finetune.train import checkpoint as ckpt
from finetune.train import train

from .helpers import make_image_folder, tiny_recipe, step_rows

STEPS, EVERY = 12, 3
# One thread: CPU reductions split over threads add in a varying order, and two runs that were
# never interrupted already differ in the last bits. With one thread the comparison is bitwise.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _recipe(tiny_sd15, tmp_path):
    """Everything whose state a resume must restore: 8-bit AdamW moments, a warm-up cosine schedule,
    random crops and flips (latents encoded with RNG each step), caption dropout, accumulation."""
    data = make_image_folder(tmp_path / "data", n=5)
    r = tiny_recipe(tiny_sd15, data, tmp_path / "out", training__max_steps=STEPS)
    r["optimizer"] = {"type": "adamw8bit", "min_8bit_size": 16}
    r["training"].update(gradient_accumulation_steps=2, lr_scheduler="cosine", lr_warmup_steps=2, batch_size=1)
    r["data"].update(crop="random", random_flip=True, caption_dropout=0.2)
    r["method"]["dropout"] = 0.1
    r["output"].update(save_every_n_steps=EVERY, formats=["diffusers"])
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def _cli(recipe, *args, wrapper: str = ""):
    """`finetune train` in a child process (optionally after `wrapper` code runs in it)."""
    code = wrapper + "\nfrom finetune.cli import run\nimport sys\nsys.argv = ['finetune'] + sys.argv[1:]\nrun()"
    return subprocess.Popen([sys.executable, "-c", code, "train", str(recipe), "--no-progress", *args],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path, proc, timeout=240):
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path} appeared:\n{proc.stdout.read()}"
        assert time.time() < end
        time.sleep(0.01)


def _weights(run_dir):
    return load_file(run_dir / "pytorch_lora_weights.safetensors")


def _losses(run_dir):
    return [r["loss"] for r in step_rows(run_dir)]


@pytest.fixture(scope="module")
def reference(tiny_sd15, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    recipe = _recipe(tiny_sd15, tmp)
    p = _cli(recipe, "output.run_name=ref")
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    return recipe, tmp / "out" / "ref"


def _assert_same_as_reference(run_dir, ref_dir):
    a, b = _weights(ref_dir), _weights(run_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run ended with other weights"
    assert _losses(run_dir) == _losses(ref_dir)


def test_sigkill_during_a_checkpoint_save_leaves_the_previous_one_and_resume_matches(reference):
    """A run killed mid-training resumes to exactly the reference weights: killed here at the worst
    moment, in the middle of a checkpoint save (a kill anywhere else loses less)."""
    recipe, ref_dir = reference
    run_dir = ref_dir.parent / "torn"
    # A real SIGKILL of the process: the step-6 files are written, its manifest is not, and nothing
    # has been renamed yet.
    wrapper = textwrap.dedent("""
        import os, signal
        from finetune.train import checkpoint
        real = checkpoint.write_manifest
        def write_manifest(folder, step):
            if step == 6:
                os.kill(os.getpid(), signal.SIGKILL)
            real(folder, step)
        checkpoint.write_manifest = write_manifest
    """)
    p = _cli(recipe, "output.run_name=torn", wrapper=wrapper)
    p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL
    checkpoints = run_dir / "checkpoints"
    assert [c.name for c in ckpt.completed(checkpoints)] == ["step-000003"]
    assert list(checkpoints.glob(".tmp-*")), "the save was not interrupted"
    assert ckpt.verify(checkpoints / "step-000003") is None
    assert not (run_dir / "pytorch_lora_weights.safetensors").exists()
    r = _cli(recipe, "output.run_name=torn", "--resume")  # no path: the run's own latest checkpoint
    out, _ = r.communicate(timeout=300)
    assert r.returncode == 0, out
    assert "resuming from" in out and "step-000003" in out
    assert not list(checkpoints.glob(".tmp-*"))
    _assert_same_as_reference(run_dir, ref_dir)


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(reference):
    recipe, ref_dir = reference
    run_dir = ref_dir.parent / "stopped"
    p = _cli(recipe, "output.run_name=stopped", "output.save_every_n_steps=null")
    _wait_for(run_dir / "metrics.jsonl", p)
    while not (run_dir / "metrics.jsonl").read_text().strip():
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 143, out
    assert "SIGTERM: stopped at step" in out and "to continue: finetune train" in out and "--resume" in out
    (saved,) = ckpt.completed(run_dir / "checkpoints")
    assert ckpt.verify(saved) is None and not (run_dir / "pytorch_lora_weights.safetensors").exists()
    cmd = out.split("to continue: ", 1)[1].splitlines()[0].split()
    r = _cli(recipe, *cmd[cmd.index("train") + 2:])
    out, _ = r.communicate(timeout=300)
    assert r.returncode == 0, out
    _assert_same_as_reference(run_dir, ref_dir)


def test_damaged_checkpoints_are_refused_or_skipped(reference, tmp_path):
    import shutil

    recipe, ref_dir = reference
    run = tmp_path / "run"
    shutil.copytree(ref_dir, run)
    last = ckpt.completed(run / "checkpoints")[-1]
    assert ckpt.verify(last) is None
    f = last / "pytorch_lora_weights.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    assert "pytorch_lora_weights.safetensors has" in ckpt.verify(last)
    logs = []
    assert ckpt.latest_valid(run, logs.append) == ckpt.completed(run / "checkpoints")[-2]
    assert f"skipping checkpoint {last}" in logs[0]
    r = validate(yaml.safe_load(recipe.read_text()), recipe)
    with pytest.raises(FinetuneError, match="cannot be resumed from: pytorch_lora_weights.safetensors has"):
        train(r, recipe, log=logs.append, progress=False, resume=str(last))


def test_resume_refuses_a_changed_recipe_or_a_run_without_checkpoints(reference, tiny_sd15, tmp_path):
    import shutil

    recipe, ref_dir = reference
    unfinished = tmp_path / "unfinished"
    shutil.copytree(ref_dir, unfinished, ignore=shutil.ignore_patterns("README.md"))
    raw = yaml.safe_load(recipe.read_text())
    raw["training"]["learning_rate"] = 0.5
    with pytest.raises(FinetuneError, match=r"differs from the one unfinished was started with at training\.learning_rate"):
        train(validate(raw, recipe), recipe, log=lambda *_: None, progress=False, resume=str(unfinished))
    r = tiny_recipe(tiny_sd15, make_image_folder(tmp_path / "d", n=2), tmp_path / "o", training__max_steps=1)
    done = train(validate(r, "t"), log=lambda *_: None, progress=False)
    with pytest.raises(FinetuneError, match="no checkpoint to resume from in"):
        train(validate(r, "t"), log=lambda *_: None, progress=False, resume="latest")
    assert done.run_dir.is_dir()
    raw["training"]["learning_rate"] = 1e-3
    with pytest.raises(FinetuneError, match="ref already finished"):
        train(validate(raw, recipe), recipe, log=lambda *_: None, progress=False, resume=str(ref_dir))


def test_no_checkpoint_is_started_when_the_disk_cannot_hold_it(tiny_sd15, tmp_path, monkeypatch):
    import collections
    import shutil

    r = tiny_recipe(tiny_sd15, make_image_folder(tmp_path / "d", n=2), tmp_path / "o", training__max_steps=6,
                    output__save_every_n_steps=2)
    real = shutil.disk_usage
    Usage = collections.namedtuple("Usage", "total used free")
    calls = []

    def usage(path):
        if "checkpoints" not in str(path):
            return real(path)
        calls.append(path)
        # Room for the first checkpoint only.
        return Usage(1 << 40, 0, 1 << 40) if len(calls) == 1 else Usage(1 << 40, 0, 1 << 20)

    monkeypatch.setattr(ckpt.shutil, "disk_usage", usage)
    with pytest.raises(FinetuneError, match=r"not enough disk space for a checkpoint .* 0\.00 GiB is free.*previous checkpoint is intact"):
        train(validate(r, "t"), log=lambda *_: None, progress=False)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", real)
    (kept,) = ckpt.completed(tmp_path / "o" / "run" / "checkpoints")
    assert kept.name == "step-000002" and ckpt.verify(kept) is None


def test_nan_loss_stops_or_skips_per_recipe(tiny_sd15, tmp_path, monkeypatch):
    """A batch whose loss is NaN (injected into the real model's output at the third forward pass)."""
    from finetune.families.sd1 import SD1Family

    real = SD1Family.predict
    calls = []

    def predict(self, c, noisy, timesteps, cond):
        calls.append(1)
        out = real(self, c, noisy, timesteps, cond)
        return out * float("nan") if len(calls) == 3 else out

    monkeypatch.setattr(SD1Family, "predict", predict)
    data = make_image_folder(tmp_path / "d", n=2)
    r = tiny_recipe(tiny_sd15, data, tmp_path / "o", training__max_steps=5, training__batch_size=1)
    with pytest.raises(FinetuneError, match=r"loss became nan at step 3 on img\d\.png; training\.learning_rate .* too high"):
        train(validate(r, "t"), log=lambda *_: None, progress=False)
    calls.clear()
    r["training"]["on_nan"] = "skip"
    r["output"]["run_name"] = "skip"
    logs = []
    result = train(validate(r, "t"), log=logs.append, progress=False)
    assert result.steps == 5 and any("loss became nan at step 3" in x and "batch skipped" in x for x in logs)
    assert all(torch.isfinite(v).all() for v in _weights(result.run_dir).values())
    rows = step_rows(result.run_dir)
    assert rows[-1]["skipped_batches"] == 1
