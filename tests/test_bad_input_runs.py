"""Runs and data that must not lose or leak anything: two runs given one name, a disk that fills
after the final save, symlinks out of the data folder, file names that would forge log lines,
a resume on data that changed since the checkpoint, and final files others can read."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from finetune.cli import app
from finetune.data import check_dataset, discover_examples
from finetune.errors import FinetuneError
from finetune.recipe import validate
from finetune.recipe.schema import DataConfig
from finetune.train import train
from finetune.train.run_dir import LOCK, claim_run_dir

from .helpers import draw_subject, make_image_folder, tiny_recipe, step_rows

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SECRET = "root:x:0:0:SECRET-LINE"
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def quiet(*_):
    pass


def _recipe_file(tiny_sd15, tmp_path, data, **overrides):
    path = tmp_path / "runs.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny_sd15, data, tmp_path / "out", **overrides)))
    return path


def _cli(*args):
    """`finetune train ...` in a process of its own, as a user starts it."""
    code = "import sys\nfrom finetune.cli import run\nsys.argv = ['finetune'] + sys.argv[1:]\nrun()"
    return subprocess.Popen([sys.executable, "-c", code, "train", *map(str, args), "--no-progress"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------- run folders


def test_two_runs_with_one_name_one_wins_the_other_is_refused_before_loading(tiny_sd15, tmp_path):
    recipe = _recipe_file(tiny_sd15, tmp_path, make_image_folder(tmp_path / "data", n=2),
                          output__run_name="same")
    procs = [_cli(recipe), _cli(recipe)]
    results = [(p.returncode, out, err) for p in procs for out, err in [p.communicate(timeout=300)]]
    assert sorted(code for code, _, _ in results) == [0, 1], results
    (_, won, _), = [r for r in results if r[0] == 0]
    (_, out, err), = [r for r in results if r[0] == 1]
    run = tmp_path / "out" / "same"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: output.run_name: ") and str(run) in lines[0], err
    assert "loading " not in out and "Traceback" not in err  # refused before any model loaded
    assert "done: 4 steps" in won
    # The winner's run is whole: one metrics row a step, its weights, and no lock left behind.
    steps = [r["step"] for r in step_rows(run)]
    assert steps == sorted(set(steps)) and steps[-1] == 4
    assert load_file(run / "pytorch_lora_weights.safetensors") and not (run / LOCK).exists()


def test_default_run_names_are_unique_within_one_second(tiny_sd15, tmp_path, monkeypatch):
    from finetune.train import run_dir

    monkeypatch.setattr(run_dir.time, "strftime", lambda *_: "20260101-120000")  # both start in one second
    recipe = validate(tiny_recipe(tiny_sd15, tmp_path, tmp_path / "out", output__run_name=None), "t")
    claimed = [claim_run_dir(recipe, tmp_path / "quick.yaml", quiet) for _ in range(3)]
    assert [name for _, name, _ in claimed] == ["quick-20260101-120000", "quick-20260101-120000-2",
                                                "quick-20260101-120000-3"]
    for folder, _, lock in claimed:
        assert (folder / "recipe.yaml").is_file() and (folder / LOCK).is_file()
        lock.release()
        assert not (folder / LOCK).exists()


HOLD = """
import sys, time
from pathlib import Path
from finetune.train.run_dir import RunLock
lock = RunLock.take(Path(sys.argv[1]), "test")
lock.record(print)
print("locked", flush=True)
time.sleep(300)
"""


def _hold_lock(folder):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_live_lock_refuses_new_runs_and_resumes_a_dead_ones_is_taken_over(tiny_sd15, tmp_path):
    data = make_image_folder(tmp_path / "data", n=2)
    raw = tiny_recipe(tiny_sd15, data, tmp_path / "out", output__save_every_n_steps=2)
    run = train(validate(raw, "t"), log=quiet, progress=False).run_dir
    (run / "README.md").unlink()  # as if stopped after its checkpoint at step 2

    holder = _hold_lock(run)
    try:
        with pytest.raises(FinetuneError, match=rf"^--resume: {run} is in use by another run \(pid {holder.pid} on "):
            train(validate(raw, "t"), log=quiet, progress=False, resume=str(run))
        busy = tmp_path / "out" / "busy"
        busy.mkdir()
        holder2 = _hold_lock(busy)  # an empty folder, taken by a run just starting
        try:
            with pytest.raises(FinetuneError, match=rf"^output.run_name: {busy} is in use by another run"):
                train(validate({**raw, "output": {**raw["output"], "run_name": "busy"}}, "t"), log=quiet,
                      progress=False)
        finally:
            holder2.kill()
            holder2.wait()
    finally:
        holder.kill()  # dies holding it: the lock file stays, naming a process that is gone
        holder.wait()
    assert (run / LOCK).is_file()
    logs = []
    result = train(validate(raw, "t"), log=logs.append, progress=False, resume=str(run))
    assert result.steps == 4 and not (run / LOCK).exists()
    assert any(f"{run} was locked by a run that did not end cleanly (pid {holder.pid} on " in x for x in logs), logs


def test_disk_full_after_the_final_save_keeps_the_final_files_readable(tiny_sd15, tmp_path, monkeypatch):
    write_bytes = Path.write_bytes

    def disk_full(self, data):  # images are encoded (and signed) in memory, then written: the disk fills there
        if self.suffix == ".png":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return write_bytes(self, data)

    raw = tiny_recipe(tiny_sd15, make_image_folder(tmp_path / "data", n=2), tmp_path / "out", training__max_steps=2)
    raw["validation"]["prompts"] = ["a photo of sks ball"]  # sampled once, after the adapter files are written
    monkeypatch.setattr(Path, "write_bytes", disk_full)
    recipe = tmp_path / "full.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    old = os.umask(0o022)
    try:
        r = invoke("train", recipe, "--no-progress")
    finally:
        os.umask(old)
    run = tmp_path / "out" / "run"
    assert r.exit_code == 1, r.output
    # One line: what could not be written, why, and what the run folder kept; no OSError, no traceback.
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.output and "OSError" not in r.output, r.output
    assert errors[0].startswith(f"error: cannot write {run / 'samples' / 'step-000002'}/.tmp-"), errors
    assert errors[0].endswith(".png: no space left on the device; "
                              f"{run} keeps what it completed: pytorch_lora_weights.safetensors, run.safetensors")
    finals = [run / "pytorch_lora_weights.safetensors", run / "run.safetensors"]
    for f in finals:
        assert load_file(f), f
        assert _mode(f) == 0o644, f  # a ComfyUI service account can read it, like any other output
    assert not (run / LOCK).exists()


@pytest.mark.parametrize("code,why", [(errno.ENOSPC, "no space left on the device"),
                                      (errno.EDQUOT, "the disk quota is exceeded"),
                                      (errno.EROFS, "the file system is read-only")])
def test_a_full_disk_before_anything_is_complete_says_so_and_keeps_the_original(tiny_sd15, tmp_path, monkeypatch,
                                                                                 code, why):
    from finetune.train.run_dir import MetricsLog

    def full(self, **row):  # a write() fails without a file name; wrapped, as libraries often do
        try:
            raise OSError(code, os.strerror(code))
        except OSError as e:
            raise RuntimeError("PytorchStreamWriter failed writing file") from e

    monkeypatch.setattr(MetricsLog, "write", full)
    raw = tiny_recipe(tiny_sd15, make_image_folder(tmp_path / "data", n=2), tmp_path / "out", training__max_steps=2)
    with pytest.raises(FinetuneError) as e:
        train(validate(raw, "t"), log=quiet, progress=False)
    run = tmp_path / "out" / "run"
    assert str(e.value) == f"cannot write to {run}: {why}; nothing was complete yet, so {run} was removed"
    assert isinstance(e.value.__cause__, RuntimeError) and e.value.__cause__.__cause__.errno == code
    assert not run.exists()


def test_a_run_that_fails_with_nothing_worth_keeping_frees_its_name(tiny_sd15, tmp_path, monkeypatch):
    from finetune.families.sd1 import SD1Family

    real = SD1Family.predict
    monkeypatch.setattr(SD1Family, "predict", lambda *a: real(*a) * float("nan"))
    raw = tiny_recipe(tiny_sd15, make_image_folder(tmp_path / "data", n=2), tmp_path / "out", training__max_steps=2)
    with pytest.raises(FinetuneError, match="loss became nan at step 1"):
        train(validate(raw, "t"), log=quiet, progress=False)
    assert not (tmp_path / "out" / "run").exists()


# ---------------------------------------------------------------- data confinement


@pytest.fixture
def linked(tmp_path):
    """A data folder whose symlinks lead out of it (an image, a caption, a sub-folder, a text file
    named .png) and stay inside it (an image), and a text file named .png inside."""
    data = make_image_folder(tmp_path / "data", n=3)
    outside = make_image_folder(tmp_path / "outside", n=2, caption="an outside caption")
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET + "\n")
    (data / "linked.png").symlink_to(outside / "img0.png")
    draw_subject(7).save(data / "capped.png")
    (data / "capped.txt").symlink_to(secret)
    (data / "sub").symlink_to(outside, target_is_directory=True)
    (data / "passwd.png").symlink_to(secret)
    (data / "notes.png").write_text("SECRET-NOTE: a text file in the folder\n")
    (data / "inner.png").symlink_to(data / "img1.png")
    return data


def test_symlinks_out_of_the_data_folder_are_skipped_and_named(linked, tiny_sd15, tmp_path):
    report = check_dataset(DataConfig(path=str(linked), resolution=64))
    assert report.names("outside_folder") == ["capped.png", "linked.png", "passwd.png", "sub/"]
    assert report.names("not_image") == ["notes.png"]
    assert sorted(e.key for e in report.usable) == ["img0.png", "img1.png", "img2.png", "inner.png"]
    said = "\n".join(report.summary())
    assert "skipped: 4 symlinks leading out of the data folder" in said
    assert "  linked.png: a symlink leading out of the data folder; not read (data.follow_symlinks: true" in said
    assert "  capped.png: its caption file capped.txt is a symlink leading out of the data folder" in said
    assert "  notes.png: a text file, not an image" in said
    assert "SECRET" not in said  # nothing from a text file, inside or out, is shown

    r = invoke("dataset", "check", linked, "--resolution", 64)
    assert r.exit_code == 1 and "  sub/: a symlinked folder leading out of the data folder" in r.output
    assert "SECRET" not in r.output

    logs = []
    recipe = validate(tiny_recipe(tiny_sd15, linked, tmp_path / "out", training__max_steps=1), "t")
    assert train(recipe, log=logs.append, progress=False).steps == 1
    assert "  passwd.png: a symlink leading out of the data folder; not read (data.follow_symlinks: true reads it)" \
        in logs and "data: 4 images x 1 repeats" in "\n".join(logs)
    assert "SECRET" not in "\n".join(logs)


def test_follow_symlinks_reads_through_them_but_never_shows_text(linked):
    report = check_dataset(DataConfig(path=str(linked), resolution=64, follow_symlinks=True))
    by_key = {e.key: e for e in report.usable}
    assert sorted(by_key) == ["capped.png", "img0.png", "img1.png", "img2.png", "inner.png", "linked.png",
                              "sub/img0.png", "sub/img1.png"]
    assert by_key["capped.png"].caption == SECRET  # asked for: the linked caption file is read
    assert report.names("not_image") == ["notes.png", "passwd.png"]
    assert "SECRET" not in "\n".join(report.summary())


def test_metadata_rows_through_a_symlinked_folder_are_skipped(tmp_path):
    data = make_image_folder(tmp_path / "data", n=1)
    outside = make_image_folder(tmp_path / "outside", n=1)
    (data / "link").symlink_to(outside, target_is_directory=True)
    rows = [{"file_name": "img0.png", "text": "a"}, {"file_name": "link/img0.png", "text": "b"}]
    (data / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)))
    report = check_dataset(DataConfig(path=str(data), resolution=64))
    assert report.names("outside_folder") == ["link/img0.png"] and [e.key for e in report.usable] == ["img0.png"]
    assert [e.key for e in check_dataset(DataConfig(path=str(data), resolution=64, follow_symlinks=True)).usable] \
        == ["img0.png", "link/img0.png"]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "metadata.jsonl").write_text(json.dumps({"file_name": "img0.png", "text": "c"}))
    linked = make_image_folder(tmp_path / "linked", n=1)
    (linked / "metadata.jsonl").symlink_to(elsewhere / "metadata.jsonl")
    with pytest.raises(FinetuneError, match=r"metadata.jsonl is a symlink leading out of the data folder; not read"):
        check_dataset(DataConfig(path=str(linked), resolution=64))


def test_control_characters_in_file_names_are_escaped_in_every_message(tmp_path):
    data = make_image_folder(tmp_path / "data", n=2)
    draw_subject(5).save(data / "evil\nerror: forged.png", format="PNG")
    (data / "bell\x1b[31m.png").write_text("not a picture")
    logs = []
    examples = discover_examples(DataConfig(path=str(data), resolution=64), log=logs.append)
    assert "evil\nerror: forged.png" in [e.key for e in examples]  # it trains; only its name is escaped
    said = "\n".join(logs)
    assert "  evil\\nerror: forged.png: no evil\\nerror: forged.txt; trains with an empty caption" in logs
    assert "  bell\\x1b[31m.png: a text file, not an image" in logs
    assert "\x1b" not in said and not any(line.startswith("error: forged") for line in said.splitlines())

    r = invoke("dataset", "check", data, "--resolution", 64)
    assert "evil\\nerror: forged.png" in r.output and "\x1b" not in r.output
    assert not any(line.startswith("error: forged") for line in r.output.splitlines())

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a\nb\r.png").write_bytes(b"")
    with pytest.raises(FinetuneError) as e:
        discover_examples(DataConfig(path=str(junk), resolution=64), log=quiet)
    assert "\n" not in str(e.value) and "\r" not in str(e.value) and "(first: a\\nb\\r.png: 0 bytes)" in str(e.value)


def test_image_load_errors_at_training_time_escape_file_names(tmp_path):
    from finetune.data.images import load_image

    with pytest.raises(FinetuneError) as e:
        load_image(tmp_path / "gone\nerror: forged.png")
    assert str(e.value) == f"image {tmp_path}/gone\\nerror: forged.png does not exist"
    cut = tmp_path / "cut\x1b[31m.png"
    draw_subject(1).save(tmp_path / "whole.png")
    cut.write_bytes((tmp_path / "whole.png").read_bytes()[:100])
    with pytest.raises(FinetuneError) as e:
        load_image(cut)
    assert str(e.value).startswith(f"cannot read image {tmp_path}/cut\\x1b[31m.png: ") and "\x1b" not in str(e.value)


def test_dataset_rows_naming_files_outside_the_data_folder_are_skipped(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    from finetune.data.sources import _dataset_confinement

    saved, outside = tmp_path / "saved", make_image_folder(tmp_path / "outside", n=1)
    paths = ["img0.png", str(saved / "img1.png"), str(outside / "img0.png"), "../outside/img0.png", "a\0b.png"]
    datasets.Dataset.from_dict({"image": paths, "text": ["a photo"] * len(paths)}).save_to_disk(str(saved))
    make_image_folder(saved, n=2)
    cfg = DataConfig(path=str(saved), resolution=64, source="datasets")
    report = check_dataset(cfg)
    assert report.names("outside_folder") == ["train[2]", "train[3]", "train[4]"]
    assert sorted(e.key for e in report.usable) == ["train[0]", "train[1]"]
    said = "\n".join(report.summary())
    assert (f"  train[2]: its image path {outside / 'img0.png'} leading out of the data folder; not read "
            "(data.follow_symlinks: true reads it)") in said
    assert "its image path a\\x00b.png leading out" in said and "\0" not in said
    report = check_dataset(cfg.model_copy(update={"follow_symlinks": True}))
    assert sorted(e.key for e in report.usable) == ["train[0]", "train[1]", "train[2]", "train[3]"]

    # A hub dataset has no folder: its rows may name what it downloaded into the caches, nothing else.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "ds-cache")
    inside = _dataset_confinement(tmp_path / "owner" / "name", follow=False)
    assert not inside.leaves(tmp_path / "hub" / "datasets--owner--name" / "x.png")
    assert not inside.leaves(tmp_path / "ds-cache" / "downloads" / "x.png")
    assert inside.leaves(outside / "img0.png")


# ---------------------------------------------------------------- resume on changed data


def test_resume_on_changed_data_is_refused_and_allowed_with_the_flag(tiny_sd15, tmp_path):
    data = make_image_folder(tmp_path / "data", n=4)
    recipe = _recipe_file(tiny_sd15, tmp_path, data, output__save_every_n_steps=2)
    r = invoke("train", recipe, "--no-progress")
    assert r.exit_code == 0, r.output
    run = tmp_path / "out" / "run"
    (run / "README.md").unlink()  # as if stopped after its checkpoint at step 2
    weights = (run / "run.safetensors").read_bytes()

    (data / "img0.txt").write_text("another caption")
    draw_subject(9).save(data / "img1.png")
    (data / "img3.png").unlink()
    draw_subject(10).save(data / "new.png")
    r = invoke("train", recipe, "--resume", run, "--no-progress")
    assert r.exit_code == 1
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.output
    assert errors[0].startswith("error: --resume: the training data changed since step-000002 was saved: "
                                "1 added (new.png), 1 removed (img3.png), 1 image changed (img1.png), "
                                "1 caption changed (img0.png); ")
    assert "--allow-changed-data" in errors[0] and "loading " not in r.output
    assert (run / "run.safetensors").read_bytes() == weights  # nothing touched

    r = invoke("train", recipe, "--resume", run, "--allow-changed-data", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "warning: --allow-changed-data: resuming on changed training data (1 added (new.png)" in r.output
    assert "resuming from" in r.output and (run / "README.md").is_file()

    r = invoke("train", recipe, "--allow-changed-data")
    assert r.exit_code == 1 and "error: --allow-changed-data: only a resumed run" in r.output


def test_a_checkpoint_records_the_data_it_was_trained_on(tiny_sd15, tmp_path):
    from finetune.train import checkpoint as ckpt

    data = make_image_folder(tmp_path / "data", n=2)
    raw = tiny_recipe(tiny_sd15, data, tmp_path / "out", output__save_every_n_steps=2, training__max_steps=3)
    run = train(validate(raw, "t"), log=quiet, progress=False).run_dir
    (saved,) = ckpt.completed(run / "checkpoints")
    assert ckpt.verify(saved) is None  # the record is covered by the checkpoint's manifest
    record = ckpt.read_trainer_state(saved).data
    assert sorted(record) == ["img0.png", "img1.png"]
    size, digest, caption = record["img0.png"]
    assert size == (data / "img0.png").stat().st_size and len(digest) == len(caption) == 64
    # Names, sizes and hashes only: no caption text is copied into the checkpoint.
    assert "a photo of sks ball" not in (saved / ckpt.TRAINER).read_text()


# ---------------------------------------------------------------- methods' outputs and messages


def test_dreambooth_model_folder_is_readable_like_every_other_output(tiny_sd15, tmp_path):
    raw = tiny_recipe(tiny_sd15, make_image_folder(tmp_path / "data", n=2, sizes=((64, 64),)), tmp_path / "out",
                      training__max_steps=1)
    raw["method"] = {"type": "dreambooth", "single_file": False}
    old = os.umask(0o022)
    try:
        run = train(validate(raw, "t"), log=quiet, progress=False).run_dir
    finally:
        os.umask(old)
    model = run / "model"
    files = [p for p in model.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files), files  # what safetensors writes 0600
    assert _mode(model) == 0o755 and all(_mode(p) == 0o755 for p in model.rglob("*") if p.is_dir())
    assert {p.relative_to(model).as_posix(): _mode(p) for p in files} == {p.relative_to(model).as_posix(): 0o644
                                                                           for p in files}
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp")]


def test_a_caption_without_the_placeholder_is_quoted_short_and_escaped(tiny_sd15, tmp_path):
    caption = "\x1b[31ma red ball\nerror: forged " + "on a table " * 50
    raw = tiny_recipe(tiny_sd15, make_image_folder(tmp_path / "data", n=2, caption=caption), tmp_path / "out",
                      training__max_steps=1)
    raw["method"] = {"type": "textual_inversion", "placeholder_token": "<sks-ball>", "initializer_token": "x"}
    with pytest.raises(FinetuneError) as e:
        train(validate(raw, "t"), log=quiet, progress=False)
    message = str(e.value)
    assert message.startswith("method.placeholder_token: the training caption '\\x1b[31ma red ball\\nerror: forged "
                              "on a table "), message
    assert "... (" in message and " characters)' does not contain '<sks-ball>'" in message
    assert "\x1b" not in message and "\n" not in message and message.count("on a table") < 10
