"""The UI's training queue (finetune/ui/jobs.py) and run reader (finetune/ui/runs.py), on real tiny
trainings: `finetune train` processes of the bundled quickstart recipe, a few steps at 64 px."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.errors import FinetuneError, RecipeError
from finetune.ui.jobs import Jobs
from finetune.ui.roots import PathRefused, Roots
from finetune.ui.runs import find_runs, run_info

REPO = Path(__file__).resolve().parents[1]
# Cheap: 1 sample image of 2 denoising steps, a checkpoint every 5 steps.
TINY = ["validation.num_inference_steps=2", 'validation.prompts=["a photo of sks robot"]',
        "output.save_every_n_steps=5", "data.resolution=64"]


def wait_for(condition, timeout: float = 120, what: str = "a condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def status(jobs: Jobs, run_dir: Path) -> str:
    return next(j.status for j in jobs.jobs() if j.run_dir == run_dir)


def loss_rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return sum('"loss"' in line for line in path.read_text().splitlines()) if path.is_file() else 0


@pytest.fixture
def root(tmp_path):
    (tmp_path / "root").mkdir()
    return tmp_path / "root"


def test_queue_stop_resume_and_restart(root):
    """Start a job; a second one waits for it (max_running=1); stopping the first leaves a checkpoint,
    the second then runs to its end; the first resumes to all its steps; a new Jobs (the UI restarted)
    sees both."""
    roots = Roots([root])
    state = root / "outputs" / ".finetune-ui"
    jobs = Jobs(roots, state, max_running=1)
    a = jobs.start("quickstart", [*TINY, "training.max_steps=24", "output.run_name=a"])
    b = jobs.start("quickstart", [*TINY, "training.max_steps=6", "output.run_name=b"])
    assert a.status == "running" and a.pid and a.run_dir == root.resolve() / "outputs" / "a"
    assert b.status == "queued" and b.pid is None

    wait_for(lambda: loss_rows(a.run_dir) >= 3, what="a's first metrics rows")
    assert status(jobs, b.run_dir) == "queued"  # still: only one job runs at a time
    jobs.stop(a.run_dir)
    assert status(jobs, a.run_dir) in ("stopping", "stopped")
    wait_for(lambda: status(jobs, a.run_dir) == "stopped", what="a to stop")
    done_a = next(j for j in jobs.jobs() if j.name == "a")
    assert done_a.returncode == 143, jobs.log_tail(a.run_dir)
    info = run_info(a.run_dir)
    assert info.checkpoints and not info.finished and 3 <= info.step < 24
    assert info.eta_s is not None and info.eta_s > 0  # a stopped run has steps left
    assert "to continue:" in jobs.log_tail(a.run_dir)

    # b's end is noticed on its own (the watcher thread), with no one calling jobs().
    wait_for(lambda: json.loads((state / "b.json").read_text())["status"] == "finished", what="b to finish")
    info = run_info(b.run_dir)
    assert info.finished and info.step == info.max_steps == 6
    assert [s for s, _ in info.losses] == list(range(1, 7)) and info.eta_s is None
    assert len(info.samples) == 1 and info.samples[0].parent.name == "step-000006"
    assert {f.name for f in info.files} == {"pytorch_lora_weights.safetensors", "b.safetensors"}
    assert info.card == b.run_dir / "README.md" and info.method == "lora" and info.base == "builtin:tiny-sd15"

    again = jobs.resume(a.run_dir)
    assert again.argv[3:] == ["train", str(a.run_dir / "recipe.yaml"), "--resume", str(a.run_dir), "--no-progress"]
    wait_for(lambda: status(jobs, a.run_dir) not in ("queued", "running"), what="a's resume")
    info = run_info(a.run_dir)
    assert status(jobs, a.run_dir) == "finished", jobs.log_tail(a.run_dir)
    assert info.finished and info.step == 24 and [s for s, _ in info.losses] == list(range(1, 25))
    assert "stopped at step" in jobs.log_tail(a.run_dir, lines=200)  # the log kept the first part

    restarted = Jobs(roots, state)
    seen = {j.name: j for j in restarted.jobs()}
    assert seen["a"].status == "finished" and seen["b"].status == "finished"
    assert [j.name for j in restarted.jobs()] == ["a", "b"]  # newest first: a was resumed last
    with pytest.raises(FinetuneError, match="already finished"):
        restarted.resume(a.run_dir)


def test_refused_before_any_process(root, tmp_path):
    jobs = Jobs(Roots([root]), root / "state")
    with pytest.raises(RecipeError, match="training.max_stepz") as e:
        jobs.start("quickstart", ["training.max_stepz=3"])
    assert len(e.value.problems) == 1
    with pytest.raises(PathRefused, match="outside"):
        jobs.start("quickstart", [f"output.dir={tmp_path / 'elsewhere'}"])
    outside = tmp_path / "mine.yaml"
    outside.write_text((REPO / "recipes" / "quickstart.yaml").read_text())
    with pytest.raises(PathRefused):
        jobs.start(str(outside), [])  # a recipe file outside the roots is not read
    with pytest.raises(RecipeError, match="not a bundled recipe"):
        jobs.start("no-such-recipe", [])
    assert jobs.jobs() == [] and not (tmp_path / "elsewhere").exists()


def test_stopping_a_queued_job_removes_it(root):
    """A job that cannot start yet (max_running=0 keeps everything queued) is just dropped."""
    jobs = Jobs(Roots([root]), root / "state", max_running=0)
    job = jobs.start("quickstart", [*TINY, "output.run_name=q"])
    assert job.status == "queued"
    with pytest.raises(FinetuneError, match="is queued"):
        jobs.start("quickstart", [*TINY, "output.run_name=q"])
    jobs.stop(job.run_dir)
    assert jobs.jobs() == [] and not job.run_dir.exists()


def test_a_job_started_by_an_earlier_ui_is_followed_by_pid(root):
    """After a UI restart the process is no child of ours: it is watched by pid, stopped by pid, and
    judged by its run folder once gone (a checkpoint, no model card: stopped)."""
    state = root / "state"
    # The UI that started it is a process that has ended: the training is nobody's child here.
    start = (f"from finetune.ui.jobs import Jobs; from finetune.ui.roots import Roots; "
             f"Jobs(Roots([{str(root)!r}]), {str(state)!r}).start('quickstart', {[*TINY, 'training.max_steps=240', 'output.run_name=c']!r})")
    subprocess.run([sys.executable, "-c", start], check=True, timeout=120)
    later = Jobs(Roots([root]), state)
    job = later.jobs()[0]
    assert job.status == "running" and job.pid and "c" not in later._children
    wait_for(lambda: loss_rows(job.run_dir) >= 1, what="training to start")  # SIGTERM now saves a checkpoint
    later.stop(job.run_dir)
    wait_for(lambda: later.jobs()[0].status == "stopped", what="the status from the folder")
    assert later.jobs()[0].returncode is None  # not ours to know: the folder told


def test_find_runs_reads_cli_runs_and_skips_broken_ones(root, tiny_run):
    """A run made without the UI (finetune.train.train, as `finetune train` calls it) is a run like
    any other; a folder whose recipe.yaml is broken is left out, not an error."""
    shutil.copytree(tiny_run("sd1", "lora"), root / "cli" / "by-cli")
    broken = root / "cli" / "broken"
    broken.mkdir()
    (broken / "recipe.yaml").write_text("model: [unclosed\n")
    unknown = root / "cli" / "unknown"
    unknown.mkdir()
    (unknown / "recipe.yaml").write_text("data: {path: x}\nmodle: {}\n")
    (root / "not-a-run").mkdir()

    runs = find_runs(Roots([root]))
    assert [r.name for r in runs] == ["by-cli"]
    cli = runs[0]
    assert cli.finished and cli.step == cli.max_steps == 3 and len(cli.losses) == 3 and cli.images_per_s > 0
    assert cli.card is not None and cli.method == "lora" and cli.base == "builtin:tiny-sd15"
    assert {f.name for f in cli.files} == {"pytorch_lora_weights.safetensors", "sd1-lora.safetensors"}


def test_eta_from_the_mean_step_time(tmp_path):
    """ETA from elapsed_s of this process's rows: a resume restarts elapsed_s, and only the rows
    after it count."""
    run = tmp_path / "r"
    run.mkdir()
    recipe = {"data": {"path": "x"}, "training": {"max_steps": 100, "batch_size": 2}}
    (run / "recipe.yaml").write_text(json.dumps(recipe))
    rows = [{"step": s, "loss": 1.0, "lr": 1e-3, "images_per_second": 4.0, "elapsed_s": 10.0 * s} for s in (1, 2, 3)]
    rows += [{"step": s, "loss": 1.0, "lr": 1e-3, "images_per_second": 4.0, "elapsed_s": 2.0 * (s - 3)} for s in (4, 5, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"memory": 1}\n{"step": 7, "lo')
    info = run_info(run)
    assert info.step == 6 and info.eta_s == pytest.approx(2.0 * 94)
    (run / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")  # one row: 2 images at 4 images/s a step
    assert run_info(run).eta_s == pytest.approx(0.5 * 99)
