"""The daemon's control socket (`tcmu-py status` asks it): one thread, nothing ever blocks it.

Rules this module obeys:

- The daemon's main loop never touches a client: `ControlServer` runs its own thread with one
  selector over the listening socket and every open connection, all non-blocking. A client that
  connects and stays silent, or never reads its answer, costs one slot and nothing else.
- Every connection is closed at most `CONTROL_TIMEOUT` seconds after it was accepted, answered
  or not (a silent one gets ``{"error": "... timed out ..."}`` if it can still take it).
- A request is one line of ASCII text, at most `MAX_REQUEST` bytes, ended by a newline or by the
  client shutting down its side: a verb, then the verb's arguments separated by spaces
  (``status``; ``log-level debug``). Anything else (other bytes, a longer line, an unknown verb)
  is answered ``{"error": "<why>"}``; the answer is always one JSON object, then the daemon
  closes the connection.
- At most `MAX_CLIENTS` connections are open at once; while that many are, no new one is
  accepted (they wait in the listen backlog until a slot frees, at the latest when the oldest
  connection's deadline passes).
- Before a connection is closed, whatever the client sent beyond its request is read and
  dropped: closing a Unix socket with unread data would reset it, and the client would lose
  its answer.
- An exception while answering one connection (a request handler that raises) becomes that
  connection's error answer and a log line; the thread goes on serving the others.

The socket file is created mode 0600 in the daemon's run directory (itself 0700, see
`tcmu_py.daemon.serve`).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tcmu_py.errors import TcmuError
from tcmu_py.threadname import name_os_thread

log = logging.getLogger("tcmu_py.daemon")

#: The daemon's lock and control socket live here unless ``--run-dir`` says otherwise.
RUN_DIR = Path("/run/tcmu-py")
#: Seconds a connection may stay open from accept to the last byte of its answer.
CONTROL_TIMEOUT = 2.0
#: Longest request line, newline included.
MAX_REQUEST = 256
#: Connections served at once.
MAX_CLIENTS = 64


@dataclass
class _Client:
    sock: socket.socket
    deadline: float
    request: bytearray = field(default_factory=bytearray)
    answer: memoryview | None = None


def _error(text: str) -> bytes:
    return json.dumps({"error": text}).encode()


#: The levels `tcmu-py log-level` accepts.
LOG_LEVELS = ("debug", "info", "warning", "error")


def set_log_level(level: str) -> dict[str, str]:
    """The ``log-level LEVEL`` request: set the daemon's root logger to LEVEL (one of
    `LOG_LEVELS`) at once, with no restart (loggers' cached levels are reset by `setLevel`).
    Returns the previous and the new level. Raises ValueError for another word."""
    if level not in LOG_LEVELS:
        raise ValueError(f"log level {level!r}: expected one of {', '.join(LOG_LEVELS)}")
    root = logging.getLogger()
    before = logging.getLevelName(root.getEffectiveLevel()).lower()
    root.setLevel(getattr(logging, level.upper()))
    log.warning("log level: %s (was %s), set over the control socket", level, before)
    return {"previous": before, "level": level}


class ControlServer:
    """Answers requests on a Unix stream socket at `path`; `requests` maps each verb to a
    function taking the request's arguments (strings) and returning a JSON-serialisable answer
    (called on the server's thread). A request whose arguments do not fit the function's
    parameters is answered with an error naming them; a ValueError the function raises becomes
    the answer's error text.

    `start()` binds (replacing a stale socket file) and starts the thread; `close()` stops it,
    closes every connection and removes the socket file. Idempotent.
    """

    def __init__(self, path: Path, requests: Mapping[str, Callable[..., Any]]) -> None:
        self.path = Path(path)
        self.requests = dict(requests)
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._closing = False

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, 0o600)
            sock.listen(MAX_CLIENTS)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        self._thread = threading.Thread(target=self._run, name="tcmu-control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # ------------------------------------------------------------------------------------------
    # The thread

    def _run(self) -> None:
        name_os_thread()
        assert self._listener is not None
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ)
        clients: dict[socket.socket, _Client] = {}
        listening = False
        try:
            while not self._closing:
                if listening != (len(clients) < MAX_CLIENTS):
                    listening = not listening
                    if listening:
                        sel.register(self._listener, selectors.EVENT_READ)
                    else:
                        sel.unregister(self._listener)
                now = time.monotonic()
                timeout = min((c.deadline for c in clients.values()), default=now + 60) - now
                for key, mask in sel.select(max(timeout, 0.0)):
                    if key.fileobj == self._wake_r:
                        continue
                    if key.fileobj is self._listener:
                        self._accept(sel, clients)
                        continue
                    client = clients.get(key.fileobj)  # type: ignore[call-overload]
                    if client is None:
                        continue
                    try:
                        done = self._write(client) if mask & selectors.EVENT_WRITE else (
                            self._read(sel, client))
                    except OSError:  # the client went away: nothing to answer
                        done = True
                    if done:
                        self._drop(sel, clients, client)
                now = time.monotonic()
                for client in [c for c in clients.values() if c.deadline <= now]:
                    if client.answer is None:
                        with contextlib.suppress(OSError):
                            client.sock.send(_error(f"timed out after {CONTROL_TIMEOUT} s "
                                                    "without a complete request"))
                    self._drop(sel, clients, client)
        except Exception:  # pragma: no cover - a bug here must not go unnoticed
            log.exception("control socket: thread failed; `tcmu-py status` will not answer")
        finally:
            for client in list(clients.values()):
                self._drop(sel, clients, client)
            sel.close()

    def _accept(self, sel: selectors.BaseSelector, clients: dict[socket.socket, _Client]) -> None:
        assert self._listener is not None
        while len(clients) < MAX_CLIENTS:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: leave it in the backlog
                log.warning("control socket: accept: %s", exc)
                return
            sock.setblocking(False)
            client = _Client(sock, time.monotonic() + CONTROL_TIMEOUT)
            clients[sock] = client
            sel.register(sock, selectors.EVENT_READ)

    def _drop(self, sel: selectors.BaseSelector, clients: dict[socket.socket, _Client],
              client: _Client) -> None:
        clients.pop(client.sock, None)
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(client.sock)
        with contextlib.suppress(OSError):  # bounded: at most 64 KiB more are read
            for _ in range(16):
                if not client.sock.recv(4096):
                    break
        client.sock.close()

    def _read(self, sel: selectors.BaseSelector, client: _Client) -> bool:
        """Take what arrived; once the request is complete, queue the answer. True: close."""
        data = client.sock.recv(MAX_REQUEST)
        client.request += data
        line, newline, _ = client.request.partition(b"\n")
        if not newline and data and len(client.request) < MAX_REQUEST:
            return False  # more to come
        if not newline and len(client.request) >= MAX_REQUEST or len(line) >= MAX_REQUEST:
            answer = _error(f"request longer than {MAX_REQUEST - 1} bytes")
        else:
            answer = self._answer(bytes(line))
        client.answer = memoryview(answer)
        sel.modify(client.sock, selectors.EVENT_WRITE)
        return self._write(client)

    def _write(self, client: _Client) -> bool:
        assert client.answer is not None
        sent = client.sock.send(client.answer)
        client.answer = client.answer[sent:]
        return not client.answer

    def _answer(self, line: bytes) -> bytes:
        try:
            request = line.decode("ascii").strip()
        except UnicodeDecodeError:
            return _error(f"request {line[:64]!r} is not ASCII text; expected one of "
                          f"{sorted(self.requests)}")
        verb, *args = request.split() or [""]
        fn = self.requests.get(verb)
        if fn is None:
            return _error(f"unknown request {request[:64]!r}; expected one of "
                          f"{sorted(self.requests)}")
        try:
            inspect.signature(fn).bind(*args)
        except TypeError:
            params = " ".join(p.upper() for p in inspect.signature(fn).parameters)
            return _error(f"request {request[:64]!r}: expected {f'{verb} {params}'.strip()!r}")
        try:
            # A value JSON has no form for (a handler's status holding a Path, say) is given
            # as its text: one such value must not turn the whole answer into an error.
            return json.dumps(fn(*args), default=str).encode()
        except ValueError as exc:
            return _error(f"{verb}: {exc}")
        except Exception as exc:  # noqa: BLE001 - one request failing must not stop the others
            log.exception("control socket: %s failed", request)
            return _error(f"{request} failed: {type(exc).__name__}: {exc}")


def query_status(run_dir: Path = RUN_DIR, timeout: float = 5.0) -> dict[str, Any]:
    """Ask the daemon serving `run_dir` for its status (the client side of this socket, importing
    nothing of the data path). Raises TcmuError when none answers."""
    answer = request(run_dir, "status", timeout)
    if "error" in answer:
        raise TcmuError(f"the daemon could not answer the status request: {answer['error']}")
    return answer


def request(run_dir: Path, line: str, timeout: float = 5.0) -> dict[str, Any]:
    """Send one request line to the daemon serving `run_dir` and return its answer (a JSON
    object; ``{"error": ...}`` when the daemon refused the request). Raises TcmuError when no
    daemon answers."""
    path = run_dir / "control.sock"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(line.encode("ascii") + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except OSError as exc:
        raise TcmuError(f"no tcmu-py daemon answers on {path}: {exc.strerror or exc}") from exc
    result: dict[str, Any] = json.loads(b"".join(chunks))
    return result
