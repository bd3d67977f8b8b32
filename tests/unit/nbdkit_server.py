"""An ``nbdkit memory`` server on a unix socket, for the NBD tests (nbdkit comes with bootstrap)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

#: Seconds an nbdkit gets to start listening (it takes ~20 ms; a loaded CI runner is slower).
START_DEADLINE = 10.0


class NbdkitServer:
    """``nbdkit --foreground memory SIZE`` serving ``nbd+unix:///?socket=<dir>/<name>.sock``;
    `stop` kills it (the leg's failure), `start` brings it back (empty: a memory export)."""

    def __init__(self, directory: Path, name: str, size: int) -> None:
        self.sock = str(directory / f"{name}.sock")
        self.size = size
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def start(self) -> None:
        nbdkit = shutil.which("nbdkit")
        assert nbdkit, "nbdkit missing: scripts/bootstrap.sh installs it (APT_PACKAGES)"
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.proc = subprocess.Popen(
            [nbdkit, "--foreground", "--exit-with-parent", "-U", self.sock, "memory",
             str(self.size)], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_DEADLINE
        while not os.path.exists(self.sock):  # nbdkit creates the socket once it listens
            assert self.proc.poll() is None, f"nbdkit exited: {self.proc.returncode}"
            assert time.monotonic() < deadline, "nbdkit did not listen within the deadline"
            time.sleep(0.005)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(START_DEADLINE)
        self.proc = None
