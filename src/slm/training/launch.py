"""Starting and stopping runs: `--nproc N` under torchrun, and what a stop signal does to a run.

A stop (Ctrl-C or SIGTERM, from a terminal, `timeout` or a job scheduler) saves a checkpoint after the
current step and ends the run; a second one ends it at once. With `--nproc N` the `slm` process is only a
launcher: it forwards the stop to torchrun, which forwards it to its workers, and it never exits leaving
them behind.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
from types import FrameType
from typing import Any

from slm.errors import SlmError
from slm.training.distributed import die_with_parent

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """Ctrl-C or SIGTERM asks the loop to save a checkpoint and stop after the current step; a second one
    stops at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        print(f"\nslm: {signal.Signals(signum).name} received: saving a checkpoint after this step "
              "(press Ctrl-C again to quit at once)", file=sys.stderr)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for signum in STOP_SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def without_nproc(argv: list[str]) -> list[str]:
    return [arg for i, arg in enumerate(argv) if arg != "--nproc" and (i == 0 or argv[i - 1] != "--nproc")
            and not arg.startswith("--nproc=")]


def launch(nproc: int, argv: list[str]) -> int:
    """`slm train|finetune --nproc N ...`: the same command under torchrun on this machine. torchrun runs in
    a session of its own, so a terminal's Ctrl-C reaches it once, through this process: the first stop
    signal is forwarded (torchrun passes it to every worker, which saves and exits), a second one kills
    torchrun, and its workers die with it (distributed.die_with_parent). If this process is killed outright,
    torchrun gets SIGTERM and stops its workers as after a first signal. Returns torchrun's exit status, or
    128 + the signal when a signal stopped the run."""
    if nproc < 1:
        raise SlmError(f"--nproc must be at least 1 (got {nproc})")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "slm", *without_nproc(argv)]
    print("slm: running " + " ".join(shlex.quote(arg) for arg in command), file=sys.stderr)
    torchrun = subprocess.Popen(command, start_new_session=True,
                                preexec_fn=lambda: die_with_parent(signal.SIGTERM))
    received: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        if received:
            print("slm: quitting at once", file=sys.stderr)
            _kill_group(torchrun.pid)
        else:
            print(f"slm: {signal.Signals(signum).name}: the workers save a checkpoint after this step and stop "
                  "(press Ctrl-C again to quit at once)", file=sys.stderr)
            torchrun.send_signal(signum)
        received.append(signum)

    previous = {signum: signal.signal(signum, forward) for signum in STOP_SIGNALS}
    try:
        status = torchrun.wait()
    finally:
        _kill_group(torchrun.pid)  # whatever is left of torchrun's group, on any way out
        torchrun.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 128 + received[0] if received else status


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
