"""Small process helpers shared by the launchers (cli.services) and the training launch (trainer.launch)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Make this process get SIGKILL when its parent dies (Linux); elsewhere a no-op.

    Call it first thing in a child (or in `Popen(preexec_fn=...)`): a work horse, a training launcher and
    its ranks then never outlive whoever started them, so a job is never run twice at once.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
