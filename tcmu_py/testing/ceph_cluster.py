"""A real, minimal Ceph cluster on this machine for tests: 1 monitor, 1 manager, 3 memstore
OSDs, pool ``rbd`` (16 PGs, size 2, min_size 1), everything under one directory, on 127.0.0.1.

Started from Debian's packages (``ceph-mon ceph-mgr ceph-osd``; see scripts/bootstrap.sh) as
/work/shared/design/ceph-lab.md measured it, natively by the unit tests' session fixture
(tests/unit/conftest.py) and inside the VM lab by the kernel scenarios of
tests/kernel/scenarios/ceph_disk.py (``die_with_parent=False``: the cluster outlives the scenario
process that started it and serves the next ones of its group):

- keys are made here (the ``CryptoKey`` encoding: type 1, creation time, 16 random bytes) and
  written into one monitor keyring, so every entity exists from ``ceph-mon --mkfs`` on and no
  ``ceph auth`` command is needed; ``monmaptool`` makes the one-monitor map;
- monitor commands go through librados ``mon_command`` from this process (the ``ceph`` CLI
  costs a Python start-up per call), the three ``ceph-osd --mkfs`` run side by side;
- the options a one-host cluster needs: ``osd_crush_chooseleaf_type = 0`` (else size 2 never
  becomes active+clean), ``mon_osd_reporter_subtree_level = osd`` and
  ``mon_osd_min_down_reporters = 1`` (a hung OSD is marked down in seconds), the admin keyring
  under ``[client]`` (under ``[global]`` it breaks ceph-mgr's authentication);
- the manager loads none of its Python modules (``mgr_disabled_modules``): the PG statistics
  the waits read come from its core, and under emulation the modules' start-up competes with
  the OSDs' peering for the two CPUs;
- every wait has a deadline; a daemon that exits early, or a deadline passed, raises
  `ClusterError` with the tail of the daemons' logs.

``python -m tcmu_py.testing.ceph_cluster DIR`` starts one by hand and prints its conf file and start
time (Ctrl-C stops it).
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tcmu_py.handlers.ceph.librbd import Cluster

#: Seconds for the whole start (natively it takes ~10-15 s on an idle 2-core machine).
START_DEADLINE = 180.0
#: Seconds each daemon gets to stop on SIGTERM before SIGKILL.
STOP_DEADLINE = 15.0
OSDS = 3
POOL = "rbd"
PG_NUM = 16
BINARIES = ("ceph-mon", "ceph-mgr", "ceph-osd", "monmaptool")
#: Every manager module of Debian's pacific packages (the always-on ones included), so that
#: none is even imported: none is needed for RBD I/O, pool commands or the PG statistics of
#: ``status``.
DISABLED_MGR_MODULES = ("alerts balancer crash devicehealth diskprediction_local influx "
                        "insights iostat localpool mirroring nfs orchestrator osd_perf_query "
                        "osd_support pg_autoscaler progress prometheus rbd_support restful "
                        "selftest snap_schedule stats status telegraf telemetry test_orchestrator "
                        "volumes zabbix")


class ClusterError(RuntimeError):
    """The cluster could not be started (the message says which step and shows logs)."""


def make_key() -> str:
    """A cephx secret as keyrings hold it: base64 of (u16 type 1 = AES, u32 seconds, u32
    nanoseconds, u16 length 16, 16 random bytes), the CryptoKey encoding."""
    return base64.b64encode(struct.pack("<HIIH", 1, int(time.time()), 0, 16)
                            + os.urandom(16)).decode()


def _keyring_entry(name: str, key: str, caps: dict[str, str]) -> str:
    lines = [f"[{name}]", f"\tkey = {key}"]
    lines += [f'\tcaps {k} = "{v}"' for k, v in caps.items()]
    return "\n".join(lines) + "\n"


def _die_with_parent() -> None:
    """In the forked child: SIGKILL when the test process dies (prctl PR_SET_PDEATHSIG), so a
    crashed or killed test session leaves no daemons behind (its teardown never runs)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1: PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class CephCluster:
    """A running cluster: `conf` is its ceph.conf, `admin_keyring` the client.admin keyring
    (also named in the conf's ``[client]`` section). `stop()` ends every daemon it started."""

    root: Path
    conf: Path
    admin_keyring: Path
    start_seconds: float = 0.0
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    #: SIGKILL the daemons when the process that started them dies (PR_SET_PDEATHSIG); False
    #: when the cluster must outlive it (the kernel scenarios' group).
    die_with_parent: bool = True

    def admin(self) -> Cluster:
        """A new librados connection as client.admin (the caller shuts it down)."""
        return Cluster(str(self.conf), "admin")

    def log_tail(self, lines: int = 15) -> str:
        out = []
        for log in sorted((self.root / "log").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(out)

    def daemon_argv(self, name: str) -> list[str]:
        """The command line of daemon `name` (``mon.a``, ``mgr.x``, ``osd.N``)."""
        kind, ident = name.split(".", 1)
        return [f"ceph-{kind}", "-f", "-c", str(self.conf), "-i", ident]

    def spawn(self, name: str) -> subprocess.Popen[bytes]:
        """Start daemon `name` (again, e.g. an OSD that was killed), in a session of its own,
        output appended to ``log/NAME.stdout``."""
        out = open(self.root / "log" / f"{name}.stdout", "ab")  # noqa: SIM115 - kept by Popen
        self.procs[name] = subprocess.Popen(
            self.daemon_argv(name), stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_die_with_parent if self.die_with_parent else None)
        out.close()
        return self.procs[name]

    def _check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise ClusterError(f"{name} exited with status {p.returncode}\n"
                                   f"{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM every daemon, SIGKILL what is left after `STOP_DEADLINE`."""
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + STOP_DEADLINE
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(STOP_DEADLINE)
        self.procs.clear()


def _run(argv: list[str], what: str, timeout: float) -> None:
    r = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    if r.returncode:
        raise ClusterError(f"{what}: {' '.join(argv)} exited {r.returncode}: "
                           f"{r.stderr.decode(errors='replace')[-2000:]}")


def _conf_text(root: Path, fsid: str, v2: int, v1: int) -> str:
    return f"""[global]
fsid = {fsid}
mon_host = [v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]
public_addr = 127.0.0.1
ms_bind_ipv6 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
run_dir = {root}/run
admin_socket = {root}/run/$name.asok
pid_file = {root}/run/$name.pid
log_file = {root}/log/$name.log
crash_dir = {root}/crash
exporter_sock_dir = {root}/run
osd_crush_chooseleaf_type = 0
osd_pool_default_size = 2
osd_pool_default_min_size = 1
mon_osd_reporter_subtree_level = osd
mon_osd_min_down_reporters = 1
mon_data_avail_warn = 5
mon_warn_on_insecure_global_id_reclaim_allowed = false
mon_warn_on_pool_no_redundancy = false
mon_allow_pool_delete = true
mon_allow_pool_size_one = true
osd_pool_default_pg_autoscale_mode = off
mgr_stats_period = 1
mgr_tick_period = 1

[mon]
mon_data = {root}/$name

[mgr]
mgr_data = {root}/$name
keyring = {root}/$name/keyring
mgr_initial_modules =
mgr_disabled_modules = {DISABLED_MGR_MODULES}

[osd]
osd_data = {root}/$name
keyring = {root}/$name/keyring
osd_objectstore = memstore
memstore_device_bytes = 1073741824
osd_max_object_name_len = 460
osd_max_object_namespace_len = 64

[client]
keyring = {root}/client.admin.keyring
"""


def start_cluster(root: Path, deadline: float = START_DEADLINE, *,
                  die_with_parent: bool = True) -> CephCluster:
    """Start a cluster under `root` (created; must be empty) and return it once pool `rbd`
    is initialised for RBD and all its PGs are active+clean. Raises `ClusterError` (after
    stopping whatever it started) when a step fails or `deadline` seconds pass. With
    `die_with_parent` (default) the daemons are killed when the calling process dies."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        raise ClusterError(f"{', '.join(missing)} not found: expected Debian's ceph-mon, "
                           "ceph-mgr, ceph-osd and ceph-base installed (scripts/bootstrap.sh)")
    t0 = time.monotonic()
    end = t0 + deadline
    root.mkdir(parents=True, exist_ok=True)
    for d in ("run", "log", "crash", "mon.a", "mgr.x", *(f"osd.{i}" for i in range(OSDS))):
        (root / d).mkdir()
    fsid = str(uuid.uuid4())
    v2, v1 = _free_port(), _free_port()
    conf = root / "ceph.conf"
    conf.write_text(_conf_text(root, fsid, v2, v1))
    cluster = CephCluster(root, conf, root / "client.admin.keyring",
                          die_with_parent=die_with_parent)

    # Keys: one monitor keyring holding every entity, and each daemon's own keyring.
    everyone = {"mon.": ({"mon": "allow *"}, None),
                "client.admin": ({"mon": "allow *", "osd": "allow *", "mgr": "allow *",
                                  "mds": "allow *"}, root / "client.admin.keyring"),
                "mgr.x": ({"mon": "allow profile mgr", "osd": "allow *", "mds": "allow *"},
                          root / "mgr.x" / "keyring")}
    for i in range(OSDS):
        everyone[f"osd.{i}"] = ({"mon": "allow profile osd", "mgr": "allow profile osd",
                                 "osd": "allow *"}, root / f"osd.{i}" / "keyring")
    mon_keyring = []
    for name, (caps, path) in everyone.items():
        entry = _keyring_entry(name, make_key(), caps)
        mon_keyring.append(entry)
        if path is not None:
            path.write_text(entry)
    (root / "mon.keyring").write_text("".join(mon_keyring))

    try:
        left = lambda: max(1.0, end - time.monotonic())  # noqa: E731
        _run(["monmaptool", "--create", "--fsid", fsid, "--addv", "a",
              f"[v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]", str(root / "monmap")],
             "monmaptool", left())
        _run(["ceph-mon", "-c", str(conf), "--mkfs", "-i", "a", "--monmap",
              str(root / "monmap"), "--keyring", str(root / "mon.keyring")], "mon mkfs", left())
        cluster.spawn("mon.a")
        cluster.spawn("mgr.x")
        admin = _connect(cluster, end)
        cluster.timings["mon up"] = time.monotonic() - t0
        try:
            _start_osds(cluster, admin, end)
            cluster.timings["osds up"] = time.monotonic() - t0
            admin.mon_command({"prefix": "osd pool create", "pool": POOL, "pg_num": PG_NUM,
                               "pgp_num": PG_NUM})
            for var, val in (("size", "2"), ("min_size", "1")):
                admin.mon_command({"prefix": "osd pool set", "pool": POOL, "var": var,
                                   "val": val})
            admin.mon_command({"prefix": "osd pool application enable", "pool": POOL,
                               "app": "rbd"})
            _wait_clean(cluster, admin, end)
            cluster.timings["pgs active+clean"] = time.monotonic() - t0
            io = admin.ioctx(POOL)
            try:
                io.pool_init()
            finally:
                io.close()
        finally:
            admin.shutdown()
    except BaseException:
        cluster.stop()
        raise
    cluster.start_seconds = time.monotonic() - t0
    return cluster


def _connect(cluster: CephCluster, end: float) -> Cluster:
    """client.admin connected to the new monitor (it needs a moment to listen)."""
    last: Exception | None = None
    while time.monotonic() < end:
        cluster._check_alive()
        try:
            return Cluster(str(cluster.conf), "admin", connect_timeout=5.0)
        except OSError as exc:
            last = exc
            time.sleep(0.2)  # the monitor is still binding its ports
    raise ClusterError(f"monitor not reachable before the deadline: {last}\n"
                       f"{cluster.log_tail()}")


def _start_osds(cluster: CephCluster, admin: Cluster, end: float) -> None:
    conf = str(cluster.conf)
    uuids = [str(uuid.uuid4()) for _ in range(OSDS)]
    for i, u in enumerate(uuids):
        out, _ = admin.mon_command({"prefix": "osd new", "uuid": u, "id": i})
        if str(out).strip() not in (str(i), f"{{'osdid': {i}}}") and out != {"osdid": i}:
            raise ClusterError(f"osd new gave id {out!r}, expected {i}")

    def mkfs(i: int) -> None:
        _run(["ceph-osd", "-c", conf, "--mkfs", "-i", str(i), "--osd-uuid", uuids[i]],
             f"osd.{i} mkfs", max(1.0, end - time.monotonic()))

    with ThreadPoolExecutor(OSDS) as pool:
        list(pool.map(mkfs, range(OSDS)))
    for i in range(OSDS):
        cluster.spawn(f"osd.{i}")
    _wait(cluster, end, "3 OSDs up and in", lambda: _osds_up(admin))


def _osds_up(admin: Cluster) -> bool:
    out, _ = admin.mon_command({"prefix": "osd stat", "format": "json"})
    return bool(out.get("num_up_osds") == OSDS and out.get("num_in_osds") == OSDS)


def all_clean(admin: Cluster) -> bool:
    """Every PG of the cluster is active+clean (one `status` monitor command)."""
    out, _ = admin.mon_command({"prefix": "status", "format": "json"})
    pgmap: dict[str, Any] = out.get("pgmap", {})
    states = pgmap.get("pgs_by_state", [])
    return bool(pgmap.get("num_pgs", 0) >= PG_NUM
                and all(s.get("state_name") == "active+clean" for s in states))


def _wait_clean(cluster: CephCluster, admin: Cluster, end: float) -> None:
    _wait(cluster, end, f"pool {POOL}: all PGs active+clean", lambda: all_clean(admin))


def _wait(cluster: CephCluster, end: float, what: str, ready: Any) -> None:
    """Poll `ready()` (one monitor command, cheap) every 0.2 s until it is true or `end`."""
    while time.monotonic() < end:
        cluster._check_alive()
        if ready():
            return
        time.sleep(0.2)
    raise ClusterError(f"{what}: not reached before the deadline\n{cluster.log_tail()}")


if __name__ == "__main__":
    c = start_cluster(Path(sys.argv[1]))
    print(f"conf {c.conf}: started in {c.start_seconds:.1f} s {c.timings}", flush=True)
    try:
        while all(p.poll() is None for p in c.procs.values()):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()
