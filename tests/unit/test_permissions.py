"""Everything tcmu-py creates for `apply` and `serve` is private to it: directories 0700, files
and the control socket 0600, under the usual umask 022 (which would leave 0755/0644).

The run is `tcmu-py apply`'s storage steps (thin pools, raw images, the LIO state file, with
the LIO objects in the in-memory backend) followed by the daemon serving the configuration's
devices from the fake host of test_daemon.py (run directory, lock file, control socket, the
thin disk file and pool lock files the handler creates). Then every path under the state
directory and the run directory is checked.
"""

from __future__ import annotations

import os
import stat
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_daemon import Host, make_daemon

from tcmu_py import cli
from tcmu_py.daemon import lio
from tcmu_py.daemon.config import dev_config_string, load_config_text
from tcmu_py.daemon.serve import Daemon
from tcmu_py.handlers.null import NullHandler
from tcmu_py.handlers.raw import RawHandler
from tcmu_py.handlers.thin import ThinHandler
from tcmu_py.testing import cdbs


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path, base: Path) -> dict[str, str]:
    """Path relative to `base` -> "dir 700" / "file 600" / "socket 600" for `root` and
    everything under it."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for p in [Path(dirpath)] * (Path(dirpath) == root) + [
                Path(dirpath) / n for n in [*dirnames, *filenames]]:
            st = p.lstat()
            kind = ("dir" if stat.S_ISDIR(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode)
                    else "file" if stat.S_ISREG(st.st_mode) else "other")
            out[str(p.relative_to(base))] = f"{kind} {st.st_mode & 0o777:o}"
    return out


def test_everything_the_daemon_creates_is_private(tmp_path: Path, umask_022: None) -> None:
    state = tmp_path / "var" / "tcmu"
    config = load_config_text(textwrap.dedent(f"""
        state_dir: {state}
        pools:
          - {{name: main, path: {state}/pools/main, capacity: 64M}}
        devices:
          - {{name: disk0, handler: raw, size: 4M}}
          - {{name: disk1, handler: raw, size: 4M, options: {{path: {state}/images/d1.img}}}}
          - {{name: thin0, handler: thin, size: 4M, pool: main}}
        exports:
          loopback: [{{device: disk0}}, {{device: thin0}}]
    """), "perm.yaml")
    # `tcmu-py apply`, storage side: pools, images, the LIO state file.
    cli._prepare_pools(config)
    backend = lio.MemoryBackend()
    lio.apply_backstores(config, backend)
    lio.apply_exports(config, backend)
    # `tcmu-py serve`: the devices on the fake host.
    host = Host(tmp_path / "host")
    for i, dev in enumerate(config.devices):
        host.add(f"uio{i}", i, dev.name, dev_config_string(dev), dev.size)
    d = Daemon(handlers={"raw": RawHandler, "null": NullHandler, "thin": ThinHandler},
               configfs_root=host.configfs, uio_class=host.uio_class, run_dir=tmp_path / "run",
               use_netlink=False, use_udev=False, uio_opener=host.open_uio)
    d.start()
    try:
        assert all(s.failed is None for s in d.served.values())
        for node in ("uio0", "uio1", "uio2"):
            host.run(node, cdbs.test_unit_ready())
            assert host.run(node, cdbs.write10(0, 8), data_out=b"x" * 4096).good
        found = {**modes(tmp_path / "var", tmp_path), **modes(tmp_path / "run", tmp_path)}
    finally:
        d.shutdown()
    expected = {
        "var": "dir 700",  # created for the first pool, as a parent of its directory
        "var/tcmu": "dir 700",
        "var/tcmu/lio-state.json": "file 600",
        "var/tcmu/disk0.img": "file 600",
        "var/tcmu/images": "dir 700",
        "var/tcmu/images/d1.img": "file 600",
        "var/tcmu/pools": "dir 700",
        "var/tcmu/pools/main": "dir 700",
        "var/tcmu/pools/main/pool.json": "file 600",
        "var/tcmu/pools/main/.lock": "file 600",
        "var/tcmu/pools/main/.pool.json.lock": "file 600",
        "var/tcmu/pools/main/thin0.img": "file 600",
        "run": "dir 700",
        "run/daemon.lock": "file 600",
        "run/control.sock": "socket 600",
    }
    assert found == expected


def test_existing_lock_file_open_to_others_is_tightened(tmp_path: Path, umask_022: None) -> None:
    host = Host(tmp_path / "host")
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    (run / "daemon.lock").write_text("123\n")
    (run / "daemon.lock").chmod(0o666)
    d = make_daemon(host, tmp_path)
    d.start()
    try:
        assert (run / "daemon.lock").stat().st_mode & 0o777 == 0o600
        assert (run / "daemon.lock").read_text() == f"{os.getpid()}\n"
    finally:
        d.shutdown()
