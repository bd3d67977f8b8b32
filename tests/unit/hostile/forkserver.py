"""Runs `tcmu-py` command lines for tests/unit/test_hostile_input.py, each in a forked child
with bounded address space and time.

Protocol: one JSON request per line on stdin, ``{"argv": [...], "timeout": seconds, "memory":
bytes}``; one JSON answer per line on stdout, ``{"status": exit status or null, "signal": signal
or null, "stdout": text, "stderr": text, "seconds": wall time, "timed_out": bool}``.

The server imports the command line and every registered handler once; each request then costs a
fork (milliseconds) instead of an interpreter start (~0.4 s). The child sets RLIMIT_AS, points
file descriptors 1 and 2 at pipes, runs `tcmu_py.cli.main(argv)` and exits with its status; an
exception escaping it is printed (a traceback: the test fails on the line count) and the child
exits 70. A child still running at its timeout is killed (SIGKILL) and reported timed out.
The server is single-threaded, so forking it is safe.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import signal
import sys
import time
import traceback

from tcmu_py import cli
from tcmu_py.handler import load_handlers

OUTPUT_LIMIT = 1 << 20


def _warm_up() -> None:
    import tcmu_py.daemon.config  # noqa: F401 - imported by every `check`, `down`
    import tcmu_py.daemon.lio  # noqa: F401

    registry = load_handlers()
    for name in registry:
        with contextlib.suppress(Exception):  # an empty config string is usually refused
            registry[name].check_config("")


def _child(argv: list[str], memory: int, out_w: int, err_w: int) -> None:
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        code = cli.main(argv)
    except BaseException:  # noqa: BLE001 - reported as the test's failure
        traceback.print_exc()
        code = 70
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(argv: list[str], timeout: float, memory: int) -> dict[str, object]:
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(out_r)
        os.close(err_r)
        _child(argv, memory, out_w, err_w)
    os.close(out_w)
    os.close(err_w)
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    sizes = {out_r: 0, err_r: 0}
    open_fds = [out_r, err_r]
    timed_out = False
    deadline = start + timeout
    while open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            os.kill(pid, signal.SIGKILL)
            break
        ready, _, _ = select.select(open_fds, [], [], left)
        for fd in ready:
            data = os.read(fd, 65536)
            if not data:
                open_fds.remove(fd)
            elif sizes[fd] < OUTPUT_LIMIT:
                chunks[fd].append(data)
                sizes[fd] += len(data)
    _, wstatus = os.waitpid(pid, 0)
    seconds = time.monotonic() - start
    for fd in (out_r, err_r):
        os.close(fd)
    return {
        "status": os.waitstatus_to_exitcode(wstatus) if os.WIFEXITED(wstatus) else None,
        "signal": os.WTERMSIG(wstatus) if os.WIFSIGNALED(wstatus) else None,
        "stdout": b"".join(chunks[out_r]).decode("utf-8", "replace"),
        "stderr": b"".join(chunks[err_r]).decode("utf-8", "replace"),
        "seconds": seconds,
        "timed_out": timed_out,
    }


def main() -> int:
    _warm_up()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        answer = run(req["argv"], float(req["timeout"]), int(req["memory"]))
        print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
