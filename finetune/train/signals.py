"""Ctrl-C and SIGTERM (a cluster's pre-emption, `kill`) while training: finish the step under way,
save a checkpoint, and exit saying how to resume. A second signal stops at once."""

from __future__ import annotations

import signal
import threading
from typing import Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # asked twice: the user wants out now
        self.signum = signum
        self.log(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                 "(send it again to stop at once, without saving)")

    def __enter__(self) -> "GracefulStop":
        # Signal handlers can only be set from the main thread (a notebook's worker thread cannot).
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
