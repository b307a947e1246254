"""`finetune train RECIPE --processes N`: the same command in N processes on this machine, started
by accelerate's launcher (as `accelerate launch -m finetune train RECIPE` would), one per GPU; on a
machine without GPUs, N CPU processes over gloo."""

from __future__ import annotations

import logging
import signal
import socket

from ..errors import FinetuneError


def check_processes(processes: int) -> None:
    """One line, before anything loads, when this machine cannot run `processes` processes."""
    import torch

    if torch.cuda.is_available() and processes > torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise FinetuneError(f"--processes: {processes} processes need {processes} GPUs, this machine has {n}; "
                            f"use --processes {n} or fewer (or set CUDA_VISIBLE_DEVICES)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, argv: list[str]) -> int:
    """Run `finetune <argv>` in `processes` processes; their exit status (130/143 after a stop signal)."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    check_processes(processes)
    # The workers print their own errors; torch's agent would add a warning or two per process.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    args = launch_command_parser().parse_args([
        "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "finetune", *argv])
    try:
        launch_command(args)
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        return _exit_status(e.failures, processes)
    return 0


def _exit_status(failures: dict, processes: int) -> int:
    """1 after an error a process printed itself, 130/143 after a stop signal; a process that died
    some other way (killed, crashed) is named in one line. When one process fails the launcher
    stops the others with SIGTERM: those are not what went wrong."""
    codes = {rank: f.exitcode for rank, f in failures.items()}
    if 1 in codes.values():
        return 1
    stopped = [code for code in codes.values() if code in (130, 143)]
    deaths = {rank: code for rank, code in codes.items() if code not in (130, 143, -signal.SIGTERM)}
    if not deaths:
        return stopped[0] if stopped else 128 + signal.SIGTERM
    rank = min(deaths, key=lambda r: failures[r].timestamp)
    code = deaths[rank]
    how = f"killed by {_signal_name(-code)}" if code < 0 else f"exit code {code}"
    raise FinetuneError(f"training process {rank} of {processes} died ({how}); the others were stopped. "
                        "Checkpoints already written can be resumed (--resume)")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
