"""The training queue: each job is a `finetune train` process, the same command a user would type.

A job's state is a JSON file in the state folder and its output a log beside it, so a UI restart
loses nothing: the processes run in their own session and outlive the UI, and a new `Jobs` reads
them back (a process that is not its child is followed by pid, and judged by its run folder once
gone). Queued jobs are started by `poll()`, which `jobs()` calls and which a daemon thread calls
every second while this object has jobs queued or running. One UI per state folder: two would each
start the same queued job.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import FinetuneError, RecipeError
from ..recipe import load_recipe, recipe_dirs
from ..recipe.loader import REPO_RECIPES
from ..train.checkpoint import completed
from .roots import Roots

ACTIVE = ("queued", "running", "stopping")
# How `finetune train` ends when stopped: 143 (SIGTERM) or 130 (SIGINT) after saving a checkpoint,
# or killed by the signal itself while the model was still loading (no handler yet).
STOP_CODES = {143, 130, -signal.SIGTERM, -signal.SIGINT}
# The toolkit's own sample images (the bundled recipes train on them): readable whatever the roots.
BUNDLED_DATA = REPO_RECIPES.parent / "datasets"
POLL_S = 1.0


@dataclass
class Job:
    name: str
    run_dir: Path
    argv: list[str]
    status: str  # queued | running | stopping | finished | stopped | failed
    pid: int | None
    log: Path
    started: float | None
    returncode: int | None
    created: float = field(default_factory=time.time)  # the queue's order

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "run_dir": str(self.run_dir), "log": str(self.log)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Job:
        d = json.loads(text)
        return cls(**{**d, "run_dir": Path(d["run_dir"]), "log": Path(d["log"])})


class Jobs:
    def __init__(self, roots: Roots, state_dir: Path, python: str = sys.executable, max_running: int = 1):
        self.roots, self.python, self.max_running = roots, python, max_running
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._children: dict[str, subprocess.Popen] = {}  # by job name: the processes this object started
        self._lock = threading.RLock()
        self._watcher: threading.Thread | None = None

    # -- the queue ---------------------------------------------------------------------------

    def start(self, recipe: str, overrides: list[str]) -> Job:
        """Queue `finetune train RECIPE`; the recipe is validated first and its run folder settled,
        so a bad recipe or an output.dir outside the roots never starts a process."""
        file = self._recipe_file(recipe)
        r, file = load_recipe(str(file), list(overrides))
        out = self.roots.confine(r.output.dir, must_exist=False)  # relative: to the first root
        with self._lock:
            name = r.output.run_name or self._free_name(out, f"{file.stem}-{time.strftime('%Y%m%d-%H%M%S')}")
            self._refuse_if_taken(out / name, name)
            # Absolute paths, so the process's recipe.yaml is resumable from anywhere.
            forced = [f"output.run_name={json.dumps(name)}", f"output.dir={json.dumps(str(out))}"]
            forced += self._data_path(r, file)
            load_recipe(str(file), [*overrides, *forced])  # what the process will get: valid too
            argv = [self.python, "-m", "finetune", "train", str(file),
                    *(a for o in [*overrides, *forced] for a in ("--set", o)), "--no-progress"]
            job = Job(name=name, run_dir=out / name, argv=argv, status="queued", pid=None,
                      log=self.state_dir / f"{name}.log", started=None, returncode=None)
            self._save(job)
            self.poll()
            return self._get(name)

    def resume(self, run_dir: Path) -> Job:
        """Queue `finetune train <run>/recipe.yaml --resume <run>`: the command line's own resume."""
        run_dir = self.roots.confine(run_dir)
        recipe = run_dir / "recipe.yaml"
        load_recipe(str(recipe))
        # Cheap checks here; the process verifies the checkpoint's files (hashing them) itself.
        if (run_dir / "README.md").is_file():
            raise FinetuneError(f"--resume: {run_dir.name} already finished; its final files are in that folder")
        if not completed(run_dir / "checkpoints"):
            raise FinetuneError(f"--resume: {run_dir.name} has no complete checkpoint to resume from")
        with self._lock:
            self._refuse_if_active(run_dir.name)
            argv = [self.python, "-m", "finetune", "train", str(recipe), "--resume", str(run_dir), "--no-progress"]
            job = Job(name=run_dir.name, run_dir=run_dir, argv=argv, status="queued", pid=None,
                      log=self.state_dir / f"{run_dir.name}.log", started=None, returncode=None)
            self._save(job)
            self.poll()
            return self._get(job.name)

    def stop(self, run_dir: Path) -> None:
        """SIGTERM to the job's process (it saves a checkpoint and exits 143); a queued job is removed."""
        with self._lock:
            job = self._refresh(self._by_run(run_dir))
            if job.status == "queued":
                self._path(job.name).unlink(missing_ok=True)
            elif job.status == "running":
                child = self._children.get(job.name)
                if child is not None:
                    child.send_signal(signal.SIGTERM)
                elif _alive(job.pid, job.started):
                    os.kill(job.pid, signal.SIGTERM)
                job.status = "stopping"
                self._save(job)

    def jobs(self) -> list[Job]:
        """Every job, newest first, with statuses as they are now."""
        return self.poll()

    def poll(self) -> list[Job]:
        """Refresh every job's status and start queued jobs (oldest first) while fewer than
        `max_running` run. Newest first."""
        with self._lock:
            jobs = sorted((self._refresh(j) for j in self._read_all()), key=lambda j: j.created)
            running = sum(j.status in ("running", "stopping") for j in jobs)
            for job in jobs:
                if job.status == "queued" and running < self.max_running:
                    self._launch(job)
                    running += 1
            if any(j.status in ACTIVE for j in jobs):
                self._watch()
            return jobs[::-1]

    def log_tail(self, run_dir: Path, lines: int = 40) -> str:
        """The last lines of the job's output (stdout and stderr), "" before it starts."""
        job = self._by_run(run_dir)
        try:
            with open(job.log, "rb") as f:
                f.seek(max(f.seek(0, os.SEEK_END) - 256 * 1024, 0))  # a log can be long; its end is enough
                text = f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- processes ---------------------------------------------------------------------------

    def _launch(self, job: Job) -> None:
        resumed = "--resume" in job.argv
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log shows each line as it is printed
        try:
            with open(job.log, "ab" if resumed else "wb") as log:
                # Its own session: closing the UI (or Ctrl-C in its terminal) does not stop the training.
                child = subprocess.Popen(job.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        except OSError as e:
            job.status, job.returncode = "failed", None
            with contextlib.suppress(OSError), open(job.log, "a", encoding="utf-8") as log:
                log.write(f"error: cannot start {job.argv[0]}: {e.strerror or e}\n")
            self._save(job)
            return
        self._children[job.name] = child
        job.status, job.pid, job.started, job.returncode = "running", child.pid, time.time(), None
        self._save(job)

    def _refresh(self, job: Job) -> Job:
        """The job's status now: a process that ended gets its final status."""
        if job.status not in ("running", "stopping"):
            return job
        child = self._children.get(job.name)
        if child is not None and child.pid == job.pid:
            rc = child.poll()
            if rc is None:
                return job
            del self._children[job.name]
            job.returncode = rc
            job.status = "finished" if rc == 0 else "stopped" if rc in STOP_CODES else "failed"
        elif _alive(job.pid, job.started):
            return job
        else:  # not our child (the UI restarted): its exit code is gone, its folder tells
            job.status = _status_from_folder(job.run_dir)
        self._save(job)
        return job

    def _watch(self) -> None:
        """A daemon thread polling while jobs are active, so the queue moves without a page open."""
        if self._watcher is not None and self._watcher.is_alive():
            return

        def loop() -> None:
            while True:
                time.sleep(POLL_S)
                try:
                    if not any(j.status in ACTIVE for j in self.poll()):
                        return
                except Exception:  # noqa: BLE001 - a bad moment on disk must not end the queue for good
                    continue

        self._watcher = threading.Thread(target=loop, name="finetune-ui-jobs", daemon=True)
        self._watcher.start()

    # -- recipes and names -------------------------------------------------------------------

    def _recipe_file(self, recipe: str) -> Path:
        """A bundled recipe's file by name, else the path confined to the roots."""
        if isinstance(recipe, str) and recipe and not any(c in recipe for c in "/\\") \
                and not recipe.endswith((".yaml", ".yml")):
            for d in recipe_dirs():
                if (d / f"{recipe}.yaml").is_file():
                    return (d / f"{recipe}.yaml").resolve()
            bundled = ", ".join(sorted(f.stem for d in recipe_dirs() for f in d.glob("*.yaml")))
            raise RecipeError([f"{recipe}: not a bundled recipe (bundled: {bundled}); give a recipe file's path"])
        return self.roots.confine(recipe)

    def _data_path(self, r, file: Path) -> list[str]:
        """data.path made absolute (a resumed run reads it from its own folder), and confined to the
        roots unless it is the toolkit's sample data; a hub dataset name is left as it is."""
        from ..data.sources import resolve_data_path

        data = resolve_data_path(r.data.path, file.parent)
        if not data.exists():
            return []
        real = data.resolve()
        if not real.is_relative_to(BUNDLED_DATA.resolve()):
            real = self.roots.confine(real)
        return [f"data.path={json.dumps(str(real))}"]

    def _free_name(self, out: Path, stem: str) -> str:
        """stem, or stem-2, -3... when a folder or a job has it (two runs started in one second)."""
        n, name = 1, stem
        while (out / name).exists() or self._path(name).exists():
            n += 1
            name = f"{stem}-{n}"
        return name

    def _refuse_if_taken(self, run_dir: Path, name: str) -> None:
        self._refuse_if_active(name)
        if run_dir.is_dir() and any(p.name != ".lock" for p in run_dir.iterdir()):
            raise FinetuneError(f"output.run_name: {run_dir} already exists and is not empty; choose another run "
                                f"name (e.g. output.run_name={name}-2) or remove that folder")

    def _refuse_if_active(self, name: str) -> None:
        try:
            job = self._refresh(self._get(name))
        except FileNotFoundError:
            return
        if job.status in ACTIVE:
            raise FinetuneError(f"output.run_name: a job named {name} is {job.status}; wait for it to end, "
                                "or choose another run name")

    # -- state files -------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        return self.state_dir / f"{name}.json"

    def _get(self, name: str) -> Job:
        return Job.from_json(self._path(name).read_text(encoding="utf-8"))

    def _save(self, job: Job) -> None:
        tmp = self._path(job.name).with_suffix(".json.tmp")
        tmp.write_text(job.to_json(), encoding="utf-8")
        os.replace(tmp, self._path(job.name))  # a reader never sees half a file

    def _read_all(self) -> list[Job]:
        jobs = []
        for p in self.state_dir.glob("*.json"):
            try:
                jobs.append(Job.from_json(p.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError, KeyError):
                continue  # removed meanwhile (a stopped queued job), or not ours
        return jobs

    def _by_run(self, run_dir: Path) -> Job:
        want = {Path(run_dir), Path(run_dir).resolve()}
        for job in self._read_all():
            if job.run_dir in want:
                return job
        raise FinetuneError(f"{Path(run_dir).name}: no job of the UI has this run folder")


def _alive(pid: int | None, started: float | None) -> bool:
    """Whether `pid` is still the process we started (not a later one given the same pid)."""
    import psutil  # accelerate's dependency

    if pid is None:
        return False
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(p.create_time() - started) < 5
    except psutil.Error:
        return False


def _status_from_folder(run_dir: Path) -> str:
    """How a process we cannot ask ended: the model card is the last thing a finished run writes,
    a checkpoint without it is a stopped run."""
    if (run_dir / "README.md").is_file():
        return "finished"
    return "stopped" if completed(run_dir / "checkpoints") else "failed"
