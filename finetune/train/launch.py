"""`finetune train RECIPE --processes N`: the same command in N processes on this machine, started
by accelerate's launcher (as `accelerate launch -m finetune train RECIPE` would), one per GPU; on a
machine without GPUs, N CPU processes over gloo."""

from __future__ import annotations

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
    args = launch_command_parser().parse_args([
        "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "finetune", *argv])
    try:
        launch_command(args)
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        return next((c for c in codes if c in (130, 143)), max(codes, default=1) or 1)
    return 0
