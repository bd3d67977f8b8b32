"""`tcmu-py serve`: find TCMU devices, serve each with its handler, follow them as they come and go.

Lifecycle of one device
-----------------------
- Found by the start-up scan of `/sys/class/uio` or by a udev "add" event (pyudev), or by a
  netlink ADDED event; all three paths end in `add()`, which is idempotent. The start-up scan
  comes first (`start_serving`), before netlink, udev, the YAML or LIO are even imported: a
  restarted daemon answers the commands waiting on its rings as soon as it can.
- A netlink event is handled on a thread of its own (`_handle_later`), after the earlier events
  of the same uio node, and answered to the kernel once handled (an ADDED once the open has
  ended): a handler open or close that hangs holds up neither the run loop (other devices'
  events, rescans, a SIGTERM) nor another device. The kernel waits for an answer without a
  limit: an event still waiting for the earlier one after `EARLIER_EVENT_SECONDS` is answered
  anyway (REMOVED 0, carried out later; ADDED and RECONFIG -EBUSY, dropped).
- A udev event is handled on a thread of its own too (`_udev_event`), after the earlier udev
  events of the same uio node: the observer's thread opens and closes nothing.
- The run loop's rescan waits for no open: it does not wait for the opens it begins, and
  leaves a node another thread is opening to that open.
- Only subtypes with a registered handler are served; anything else (tcmu-runner's `file`,
  `qcow`, ...) is left alone, and never answered on netlink.
- Opening (`_open`): `action/block_dev=1`, `action/reset_ring=1` (commands a previous daemon left
  in flight complete with BUSY, so initiators retry), map the ring, open the handler,
  `action/block_dev=0`. This is the same whether the daemon starts fresh or after `kill -9`.
  A device the kernel is still enabling (netlink and udev both announce it from inside the
  configfs write) refuses both actions and has queued nothing: it is opened without them.
  `add` opens outside the daemon's lock (the node marked opening): a handler whose open waits
  for a network costs its caller that wait, not `status` or other devices' adds; a removal,
  reconfiguration or second add of the same node waits for it.
- A device that cannot be opened at all (its uio vanished, no memory, ...) is logged and
  tried again after `ADD_RETRY_SECONDS`, doubling up to the rescan interval.
- A handler that fails to open (bad config string, missing backing file) does not stop the
  daemon: the device is served by `FailedDevice`, which answers INQUIRY and fails everything
  else with NOT READY 04/03 (manual intervention required), and the log says why.
- A handler that raises `DeviceUnavailable` (what it needs cannot be reached for now: a Ceph
  cluster down) is served by `FailedDevice` answering NOT READY 04/01 (becoming ready: the
  initiator retries), and a thread of its own (`_reopen_unavailable`) opens it again after
  `ADD_RETRY_SECONDS`, doubling up to the rescan interval, outside the daemon's lock; once it
  opens, the device is served by it (`_swap_in`: the FailedDevice's runner stops, the ring is
  recovered as at any open). Removal or shutdown ends the retries.
- Removal (udev "remove", netlink REMOVED, or a rescan that finds its uio gone): stop its
  runner, close the handler — on a thread of its own (`_remove_later`): a close that hangs
  holds up no other event. The kernel's REMOVED waits (inside the backstore's rmdir) for our
  answer, sent once the handler has closed or `REMOVE_SECONDS` after it came (the close, or
  the open in progress it waits for, then goes on).
- SIGTERM / SIGINT: every device is blocked (`block_dev=1`), in-flight commands drain, handlers
  close, and the device is unblocked again. The process exits only once every handler has
  closed — also one another thread was closing (the udev observer's "remove" of a backstore
  deleted just before), or one whose close waited for an asynchronous command still in its
  backend — or `SHUTDOWN_SECONDS` have passed since the SIGTERM, for all devices together
  (their runners are all stopped first, so they drain side by side; the ones left are
  logged). Commands that arrive while no daemon runs wait on the ring until the next daemon's
  recovery answers them BUSY (initiators retry), or until the device's `cmd_time_out`.
  Leaving devices blocked instead would make any command the kernel itself issues while
  removing a LUN (sd's SYNCHRONIZE CACHE) wait forever. A netlink event still being handled at
  the deadline is answered before the exit (the kernel waits for that answer without a limit,
  inside a configfs write): REMOVED 0, ADDED and RECONFIG -EINTR (`_answer_abandoned`).

Threads: one loop thread per device (`DeviceRunner.run`) plus its worker pool; the main thread
receives netlink events and handles signals and rescans, and opens and closes no handler itself
(a rescan's opens and removals, and each netlink event, run on threads of their own; the
netlink socket is used under `_netlink_lock`); the control socket has a thread of its own
(`tcmu_py.daemon.control`: no client can hold the main loop); the pyudev observer hands each
event to a thread of its own, `udev-<node>`, which calls `add`/`_remove_later` (the daemon's
state guarded by `self._lock`; handlers are opened and closed outside it).

Run directory (`--run-dir`, /run/tcmu-py): created 0700, refused if it is a symbolic link or
another user's; `daemon.lock` in it is opened without following links, refused unless it is a
regular file of ours with one link, and only then truncated (it holds the pid).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import os
import select
import signal
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tcmu_py.daemon import DEFAULT_DATA_PLANE, DEFAULT_NATIVE_LOOP, DEFAULT_POLL_US
from tcmu_py.daemon.configfs import CONFIGFS_CORE, TcmuConfigfs
from tcmu_py.daemon.control import RUN_DIR, ControlServer, set_log_level
from tcmu_py.device.block import BlockDevice
from tcmu_py.device.command import Command
from tcmu_py.device.copydomain import CopyDomain
from tcmu_py.device.core import ScsiDevice, command
from tcmu_py.device.runner import DeviceRunner
from tcmu_py.errors import DeviceUnavailable, TcmuError
from tcmu_py.handler import (
    DeviceConfig,
    Handler,
    daemon_data_plane,
    load_handlers,
    split_daemon_items,
)
from tcmu_py.scsi.constants import Opcode
from tcmu_py.scsi.sense import NotReady
from tcmu_py.threadname import name_os_thread
from tcmu_py.uio import UioDevice, UioName

if TYPE_CHECKING:
    from tcmu_py.daemon.metrics import MetricsServer
    from tcmu_py.daemon.netlink import DeviceEvent

log = logging.getLogger("tcmu_py.daemon")

UIO_CLASS = Path("/sys/class/uio")
#: How often the main loop rescans /sys/class/uio as a safety net for missed events: often
#: when no udev monitor runs, rarely when one does (the scan competes with I/O for the GIL).
RESCAN_SECONDS = 10.0
#: How long `serve` leaves the kernel's ADDED_DEVICE of a subtype it does not serve to another
#: daemon (tcmu-runner) before it answers -ENODEV itself, when the device waits for a reply
#: (see `Daemon._watch_unserved`).
UNSERVED_REPLY_SECONDS = 30.0
RESCAN_SECONDS_WITH_UDEV = 60.0
#: A device that failed to open (`add`) is tried again after this long, then after twice as
#: long each time, up to the rescan interval: a transient failure costs a second, not a minute.
ADD_RETRY_SECONDS = 1.0
#: How often a rescan waiting for its opens looks whether the daemon is stopping.
ADD_JOIN_SECONDS = 0.2
#: How long `shutdown` waits, all devices together, from its start: for the runners to drain
#: their commands, for the handlers to close — also one removed by another thread just before
#: (the udev observer's "remove" of a backstore deleted a moment before the SIGTERM), or one
#: whose close waits for a command still running in its backend — and for opens still in
#: progress. One deadline for every device (their drains run side by side), within the service
#: unit's TimeoutStopSec (60 s), so systemd never has to SIGKILL a daemon that is stopping.
SHUTDOWN_SECONDS = 45.0
#: How long the kernel's REMOVED_DEVICE (a backstore's rmdir, `targetcli ... delete`) waits for
#: the device's runner to drain and its handler to close before it is answered anyway; the
#: close goes on on its thread (and `shutdown` still waits for it).
REMOVE_SECONDS = 30.0
#: How long a netlink event waits for the earlier event of the same uio node still being
#: handled (an open or a close that hangs, whose own answer the kernel gave up on with its
#: ``reset_netlink``, or never waited for) before the kernel, which waits for this one's
#: answer without a limit inside a configfs write, is answered anyway: REMOVED 0 (the removal
#: follows once the earlier event ended), ADDED and RECONFIG -EBUSY (the write fails, as the
#: kernel's own answer while an event of the device is still executing; not applied later).
EARLIER_EVENT_SECONDS = 30.0


class FailedDevice(ScsiDevice):
    """Stands in for a device whose handler could not open: visible, but NOT READY, with a reason.

    SPC-5 4.4.6 / SBC-4: 04h/03h LOGICAL UNIT NOT READY, MANUAL INTERVENTION REQUIRED; while
    `becoming` (the handler raised `DeviceUnavailable` and is being opened again), 04h/01h
    LOGICAL UNIT IS IN PROCESS OF BECOMING READY, which initiators retry.
    """

    product = "UNAVAILABLE"

    def __init__(self, config: DeviceConfig, reason: str, *, becoming: bool = False) -> None:
        super().__init__(config)
        self.reason = reason
        self.becoming = becoming

    def check_ready(self) -> None:
        raise NotReady(self.reason, asc=0x04, ascq=0x01 if self.becoming else 0x03)

    @command(Opcode.READ_CAPACITY_10)
    @command(Opcode.READ_10)
    @command(Opcode.WRITE_10)
    @command(Opcode.READ_16)
    @command(Opcode.WRITE_16)
    @command(Opcode.SYNCHRONIZE_CACHE_10)
    def not_ready(self, cmd: Command) -> None:
        self.check_ready()


class _StillConfiguring(Exception):
    """A device found while the kernel is still configuring it (`Daemon._open`): tried
    again, without a traceback."""


@dataclass
class Served:
    """One device being served."""

    node: str  # uio0
    name: UioName
    uio: Any
    device: ScsiDevice
    runner: DeviceRunner
    thread: threading.Thread
    failed: str | None = None
    #: Set while the handler raised `DeviceUnavailable` and `_reopen_unavailable` retries
    #: (None again once a permanent failure ends the retries); `remove` sets `stop_retry`.
    retrying: threading.Thread | None = None
    stop_retry: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Pending:
    """A netlink event of a served subtype, handled on a thread of its own (`Daemon._handle_later`);
    the kernel waits for its answer, given once (`Daemon._answer`)."""

    event: DeviceEvent
    uio: UioName
    answered: bool = False
    #: When it came (monotonic): `EARLIER_EVENT_SECONDS` and `REMOVE_SECONDS` count from here.
    since: float = field(default_factory=time.monotonic)


class Daemon:
    """The service. `start()` then `run()` (blocks until a signal or `stop()`)."""

    def __init__(
        self,
        *,
        handlers: Mapping[str, type[Handler]] | None = None,
        configfs_root: Path = CONFIGFS_CORE,
        uio_class: Path = UIO_CLASS,
        dev_dir: Path = Path("/dev"),
        run_dir: Path = RUN_DIR,
        workers: int = 4,
        poll_us: int = DEFAULT_POLL_US,
        use_netlink: bool = True,
        use_udev: bool = True,
        uio_opener: Callable[[str, str], Any] = UioDevice,
        dbus_bus: str | None = None,
        data_plane: bool = DEFAULT_DATA_PLANE,
        native_loop: bool = DEFAULT_NATIVE_LOOP,
    ) -> None:
        self.handlers: Mapping[str, type[Handler]] = (
            dict(handlers) if handlers is not None else load_handlers()
        )
        self.configfs_root = Path(configfs_root)
        self.uio_class = Path(uio_class)
        self.dev_dir = Path(dev_dir)
        self.run_dir = Path(run_dir)
        self.workers = workers
        self.poll_us = poll_us
        #: False: every command of every device in Python (`serve --no-data-plane`).
        self.data_plane = data_plane
        #: False: the data plane runs in each device's Python loop thread (`--no-native-loop`).
        self.native_loop = native_loop
        self.use_netlink = use_netlink
        self.use_udev = use_udev
        self._open_uio = uio_opener
        self.served: dict[str, Served] = {}
        self._lock = threading.RLock()
        #: Devices removed whose handler has not closed yet (by id; `remove`, `_closed`), and
        #: the reopen threads of removed devices: `shutdown` waits for both (and `_opening`)
        #: before it returns, so the process does not exit under a handler's close (a mirror's
        #: clean flag, a pool's last commit) or open.
        self._closing: dict[int, Served] = {}
        self._reopens: list[threading.Thread] = []
        #: Nodes whose handler `add` is opening, outside the lock: a backing store that does
        #: not answer (a Ceph cluster down) costs that caller its timeout, not `status` or
        #: every other device's add. `remove` and `_reconfig` of such a node wait for the open.
        #: By node: its name and when the open began (`status` lists them as opening).
        self._opening: dict[str, tuple[UioName, float]] = {}
        #: Notified whenever `_closing` or `_opening` loses a member.
        self._changed = threading.Condition(self._lock)
        #: Shared copy domains by name (a device's ``copy_domain``, `split_daemon_items`).
        self.copy_domains: dict[str, CopyDomain] = {}
        #: Written to wake `run()`: by `stop()`, and by `add()` when a retry is due sooner.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._stopping = False
        #: When `run()` rescans next (monotonic): the rescan interval, brought forward when a
        #: device failed to open (`_retry_later`, which also counts each device's failures in
        #: a row).
        self._next_scan = 0.0
        self._add_failures: dict[str, int] = {}
        self._lock_fd: int | None = None
        self._netlink: Any = None
        #: Held around every use of the netlink socket: the run loop receives, the threads
        #: handling the events answer (`_reply`).
        self._netlink_lock = threading.Lock()
        #: By uio node, the thread handling the last netlink event of it (`_handle_later`), and
        #: the events the kernel still waits for an answer to, in the order they came.
        self._handling: dict[str, threading.Thread] = {}
        self._unanswered: list[_Pending] = []
        #: By uio node, the thread handling the last udev event of it (`_udev_event`).
        self._udev_handling: dict[str, threading.Thread] = {}
        self._observer: Any = None
        self._control: ControlServer | None = None
        #: The bus of the ``org.kernel.TCMUService1`` service targetcli lists subtypes from
        #: ("SYSTEM" for `tcmu-py serve`, a bus address in tests), None: no D-Bus service.
        self.dbus_bus = dbus_bus
        self._dbus: Any = None
        #: ADDED_DEVICE events of subtypes nobody here serves, by device id: (deadline, event,
        #: name). See `_watch_unserved`.
        self._unserved: dict[int, tuple[float, Any, UioName]] = {}
        #: nl_reply_supported > 0 by (hba, device), as last read (`_wants_reply`).
        self._reply_wanted: dict[tuple[str, str], bool] = {}
        self._metrics: MetricsServer | None = None

    # ------------------------------------------------------------------------------------------
    # Start and stop

    def start(self) -> None:
        """`start_serving`, then `subscribe`."""
        self.start_serving()
        self.subscribe()

    def start_serving(self) -> None:
        """Take the single-instance lock and serve every TCMU device already present. The first
        thing a (re)started daemon does: commands wait on the rings meanwhile, and the kernel
        fails them after `cmd_time_out` (30 s by default); everything slower (netlink, the udev
        monitor, the YAML, LIO) comes after, in `subscribe` and the command line."""
        self._take_lock()
        self.rescan()

    def subscribe(self) -> None:
        """Answer the control socket and follow devices as they come and go (netlink, udev);
        then rescan once more for devices added while this was being set up."""
        self._open_control()
        if self.dbus_bus is not None:
            self._start_dbus()
        if self.use_netlink:
            self._open_netlink()
        if self.use_udev:
            self._start_udev()
        self.rescan()
        log.info("serving subtypes %s; %d device(s) open", sorted(self.handlers), len(self.served))

    def _open_run_dir(self) -> int:
        """The run directory as an O_PATH-like fd: created 0700 if missing; refused if it is a
        symbolic link, not a directory, or owned by another user; group/other access removed.
        Everything the daemon creates there (lock, control socket) is then private to it."""
        path = self.run_dir
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR) and path.is_symlink():
                raise TcmuError(f"{path}: run directory is a symbolic link; expected a directory"
                                " of the daemon's own (remove the link)") from None
            raise TcmuError(f"{path}: run directory unusable: {exc.strerror}; expected a"
                            " directory") from None
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                raise TcmuError(f"{path}: run directory is owned by uid {st.st_uid}; expected"
                                f" uid {os.geteuid()} (the daemon's)")
            if st.st_mode & 0o077:
                log.warning("%s: run directory mode %o opened to others; setting 0700",
                            path, st.st_mode & 0o777)
                os.fchmod(fd, 0o700)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _take_lock(self) -> None:
        """flock `daemon.lock` in the run directory and write our pid into it. The lock file is
        opened without following a symbolic link and only once it is known to be a regular file
        of ours with one link is it truncated: a link planted there cannot make us clobber
        another file."""
        dir_fd = self._open_run_dir()
        path = self.run_dir / "daemon.lock"
        try:
            try:
                fd = os.open("daemon.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise TcmuError(f"{path}: lock file is a symbolic link; expected a regular"
                                    " file (remove the link)") from None
                raise TcmuError(f"{path}: cannot open the lock file: {exc.strerror}") from None
        finally:
            os.close(dir_fd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise TcmuError(f"{path}: lock file is not a regular file; expected one (remove"
                                " it)")
            if st.st_nlink != 1 or st.st_uid != os.geteuid():
                raise TcmuError(f"{path}: lock file has {st.st_nlink} links and owner uid"
                                f" {st.st_uid}; expected 1 link and uid {os.geteuid()} (a hard"
                                " link to another file? remove it)")
            if st.st_mode & 0o077:
                os.fchmod(fd, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise TcmuError(
                    f"another tcmu-py daemon is running (lock {path} is held)") from None
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def _open_netlink(self) -> None:
        from tcmu_py.daemon.netlink import TcmuNetlink

        try:
            self._netlink = TcmuNetlink()
        except OSError as exc:
            log.warning("netlink TCM-USER unavailable (%s); following udev only", exc)
            return
        # Replies let the kernel fail `enable` when our handler rejects a config string. Not
        # next to tcmu-runner (we registered with it: it owns the D-Bus name): it answers every
        # ADDED_DEVICE of a subtype it lacks with -ENOENT, so while the kernel waits for
        # replies our backstores' `enable` fails. Off, no device waits; targetcli's CheckConfig
        # (forwarded to us) still refuses a bad config string before anything is created.
        replies = not (self._dbus is not None and self._dbus.registered)
        if not replies:
            log.warning("tcmu-runner runs: kernel command replies turned off (SET_FEATURES 0) "
                        "so that its -ENOENT for our subtypes cannot fail their enable")
        self._netlink.set_features(kern_cmd_reply=replies)

    def _start_udev(self) -> None:
        try:
            import pyudev
        except ImportError:  # pragma: no cover - a core dependency
            log.warning("pyudev missing; relying on rescans")
            return
        try:
            context = pyudev.Context()
            monitor = pyudev.Monitor.from_netlink(context)
            monitor.filter_by("uio")
        except Exception as exc:  # noqa: BLE001 - no udev netlink in some containers
            log.warning("udev monitor unavailable (%s); relying on rescans", exc)
            return

        def on_event(action: str, device: Any) -> None:
            self._udev_event(action, device.sys_name)

        self._observer = pyudev.MonitorObserver(monitor, on_event, name="tcmu-udev")
        self._observer.start()

    def _udev_event(self, action: str, node: str) -> None:
        """The udev observer's event for uio `node` (on its thread), handled on a thread of its
        own, `udev-<node>` (`_after`), once the udev events of `node` before it were: "add"
        serves it (`add`), "remove" stops serving it, its handler closed on yet another thread
        (`_remove_later`). The observer waits for neither: a handler open that hangs (a
        cluster not answering) holds up no other node's udev events (before, "add" opened
        the handler on the observer's thread)."""
        if action == "add":
            work: Callable[[str], object] = self.add
        elif action == "remove":
            work = self._remove_later
        else:
            return

        def handle(before: threading.Thread | None) -> None:
            if before is not None:
                before.join()
            try:
                work(node)
            except Exception:  # noqa: BLE001 - logged; the node's later events go on
                log.exception("%s: udev %r failed", node, action)

        self._after(self._udev_handling, node, f"udev-{node}", handle)

    def _after(self, chain: dict[str, threading.Thread], node: str, name: str,
               handle: Callable[[threading.Thread | None], None]) -> None:
        """Run `handle` on a thread of its own named `name`, given the thread of `node`'s
        previous event in `chain` (None: none is running) to wait for, so that one node's
        events keep their order while another node's do not wait. `chain` holds each node's
        last thread until it ends. Called under `_lock` or not."""
        with self._lock:
            thread = threading.Thread(target=self._chained,
                                      args=(chain, node, chain.get(node), handle),
                                      name=name, daemon=True)
            chain[node] = thread
            thread.start()

    def _chained(self, chain: dict[str, threading.Thread], node: str,
                 before: threading.Thread | None,
                 handle: Callable[[threading.Thread | None], None]) -> None:
        name_os_thread()
        try:
            handle(before)
        finally:
            with self._lock:
                if chain.get(node) is threading.current_thread():
                    del chain[node]

    def _start_dbus(self) -> None:
        from tcmu_py.daemon.dbus import DBusService

        service = DBusService(self.handlers, self.dbus_bus or "SYSTEM")
        if service.start():
            self._dbus = service
        else:
            service.close()

    def _open_control(self) -> None:
        self._control = ControlServer(
            self.run_dir / "control.sock",
            {"status": self.status, "log-level": set_log_level},
        )
        self._control.start()

    def run(self, *, install_signals: bool = True) -> None:
        """Handle netlink events, control requests and rescans until a signal or `stop()`."""
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        if self._netlink is not None:
            poller.register(self._netlink.fileno(), select.POLLIN)
        interval = RESCAN_SECONDS_WITH_UDEV if self._observer is not None else RESCAN_SECONDS
        with self._lock:
            self._next_scan = min(self._next_scan or math.inf, time.monotonic() + interval)
        try:
            while not self._stopping:
                wake = min([self._next_scan, *(w[0] for w in self._unserved.values())])
                timeout = max(0.0, wake - time.monotonic())
                for fd, _ in poller.poll(timeout * 1000):
                    if fd == self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 512)
                        break
                    if self._netlink is not None and fd == self._netlink.fileno():
                        try:
                            self._handle_netlink()
                        except Exception:  # noqa: BLE001 - the devices must outlive netlink
                            log.exception("netlink TCM-USER failed; following udev and rescans"
                                          " only")
                            poller.unregister(fd)
                            with self._netlink_lock:
                                with contextlib.suppress(OSError):
                                    self._netlink.close()
                                self._netlink = None
                            self._next_scan = time.monotonic()
                if self._unserved:
                    self._answer_unserved()
                if time.monotonic() >= self._next_scan:
                    # set before the scan: an open failing in it brings the next one forward
                    with self._lock:
                        self._next_scan = time.monotonic() + interval
                    # Not waiting for any open: one that hangs (begun by this rescan or by
                    # another thread) holds up no netlink event (before, the run loop waited
                    # for it), no later rescan (which leaves the node to it) and no stop.
                    self.rescan(wait=False)
        finally:
            self.shutdown()

    def stop(self) -> None:
        """Ask `run()` to shut down (signal-safe)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def shutdown(self) -> None:
        """Block every device, drain, close; answer the kernel's netlink events still being
        handled. Returns within `SHUTDOWN_SECONDS`. Idempotent."""
        if self._observer is not None:
            self._observer.send_stop()
            self._observer = None
        deadline = time.monotonic() + SHUTDOWN_SECONDS
        with self._lock:
            nodes = list(self.served)
        leaving = [served for node in nodes if (served := self._take(node)) is not None]
        for served in leaving:  # all stopped first: their drains run side by side
            self._halt(served, block=True)
        # Each retired on a thread of its own, waited for until the deadline: a handler whose
        # close hangs (its storage not answering) holds up no other device's close and unblock
        # (before: one after another, and the wait for a close had no bound).
        retiring = [self._retire_later(served, block=True, deadline=deadline)
                    for served in leaving]
        for thread in retiring:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._await_closes(deadline)
        self._answer_abandoned(deadline)
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._dbus is not None:
            self._dbus.close()
            self._dbus = None
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        log.info("stopped")

    # ------------------------------------------------------------------------------------------
    # Devices

    def rescan(self, *, wait: bool = True) -> None:
        """Open every TCMU uio device we serve and are not serving yet; drop vanished ones (each
        retired on a thread of its own, `_remove_later`: a close that hangs holds up neither
        the rescan nor the run loop). With `wait` (the start-up scans, and the command line's
        after it made the YAML's backstores: their LUNs come after), return once each open
        ended — also one another thread began (`_add_all`); without (the run loop's), at once,
        and a node another thread is opening (a udev "add", a netlink ADDED, an earlier
        rescan) is left to it."""
        present = set()
        if self.uio_class.is_dir():
            present = {entry.name for entry in self.uio_class.iterdir()}
            with self._lock:
                new = sorted(n for n in present
                             if n not in self.served and (wait or n not in self._opening))
            self._add_all(new, wait=wait)
        with self._lock:
            gone = [n for n in self.served if n not in present]
            for n in [n for n in self._add_failures if n not in present]:
                del self._add_failures[n]
        for node in gone:
            self._remove_later(node)

    def _add_all(self, nodes: list[str], *, wait: bool = True) -> None:
        """`add` each of `nodes` on a thread of its own, so that one handler slow to open (a
        cluster that does not answer, a hung mount) holds up no other device; with `wait`,
        return once each is served, failed or to be tried again — or once the daemon is
        stopping: an open that hangs is then left to `shutdown`, which exits under it (before,
        the opens ran one after another on this thread, and a hung one held every later device
        and the daemon's SIGTERM)."""
        threads = [threading.Thread(target=self.add, args=(node,), name=f"add-{node}",
                                    daemon=True) for node in nodes]
        for thread in threads:
            thread.start()
        if not wait:
            return
        for thread in threads:
            while thread.is_alive() and not self._stopping:
                thread.join(ADD_JOIN_SECONDS)

    def reopen_failed(self) -> None:
        """Open again every device whose handler failed to open. `tcmu-py serve -c` serves the
        rings before it reads the YAML (`start_serving`), so a device that names a pool or
        library declared there (``pool=<name>``) fails at that first open; once the YAML's
        pools and libraries are prepared this gives it a second chance. A device that fails
        again stays NOT READY, with the new reason logged."""
        with self._lock:
            failed = [node for node, s in self.served.items()
                      if s.failed is not None and s.retrying is None]  # those retry anyway
        for node in failed:
            self.remove(node)
            self.add(node)

    def _uio_name(self, node: str) -> UioName | None:
        try:
            text = (self.uio_class / node / "name").read_text().strip()
        except OSError:
            return None
        try:
            return UioName.parse(text)
        except ValueError:
            return None

    def add(self, node: str) -> None:
        """Serve uio device `node` (e.g. "uio0") if it is a TCMU device of a subtype we serve.
        Returns once it is served (or failed, or is to be tried again); a concurrent `add` of
        the same node waits for this one. The handler is opened outside the daemon's lock."""
        with self._lock:
            self._wait_opened(node)
            if node in self.served or self._stopping:
                return
            name = self._uio_name(node)
            if name is None or name.subtype not in self.handlers:
                return
            self._opening[node] = (name, time.monotonic())
        served = None
        try:
            served = self._open(node, name)
        except _StillConfiguring as exc:
            log.info("%s: %s is %s", name.device, node, exc)
        except Exception:
            log.exception("%s: cannot serve %s", name.device, node)
        except BaseException:  # KeyboardInterrupt, SystemExit: no one may wait for it for good
            with self._lock:
                self._opening.pop(node, None)
                self._changed.notify_all()
            raise
        with self._lock:
            self._opening.pop(node, None)
            self._changed.notify_all()
            if served is None:
                self._retry_later(node)
                return
            if not self._stopping:
                self._add_failures.pop(node, None)
                self.served[node] = served
                return
            self._closing[id(served)] = served  # shutdown began meanwhile: not served
        self._halt(served)
        self._retire(served)

    def _wait_opened(self, node: str) -> None:
        """Wait until no `add` is opening a handler for `node`. Called under `_lock` (the
        wait releases it, so the opening `add` can finish)."""
        while node in self._opening:
            self._changed.wait()

    def _retry_later(self, node: str) -> None:
        """Have `run()` rescan (and so `add` `node` again) after `ADD_RETRY_SECONDS`, doubled
        for each failure of it in a row, at most the rescan interval. Called under `_lock`."""
        failures = self._add_failures.get(node, 0)
        self._add_failures[node] = failures + 1
        delay = min(ADD_RETRY_SECONDS * 2 ** failures, RESCAN_SECONDS_WITH_UDEV)
        at = time.monotonic() + delay
        if not self._next_scan or at < self._next_scan:
            self._next_scan = at
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"r")
        log.info("%s: trying again in %g s", node, delay)

    def _open(self, node: str, name: UioName, prepared: ScsiDevice | None = None) -> Served:
        """Recover and serve `node`; `prepared`: a device the handler already opened (the
        background retry of `_reopen_unavailable`), served if it was opened with the
        configuration the kernel has now (else closed, and the handler opens again)."""
        cfs = TcmuConfigfs(name.hba, name.device, self.configfs_root)
        block_size = cfs.block_size
        if block_size == 0:
            # target_core_user.c (tcmu_configure_device) registers the uio, which udev
            # announces, before it gives hw_block_size its default: the device's attributes
            # are not final yet. Its ADDED_DEVICE, or the retry, comes when they are.
            raise _StillConfiguring("still being configured by the kernel (hw_block_size 0)")
        cfgstring, wwn, domain = split_daemon_items(name.cfgstring)
        config = DeviceConfig(
            name=name.device,
            subtype=name.subtype,
            cfgstring=cfgstring,
            size=cfs.size,
            block_size=block_size,
            hw_max_sectors=cfs.hw_max_sectors,
            write_cache=cfs.write_cache,
            serial=cfs.serial,
            uio_name=name.build(),
            cmd_time_out=cfs.cmd_time_out,
            wwn=wwn,
            copy_domain=domain,
            data_plane=daemon_data_plane(name.cfgstring),
        )
        self._wants_reply(name)  # remembered for its REMOVED_DEVICE (configfs gone by then)
        # A device the kernel is still configuring (`enable` reads 0: its ADDED_DEVICE is on its
        # way to us, or waits for our reply) refuses block_dev and reset_ring with EINVAL
        # ("Device is not configured", target_core_user.c; seen in the VM lab) -- and has
        # queued nothing yet, so there is nothing to hold off or recover. Were the refusal
        # taken for a failure, netlink and udev could both come too early and leave a new
        # device unserved until the next rescan.
        recover = cfs.enabled
        if recover:
            cfs.block()
        try:
            if recover:
                cfs.reset_ring(1)
            uio = self._open_uio(str(self.dev_dir / node), str(self.uio_class / node))
            try:
                served = self._serve(node, name, config, uio, prepared)
            except BaseException:
                with contextlib.suppress(OSError):
                    uio.close()  # else the kernel's one-opener rule refuses every retry (EBUSY)
                raise
        finally:
            if recover:
                cfs.unblock()
        log.info(
            "%s: serving %s (%s, %d bytes, block %d)%s",
            name.device,
            node,
            f"{name.subtype}/{name.cfgstring}",
            config.size,
            config.block_size,
            " [FAILED]" if served.failed else "",
        )
        return served

    def _serve(self, node: str, name: UioName, config: DeviceConfig, uio: Any,
               prepared: ScsiDevice | None = None) -> Served:
        """Open the handler (a failure serves `FailedDevice`; `DeviceUnavailable` one that says
        "becoming ready" while `_reopen_unavailable` retries) and start the runner's thread."""
        failed = None
        unavailable = False
        if prepared is not None and prepared.config != config:
            log.info("%s: its configuration changed while it was unavailable: opening again",
                     name.device)
            with contextlib.suppress(Exception):
                prepared.close()
            prepared = None
        try:
            handler = self.handlers[name.subtype]
            if prepared is not None:
                device = prepared
            else:
                handler.check_config(config.cfgstring)
                device = handler.open(config)
            if config.copy_domain is not None and isinstance(device, BlockDevice):
                device.join(self._copy_domain(config.copy_domain))
        except DeviceUnavailable as exc:
            failed = f"unavailable: {exc}"
            unavailable = True
            log.warning("%s: %s; NOT READY (becoming ready), opening it again in %g s",
                        name.device, failed, ADD_RETRY_SECONDS)
            device = FailedDevice(config, failed, becoming=True)
        except Exception as exc:  # noqa: BLE001 - any handler failure: serve NOT READY
            failed = f"{type(exc).__name__}: {exc}"
            log.error(
                "%s: handler %s failed to open %r: %s",
                name.device,
                name.subtype,
                name.cfgstring,
                failed,
            )
            device = FailedDevice(config, failed)
        # After reset_ring the ring may hold commands the kernel requeued: adopt them.
        runner = DeviceRunner(
            uio,
            device,
            workers=self.workers,
            name=name.device,
            adopt=True,
            poll_seconds=self.poll_us / 1e6,
            data_plane=self.data_plane,
            native=self.native_loop,
        )
        thread = threading.Thread(target=runner.run, name=f"tcmu-{name.device}", daemon=True)
        thread.start()
        served = Served(node, name, uio, device, runner, thread, failed)
        if unavailable:
            served.retrying = threading.Thread(target=self._reopen_unavailable, args=(served,),
                                               name=f"reopen-{name.device}", daemon=True)
            served.retrying.start()
        return served

    def _reopen_unavailable(self, served: Served) -> None:
        """Open `served`'s handler again (outside the daemon's lock: a cluster that does not
        answer costs its own timeout here, not every other device's add or status), after
        `ADD_RETRY_SECONDS` doubling up to the rescan interval, until it opens — then it is
        swapped in (`_swap_in`) — or `served` is removed, or the handler fails for good (the
        device then says MANUAL INTERVENTION REQUIRED)."""
        name_os_thread()
        config = served.device.config
        handler = self.handlers[served.name.subtype]
        delay = ADD_RETRY_SECONDS
        while not served.stop_retry.wait(delay):
            try:
                device = handler.open(config)
            except DeviceUnavailable as exc:
                delay = min(delay * 2, RESCAN_SECONDS_WITH_UDEV)
                log.info("%s: still unavailable (%s); trying again in %g s",
                         served.name.device, exc, delay)
                continue
            except Exception as exc:  # noqa: BLE001 - a handler failure: NOT READY for good
                reason = f"{type(exc).__name__}: {exc}"
                log.error("%s: handler %s failed to open %r: %s", served.name.device,
                          served.name.subtype, config.cfgstring, reason)
                if isinstance(served.device, FailedDevice):
                    served.device.reason, served.device.becoming = reason, False
                served.failed = reason
                served.retrying = None  # a failure like any other now: `reopen_failed` takes it
                return
            if not self._swap_in(served, device):
                with contextlib.suppress(Exception):
                    device.close()
            return

    def _swap_in(self, served: Served, device: ScsiDevice) -> bool:
        """Serve `device` (opened by `_reopen_unavailable`) in place of `served`'s
        `FailedDevice`: False (the caller closes `device`) when `served` was removed or
        replaced meanwhile, or the daemon stops. Under the lock, so no add of the same node
        runs between the removal and the new open."""
        with self._lock:
            if self._stopping or self.served.get(served.node) is not served:
                return False
            self.remove(served.node)
            try:
                new = self._open(served.node, served.name, prepared=device)
            except Exception:  # noqa: BLE001 - as in `add`: logged, opened again
                log.exception("%s: cannot serve %s", served.name.device, served.node)
                with contextlib.suppress(Exception):
                    device.close()  # not served: `add` opens the handler again
                self._retry_later(served.node)
                return True
            self.served[served.node] = new
            log.info("%s: available again: serving %s", served.name.device, served.node)
            return True

    def _copy_domain(self, name: str) -> CopyDomain:
        """The shared copy domain `name`, made on first use. A device leaves it when it closes
        (`BlockDevice.close`); an empty domain costs a dict entry."""
        with self._lock:
            domain = self.copy_domains.get(name)
            if domain is None:
                domain = self.copy_domains[name] = CopyDomain(name)
            return domain

    def remove(self, node: str, *, block: bool = False) -> None:
        """Stop serving `node`; returns once its handler has closed (or its close was deferred
        past a command still in its backend). With `block` (shutdown), hold new commands off in
        the kernel while the runner drains, then let them through again."""
        served = self._take(node)
        if served is not None:
            self._halt(served, block=block)
            self._retire(served, block=block)

    def _remove_later(self, node: str) -> threading.Thread | None:
        """Stop serving `node` now (taken out of `served`, its runner told to stop) and retire
        it on a thread of its own, returned (None: `node` was not served). A handler whose close
        hangs holds up that thread only, not the caller (the udev observer, a netlink event);
        `shutdown` still waits for the close (`_closing`)."""
        served = self._take(node)
        if served is None:
            return None
        self._halt(served)
        return self._retire_later(served)

    def _retire_later(self, served: Served, *, block: bool = False,
                      deadline: float | None = None) -> threading.Thread:
        """`_retire` of `served` (after `_halt`) on a thread of its own: started, returned."""
        thread = threading.Thread(target=self._retire, args=(served,),
                                  kwargs={"block": block, "deadline": deadline},
                                  name=f"retire-{served.name.device}", daemon=True)
        thread.start()
        return thread

    def _take(self, node: str) -> Served | None:
        """Take `node` out of `served` (once its first open, if one runs, has ended) and
        record it as closing until `_closed`; None if it was not served."""
        with self._lock:
            self._wait_opened(node)  # an `add` of it opens the handler: remove that
            served = self.served.pop(node, None)
            if served is None:
                return None
            self._closing[id(served)] = served  # until its handler closed (`_closed`)
            retrying = served.retrying
            if retrying is not None and retrying is not threading.current_thread():
                self._reopens = [t for t in self._reopens if t.is_alive()]
                self._reopens.append(retrying)
        return served

    def _halt(self, served: Served, *, block: bool = False) -> None:
        """End `served`'s retries and tell its runner to stop (not waited for here); with
        `block`, hold new commands off in the kernel first (`_retire` lets them through)."""
        served.stop_retry.set()  # a `_reopen_unavailable` of it ends (not joined: it may
        # be inside the handler's open; what it opens then is closed by `_swap_in`'s refusal)
        if block:
            with contextlib.suppress(TcmuError):
                self._configfs(served).block()
        served.runner.stop()

    def _configfs(self, served: Served) -> TcmuConfigfs:
        return TcmuConfigfs(served.name.hba, served.name.device, self.configfs_root)

    def _retire(self, served: Served, *, block: bool = False,
                deadline: float | None = None) -> None:
        """After `_halt`: wait for `served`'s runner to drain (until `deadline`, a monotonic
        time; 60 s without one), close its handler and uio (now, or after its last command
        still running), and with `block` let the kernel's commands through again."""
        served.thread.join(timeout=60 if deadline is None
                           else max(0.0, deadline - time.monotonic()))

        def close_uio() -> None:
            try:
                with contextlib.suppress(OSError):
                    served.uio.close()
            finally:
                self._closed(served)

        # The runner closes the handler (and then the uio) only once no command of it runs:
        # now, or when a command still stuck in the backend finishes.
        closed = False
        try:
            closed = served.runner.close(on_closed=close_uio)
        except BaseException:
            self._closed(served)  # nothing more will close it
            raise
        finally:
            if block:
                with contextlib.suppress(TcmuError):
                    self._configfs(served).unblock()
        log.info("%s: %s %s", served.name.device, "closed" if closed else "closing", served.node)

    def _closed(self, served: Served) -> None:
        """`served`'s handler and uio are closed (or never will be): `shutdown` stops waiting
        for it. Idempotent."""
        with self._lock:
            self._closing.pop(id(served), None)
            self._changed.notify_all()

    def _await_closes(self, deadline: float) -> None:
        """Wait, until `deadline` (a monotonic time), until every removed device's handler has
        closed, every first open in progress (`add`) has ended (what it opened is then closed,
        not served) and every reopen (`_reopen_unavailable`) too; log the ones that did not
        (their next open recovers them, as after a kill)."""
        with self._lock:
            while (self._closing or self._opening) and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(left)
            closing = sorted(s.name.device for s in self._closing.values())
            opening = sorted(self._opening)
            reopens, self._reopens = self._reopens, []
        for name in closing:
            log.error("%s: its handler is still closing %g s after the stop began (a command "
                      "still runs in its backend); exiting without its close: the next open "
                      "recovers it", name, SHUTDOWN_SECONDS)
        for node in opening:
            log.error("%s: its handler is still being opened %g s after the stop began; "
                      "exiting under it", node, SHUTDOWN_SECONDS)
        for thread in reopens:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.error("%s still opening its handler %g s after the stop began; exiting "
                          "under it", thread.name, SHUTDOWN_SECONDS)

    def find(self, dev_name: str) -> Served | None:
        with self._lock:
            return next((s for s in self.served.values() if s.name.device == dev_name), None)

    # ------------------------------------------------------------------------------------------
    # Netlink

    def _handle_netlink(self) -> None:
        """Take the events the kernel has sent (run loop): those of a subtype served here are
        handled on threads (`_handle_later`), the others watched (`_watch_unserved`). Returns
        without waiting for any handler."""
        with self._netlink_lock:
            events = self._netlink.receive()
        for event in events:
            try:
                uio = UioName.parse(event.device)
            except ValueError:
                continue
            if uio.subtype not in self.handlers:
                self._watch_unserved(event, uio)  # tcmu-runner's, or nobody's
                continue
            self._handle_later(event, uio)

    def _handle_later(self, event: DeviceEvent, uio: UioName) -> None:
        """Handle `event` (of served device `uio`) on a thread of its own (`_handle_event`),
        once the earlier events of the same uio node have been handled: a handler whose open or
        close hangs then holds up no other device's event, no rescan and no stop (before, the
        run loop opened and closed handlers itself), and one device's events keep the order the
        kernel sent them in (while it waits for answers it sends a device's next event only
        once the last was answered; without, a REMOVED may follow an ADDED whose open runs)."""
        node = f"uio{event.minor}"
        pending = _Pending(event, uio)
        with self._lock:
            self._unanswered.append(pending)
            self._after(self._handling, node, f"netlink-{uio.device}",
                        lambda before: self._handle_event(pending, node, before))

    def _handle_event(self, pending: _Pending, node: str,
                      before: threading.Thread | None) -> None:
        """After `before` (the thread of `node`'s previous event), handle `pending`'s event and
        answer the kernel (`_answer`): 0, or -EINVAL when the handler refused the config string
        (ADDED), the change (RECONFIG) or anything failed. An ADDED is answered once the open
        has ended (served, served NOT READY, or to be tried again); a REMOVED once the handler
        has closed, or `REMOVE_SECONDS` after it came (`_removed`). `before` is waited for
        `EARLIER_EVENT_SECONDS` at most before this event is answered (`_earlier_hangs`)."""
        from tcmu_py.daemon.netlink import TcmuCmd

        event, uio = pending.event, pending.uio
        if before is not None:
            before.join(max(0.0, pending.since + EARLIER_EVENT_SECONDS - time.monotonic()))
            if before.is_alive():
                applied = self._earlier_hangs(pending)
                before.join()
                if not applied:
                    return
        status = 0
        try:
            if event.cmd == TcmuCmd.ADDED_DEVICE:
                self.handlers[uio.subtype].check_config(split_daemon_items(uio.cfgstring)[0])
                self.add(node)
            elif event.cmd == TcmuCmd.REMOVED_DEVICE:
                self._removed(node, uio.device, pending.since + REMOVE_SECONDS)
            elif event.cmd == TcmuCmd.RECONFIG_DEVICE:
                self._reconfig(node, event)
        except Exception as exc:  # noqa: BLE001 - report to the kernel as -EINVAL
            log.error("%s: %s rejected: %s", uio.device, event.cmd.name, exc)
            status = -errno.EINVAL
        self._answer(pending, status)

    def _earlier_hangs(self, pending: _Pending) -> bool:
        """`pending`'s event has waited `EARLIER_EVENT_SECONDS` for the earlier event of its
        uio node, still being handled: answer the kernel now (it waits without a limit, inside
        a configfs write; before, this answer waited as long as the earlier event's open or
        close hung). REMOVED 0: the removal goes on, and is carried out once the earlier
        event ended (True). ADDED and RECONFIG -EBUSY: the write fails, so the event is not
        carried out later (False)."""
        from tcmu_py.daemon.netlink import TcmuCmd

        cmd = pending.event.cmd
        removing = cmd == TcmuCmd.REMOVED_DEVICE
        status = 0 if removing else -errno.EBUSY
        if self._answer(pending, status):
            log.error("%s: its %s waited %g s for the device's earlier event, still being "
                      "handled (a handler open or close that hangs); answered the kernel %s so "
                      "that the configfs write waiting for it ends%s", pending.uio.device,
                      cmd.name, EARLIER_EVENT_SECONDS, "0" if removing else "-EBUSY",
                      "; removed once that event ended" if removing else
                      " (not carried out)")
        return removing

    def _removed(self, node: str, device: str, deadline: float) -> None:
        """The kernel removed `node` (REMOVED_DEVICE: its rmdir waits for our answer): stop
        serving it — once an open of it in progress has ended (`_take`) — its runner drained
        and its handler closed on a thread of its own, `retire-<device>`, waited for until
        `deadline` (a monotonic time; before, on the run loop, without a bound: a close that
        hung held every other event, and the kernel's rmdir for good; and the wait for an open
        of the node in progress, by a udev "add" or a rescan, had none either)."""
        retiring = threading.Thread(target=self.remove, args=(node,), name=f"retire-{device}",
                                    daemon=True)
        retiring.start()
        retiring.join(max(0.0, deadline - time.monotonic()))
        if retiring.is_alive():
            log.error("%s: its handler is still closing (or being opened) %g s after the kernel "
                      "removed it (a command, the close or the open hangs in its backend); "
                      "answering the kernel so that the removal ends; the close goes on",
                      device, REMOVE_SECONDS)

    def _answer(self, pending: _Pending, status: int) -> bool:
        """Answer the kernel `status` for `pending`'s event if it waits for one (`_wants_reply`)
        and nobody answered it yet; True if this call answered it."""
        from tcmu_py.daemon.netlink import TcmuCmd

        with self._lock:
            if pending.answered:
                return False
            pending.answered = True
            self._unanswered.remove(pending)
        event, uio = pending.event, pending.uio
        if self._wants_reply(uio, removing=event.cmd == TcmuCmd.REMOVED_DEVICE):
            self._reply(event, status, uio.device)
        return True

    def _reply(self, event: DeviceEvent, status: int, device: str) -> None:
        """Send the kernel `status` for `event` (from any thread); a failure is logged."""
        with self._netlink_lock:
            if self._netlink is None:  # dropped after it failed: nothing to answer on
                return
            try:
                self._netlink.reply(event, status)
            except OSError as exc:
                log.error("%s: netlink reply failed: %s", device, exc)

    def _answer_abandoned(self, deadline: float) -> None:
        """At shutdown: wait, until `deadline` (a monotonic time), for the netlink events still
        being handled; then answer each one still unanswered (a handler's open or close that
        hangs). The kernel waits for that answer without a limit, inside a configfs write,
        so it is given before the exit: REMOVED 0 (the removal goes on), ADDED and RECONFIG
        -EINTR (the write fails, as when the kernel's own ``reset_netlink`` gives up on a
        daemon: the device is not served). What the event's thread does later is not answered
        again."""
        from tcmu_py.daemon.netlink import TcmuCmd

        with self._lock:
            handling = list(self._handling.values())
        for thread in handling:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            abandoned = list(self._unanswered)
        for pending in abandoned:
            cmd = pending.event.cmd
            if cmd == TcmuCmd.REMOVED_DEVICE:
                status, name, outcome = 0, "0", "the removal goes on"
            elif cmd == TcmuCmd.ADDED_DEVICE:
                status, name, outcome = -errno.EINTR, "-EINTR", "its enable fails, not served"
            else:
                status, name, outcome = -errno.EINTR, "-EINTR", "the change fails"
            if self._answer(pending, status):
                log.error("%s: its %s still being handled %g s after the stop began (a handler "
                          "open or close that hangs); answered the kernel %s so that the "
                          "configfs write waiting for it ends (%s); exiting under it",
                          pending.uio.device, cmd.name, SHUTDOWN_SECONDS, name, outcome)

    def _watch_unserved(self, event: Any, uio: UioName) -> None:
        """The kernel's rule (drivers/target/target_core_user.c): whether it waits for a reply
        is one switch for the whole module (SET_FEATURES, which `serve` turns on so that a
        config string its handler rejects fails `enable`; tcmu-runner turns it on too), copied
        into each device's ``attrib/nl_reply_supported`` when it is enabled unless that was set
        negative before; and the wait (``tcmu_wait_genl_cmd_reply``) has no time limit. There
        is no per-subtype switch: an event for a device of a subtype nobody serves would hang
        the configfs writer for good -- `enable` (ADDED_DEVICE), the backstore's rmdir
        (REMOVED_DEVICE: sent while anyone listens on the group, as `serve` does) and writes of
        ``dev_config``/``dev_size``/``emulate_write_cache`` (RECONFIG_DEVICE). So such an
        event is left to another daemon (tcmu-runner answers its own) for
        `UNSERVED_REPLY_SECONDS`; if the kernel then still waits (`_still_waiting`),
        `_answer_unserved` answers: -ENODEV for ADDED and RECONFIG (the write fails), 0 for
        REMOVED (the removal goes on). Bounded either way."""
        from tcmu_py.daemon.netlink import TcmuCmd

        # REMOVED: nothing below the directory being removed may be read (see `_wants_reply`);
        # whether the kernel waits is told by its uio node at the deadline.
        if event.cmd is TcmuCmd.REMOVED_DEVICE or self._wants_reply(uio):
            self._unserved[event.device_id] = (
                time.monotonic() + UNSERVED_REPLY_SECONDS, event, uio)

    def _still_waiting(self, event: Any, uio: UioName) -> bool:
        """Whether the kernel still waits for an answer to ``event`` (nobody gave one). ADDED:
        the device is not enabled. REMOVED: its uio node, which the kernel unregisters right
        after the reply, still exists under the same name. RECONFIG: the uio node keeps the old
        name (a new dev_config renames it) and the size / write cache is not the new one."""
        from tcmu_py.daemon.netlink import TcmuCmd

        cfs = TcmuConfigfs(uio.hba, uio.device, self.configfs_root)
        try:
            if event.cmd is TcmuCmd.ADDED_DEVICE:
                return not cfs.enabled
            node = (self.uio_class / f"uio{event.minor}" / "name").read_text().strip()
            if node != event.device:
                return False
            if event.cmd is TcmuCmd.REMOVED_DEVICE or event.dev_cfg is not None:
                return True
            if event.dev_size is not None:
                return cfs.size != event.dev_size
            return event.writecache is None or cfs.write_cache != event.writecache
        except (OSError, TcmuError, ValueError):
            return False  # gone meanwhile

    def _answer_unserved(self) -> None:
        from tcmu_py.daemon.netlink import TcmuCmd

        now = time.monotonic()
        for dev_id, (deadline, event, uio) in list(self._unserved.items()):
            if now < deadline:
                continue
            del self._unserved[dev_id]
            if self._netlink is None or not self._still_waiting(event, uio):
                continue  # another daemon answered
            status = 0 if event.cmd is TcmuCmd.REMOVED_DEVICE else -errno.ENODEV
            log.warning("%s: no daemon answered the kernel's %s for subtype %r within %g s; "
                        "answering %d so that the configfs write ends instead of hanging",
                        uio.device, event.cmd.name, uio.subtype, UNSERVED_REPLY_SECONDS, status)
            self._reply(event, status, uio.device)

    def _wants_reply(self, uio: UioName, *, removing: bool = False) -> bool:
        """The kernel waits for a reply only when the device's nl_reply_supported is positive.
        The value is remembered per device (on ADDED_DEVICE and when opened) and, for
        REMOVED_DEVICE (``removing``), taken from memory without touching configfs: the kernel
        sends it from inside the rmdir of the device's configfs directory, which holds that
        directory locked, so a lookup below it waits for the rmdir, and the rmdir for our reply
        (``targetcli ... delete`` of a served backstore hung for good in the VM)."""
        key = (str(uio.hba), uio.device)
        if removing:
            return self._reply_wanted.pop(key, False)
        try:
            wanted = TcmuConfigfs(uio.hba, uio.device, self.configfs_root).attr_int(
                "nl_reply_supported") > 0
        except TcmuError:
            return self._reply_wanted.pop(key, False)
        self._reply_wanted[key] = wanted
        return wanted

    def _reconfig(self, node: str, event: Any) -> None:
        with self._lock:
            self._wait_opened(node)  # a resize must reach the handler being opened
            served = self.served.get(node)
        if served is None:
            return
        if event.dev_size is not None:
            resize = getattr(served.device, "resize", None)
            if resize is None:
                raise TcmuError(f"{served.name.device}: handler cannot be resized")
            resize(event.dev_size)
            log.info("%s: resized to %d bytes", served.name.device, event.dev_size)
        if (
            event.dev_cfg is not None
            and event.dev_cfg != f"{served.name.subtype}/{served.name.cfgstring}"
        ):
            raise TcmuError(
                f"{served.name.device}: changing the config string of a live device "
                "is not supported; remove and re-create it"
            )
        if event.writecache is not None:
            log.info(
                "%s: emulate_write_cache=%d (the handler's cache decides WCE)",
                served.name.device,
                event.writecache,
            )

    # ------------------------------------------------------------------------------------------
    # Status

    def serve_metrics(self, addr: str, port: int) -> tuple[str, int]:
        """Start the Prometheus endpoint (`tcmu_py.daemon.metrics`) on addr:port; returns the
        address it listens on. Raises ConfigError without prometheus_client or when the address
        cannot be bound."""
        from tcmu_py.daemon.metrics import MetricsServer

        self._metrics = MetricsServer(addr, port, self._metrics_snapshot)
        return self._metrics.address

    def _metrics_snapshot(self) -> tuple[dict[str, Any], dict[str, type[Handler]]]:
        status = self.status()
        named = {str(d["handler"]) for d in status["devices"]} | set(status["handlers"])
        handlers = {}
        for subtype in sorted(named):
            try:
                handlers[subtype] = self.handlers[subtype]
            except KeyError:  # not installed, or failed to import: logged by the registry
                continue
        return status, handlers

    def status(self) -> dict[str, Any]:
        """Devices and counters, JSON-serialisable (for `tcmu-py status`)."""
        with self._lock:
            items = list(self.served.values())
            opening = list(self._opening.items())
        devices = []
        for s in items:
            counters = s.runner.refresh_counters().snapshot()
            plane, native = s.runner.plane, s.runner.native
            devices.append(
                {
                    "name": s.name.device,
                    "uio": s.node,
                    "handler": s.name.subtype,
                    "config": s.name.cfgstring,
                    "failed": s.failed,
                    # The handler raised DeviceUnavailable: NOT READY (becoming ready) while
                    # `_reopen_unavailable` opens it again.
                    "unavailable": isinstance(s.device, FailedDevice) and s.device.becoming,
                    # Open, but refusing medium access (`ScsiDevice.not_ready_reason`).
                    "not_ready": getattr(s.device, "not_ready_reason", None),
                    "size": getattr(s.device, "num_blocks", 0) * getattr(s.device, "block_size", 0),
                    "counters": counters,
                    # The C data plane: None when off; else whether an extent is declared and
                    # how many commands C executed (the counters include them); "native" when
                    # it runs on its own thread (stage 2), "mapped" when it copies through a
                    # mapping of the image (a fully allocated tmpfs file).
                    "data_plane": {"declared": True, "commands": native.executed,
                                   "native": True, "mapped": native.mapped}
                    if native is not None
                    else None if plane is None
                    else {"declared": plane.declared, "commands": plane.executed},
                }
            )
        # "handlers": the subtypes that added entries, so that `tcmu-py status` imports only
        # those (and the devices') to render their tables.
        contributors: list[str] = []
        out: dict[str, Any] = {"pid": os.getpid(), "devices": devices, "handlers": contributors}
        # Devices whose handler `add` is opening (not served yet: their commands wait on the
        # ring), with how long the open has taken so far.
        now = time.monotonic()
        out["opening"] = [{"name": name.device, "uio": node, "handler": name.subtype,
                           "config": name.cfgstring, "seconds": round(now - since, 1)}
                          for node, (name, since) in sorted(opening)]
        for subtype in self.handlers:
            try:
                handler = self.handlers[subtype]
            except KeyError:  # failed to import: logged by the registry
                continue
            mine = [s.device for s in items if s.name.subtype == subtype]
            try:
                extra = handler.status(mine)
            except Exception:  # one handler's report must not take the status down
                log.exception("handler %r: status failed", subtype)
                continue
            for key, value in extra.items():
                if key in out:
                    log.error("handler %r: status key %r is taken; ignored", subtype, key)
                else:
                    out[key] = value
            if extra:
                contributors.append(subtype)
        return out
