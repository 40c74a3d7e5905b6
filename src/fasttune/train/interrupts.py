"""SIGTERM and SIGINT during training: finish the step, write a checkpoint, stop; a second one stops at once.

A preempted job (SIGTERM) or a Ctrl-C (SIGINT) sets a flag that the training loop reads at each step
boundary; it then writes a checkpoint and raises `TrainingStopped`, and the CLI exits with 128 + the
signal number, as a process killed by it would. The same signal again restores the default handler and
takes effect at once: SIGINT raises KeyboardInterrupt, SIGTERM ends the process.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(Exception):
    """Training stopped on a signal after writing the checkpoint of its last step."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}; checkpoint {checkpoint} written "
                         "(continue with --resume)")


class StopRequests:
    """`with StopRequests(log) as stop:`, then `stop.signum` is the first signal received, or None.

    Outside the main thread (where Python cannot install handlers) it installs nothing and never stops.
    """

    def __init__(self, log: Callable[[str], None] = print):
        self.log = log
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __call__(self) -> int | None:
        return self.signum

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second: now
            signal.signal(signum, signal.SIG_DFL)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        self.log(f"{signal.Signals(signum).name}: stopping after this step with a checkpoint "
                 "(send it again to stop at once)")

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
