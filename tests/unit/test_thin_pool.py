"""Thin pools: pool.json, capacity vs the file system, locking, accounting across restarts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tcmu_py.errors import ConfigError
from tcmu_py.handlers.thin import (
    DEFAULT_UNIT,
    Pool,
    create_pool,
    ensure_pool,
    read_pool_status,
)
from tcmu_py.handlers.thin.pool import CONFIG_LOCK_FILE, POOL_FILE

UNIT = 16 * 1024


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_create_pool_writes_pool_json(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "p")
    create_pool(path, "fast", 1 << 30, 75)
    with open(os.path.join(path, POOL_FILE)) as f:
        doc = json.load(f)
    assert doc == {"version": 1, "name": "fast", "capacity": 1 << 30, "soft_threshold": 75,
                   "unit": DEFAULT_UNIT, "disks": {}}
    assert sorted(os.listdir(path)) == [CONFIG_LOCK_FILE, POOL_FILE]  # no temp file left
    with pytest.raises(ConfigError, match="already exists"):
        create_pool(path, "fast", 1 << 30)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "bad name"}, "pool name"),
        ({"capacity": 0}, "capacity"),
        ({"soft_threshold": 0}, "soft_threshold"),
        ({"soft_threshold": 101}, "soft_threshold"),
        ({"unit": 3 * 4096}, "power of two"),
        ({"unit": 1024}, "file-system block size"),  # smaller than the 4 KiB block
    ],
)
def test_create_pool_rejects(tmp_path: os.PathLike[str], kwargs: dict[str, object],
                             match: str) -> None:
    args: dict[str, object] = {"path": os.path.join(tmp_path, "p"), "name": "p",
                               "capacity": 1 << 20, **kwargs}
    with pytest.raises(ConfigError, match=match):
        create_pool(**args)  # type: ignore[arg-type]


def test_capacity_must_fit_the_file_system(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "p")
    too_big = free_bytes(str(tmp_path)) + (1 << 40)
    with pytest.raises(ConfigError, match=f"{path}: .*file system has only"):
        create_pool(path, "p", too_big)
    assert not os.path.exists(os.path.join(path, POOL_FILE))
    # A pool whose capacity no longer fits (the file system filled up, or pool.json was edited)
    # refuses to open, naming the path.
    create_pool(path, "p", 1 << 20)
    with open(os.path.join(path, POOL_FILE)) as f:
        doc = json.load(f)
    doc["capacity"] = too_big
    with open(os.path.join(path, POOL_FILE), "w") as f:
        json.dump(doc, f)
    with pytest.raises(ConfigError, match=f"{os.path.realpath(path)}: .*file system has only"):
        Pool.open(path)
    # The lock was released on failure: fixing the capacity makes it open.
    doc["capacity"] = 1 << 20
    with open(os.path.join(path, POOL_FILE), "w") as f:
        json.dump(doc, f)
    Pool.open(path).close()


def test_open_pools_on_one_file_system_are_counted_together(tmp_path: os.PathLike[str]) -> None:
    a, b = os.path.join(tmp_path, "a"), os.path.join(tmp_path, "b")
    free = free_bytes(str(tmp_path))
    share = free // 2 + free // 8  # each fits alone (62.5 %), both do not (125 %)
    create_pool(a, "a", share)
    create_pool(b, "b", share)
    with Pool.open(a):
        with pytest.raises(ConfigError, match="other open pools may still use"):
            Pool.open(b)
        with pytest.raises(ConfigError, match="other open pools may still use"):
            create_pool(os.path.join(tmp_path, "c"), "c", share)
    Pool.open(b).close()


def test_set_capacity_checks_the_file_system(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 1 << 20)
    with Pool.open(path) as pool:
        with pytest.raises(ConfigError, match="file system has only"):
            pool.set_capacity(free_bytes(path) + (1 << 40))
        pool.set_capacity(2 << 20)
    assert read_pool_status(path).capacity == 2 << 20


def test_pool_is_open_once(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 1 << 20)
    with Pool.open(path), pytest.raises(ConfigError, match="already open"):
        Pool.open(path)
    Pool.open(path).close()


def test_open_checks_pool_json(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "p")
    os.makedirs(path)
    with pytest.raises(ConfigError, match="missing pool.json"):
        Pool.open(path)
    with open(os.path.join(path, POOL_FILE), "w") as f:
        f.write('{"version": 1, "name": "p", "unit": 65536}')
    with pytest.raises(ConfigError, match=r"pool.json: capacity: got nothing, expected a"):
        Pool.open(path)
    create_pool(os.path.join(tmp_path, "q"), "q", 1 << 20)
    with pytest.raises(ConfigError, match="named 'q', expected 'other'"):
        Pool.open(os.path.join(tmp_path, "q"), expected_name="other")


def write_pattern(pool: Pool) -> dict[str, int]:
    a = pool.open_disk("a", 64 * UNIT)
    b = pool.open_disk("b", 64 * UNIT + 512, unit=2 * UNIT)
    for u in (0, 1, 5, 20, 63):
        a.write(u * UNIT + 3 * 512, [memoryview(b"a" * 4096)])
    b.write(64 * UNIT, [memoryview(b"b" * 512)])  # the short last unit
    b.write_same(0, 8 * UNIT, b"\x01" * 512, False)
    b.unmap(2 * UNIT, 2 * UNIT)
    used = {"a": pool.disk_used("a"), "b": pool.disk_used("b")}
    a.close()
    b.close()
    return used


def test_accounting_exact_after_reopen(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 1 << 22, unit=UNIT)
    with Pool.open(path) as pool:
        used = write_pattern(pool)
        assert used == {"a": 5 * UNIT, "b": 4 * 2 * UNIT}
        live = pool.status()
    offline = read_pool_status(path)
    assert (offline.used, offline.live) == (live.used, False)
    assert [(d.name, d.size, d.used, d.unit) for d in offline.disks] == [
        ("a", 64 * UNIT, used["a"], UNIT), ("b", 64 * UNIT + 512, used["b"], 2 * UNIT)]
    with Pool.open(path) as pool:
        assert pool.used == sum(used.values())
        assert pool.disk_used("a") == used["a"] and pool.disk_used("b") == used["b"]
        # A disk's unit is recorded and cannot change.
        with pytest.raises(ConfigError, match="created with unit 32768"):
            pool.open_disk("b", 64 * UNIT + 512, unit=UNIT)


def test_accounting_exact_after_crash(tmp_path: os.PathLike[str]) -> None:
    """A process that dies mid-life (no close, write cache not flushed) leaves exact figures."""
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 1 << 22, unit=UNIT)
    script = textwrap.dedent(f"""
        import os
        from tcmu_py.handlers.thin import Pool
        pool = Pool.open({path!r})
        d = pool.open_disk("d", 128 * {UNIT}, write_cache=True)
        for u in range(0, 128, 3):
            d.write(u * {UNIT}, [memoryview(b"x" * 1024)])
        d.unmap(0, 30 * {UNIT})
        print(pool.used, flush=True)
        os._exit(0)
    """)
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                         text=True).stdout
    with Pool.open(path) as pool:
        assert pool.used == int(out) == (43 - 10) * UNIT


def test_stray_disk_file_is_counted(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 1 << 22, unit=UNIT)
    with open(os.path.join(path, "stray.img"), "wb") as f:
        f.truncate(8 * UNIT)
        f.seek(3 * UNIT)
        f.write(b"s" * 10)
    assert read_pool_status(path).used == UNIT
    with Pool.open(path) as pool:
        assert pool.used == UNIT
        pool.open_disk("stray", 8 * UNIT).close()  # registers it
    with open(os.path.join(path, POOL_FILE)) as f:
        assert json.load(f)["disks"] == {"stray": {"unit": UNIT}}


def test_open_disk_never_truncates(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 1 << 22, unit=UNIT)
    with Pool.open(path) as pool:
        pool.open_disk("d", 8 * UNIT).close()
        with pytest.raises(ConfigError, match="larger than the device size"):
            pool.open_disk("d", 4 * UNIT)
        d = pool.open_disk("d", 16 * UNIT)  # grows
        assert os.fstat(d._fd).st_size == 16 * UNIT
        with pytest.raises(ConfigError, match="already open"):
            pool.open_disk("d", 16 * UNIT)
        d.close()
        with pytest.raises(ConfigError, match="multiple of the block size"):
            pool.open_disk("e", 1000)
        with pytest.raises(ConfigError, match="disk name"):
            pool.open_disk("../x", 4 * UNIT)


def test_delete_disk_returns_its_space(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 1 << 22, unit=UNIT)
    with Pool.open(path) as pool:
        d = pool.open_disk("d", 8 * UNIT)
        d.write(0, [memoryview(b"x" * UNIT * 2)])
        with pytest.raises(ConfigError, match="is open"):
            pool.delete_disk("d")
        d.close()
        pool.delete_disk("d")
        assert pool.used == 0 and pool.status().disks == ()
    assert not os.path.exists(os.path.join(path, "d.img"))


def test_ensure_pool_creates_then_updates(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "p")
    ensure_pool(path, "p", 1 << 20, 80, unit=UNIT)
    assert read_pool_status(path).capacity == 1 << 20
    ensure_pool(path, "p", 2 << 20, 60)
    status = read_pool_status(path)
    assert (status.capacity, status.soft_threshold, status.unit) == (2 << 20, 60, UNIT)
    with Pool.open(path) as pool:
        ensure_pool(path, "p", 3 << 20, 70)  # live pool updated in place
        assert (pool.capacity, pool.soft_threshold) == (3 << 20, 70)
        with pytest.raises(ConfigError, match="named 'p'"):
            ensure_pool(path, "other", 3 << 20, 70)
    assert read_pool_status(path).capacity == 3 << 20


def test_status_figures(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 8 * UNIT, 50, unit=UNIT)
    with Pool.open(path) as pool:
        d = pool.open_disk("d", 16 * UNIT)
        d.write(0, [memoryview(b"x" * 4 * UNIT)])
        s = pool.status()
        assert (s.available, s.percent_used, s.above_threshold) == (4 * UNIT, 50.0, True)
        assert s.as_dict()["disks"] == [
            {"name": "d", "size": 16 * UNIT, "used": 4 * UNIT, "unit": UNIT, "open": True}]
        assert read_pool_status(path) == s  # this process has it open: live figures
        d.close()


# ---------------------------------------------------------------------------------------------
# Two processes writing one pool.json (D12): `tcmu-py apply` while a daemon holds the pool


def _in_other_process(script: str, *args: str, wait: bool = True) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    return proc


APPLY = """
    import sys
    from tcmu_py.handlers.thin import ensure_pool
    ensure_pool(sys.argv[1], "p", int(sys.argv[2]), int(sys.argv[3]))
"""


def test_capacity_set_by_apply_survives_the_daemon_registering_a_disk(
        tmp_path: os.PathLike[str]) -> None:
    """The daemon's pool was open (pool.json in memory) when `apply` changed the capacity in
    another process; the daemon's next write (a new disk) must not put the old capacity back,
    and the daemon enforces the new one."""
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 1 << 20, 80, unit=UNIT)
    with Pool.open(path) as pool:
        _in_other_process(APPLY, path, str(2 << 20), "60")
        pool.open_disk("d1", 64 * UNIT).close()
        assert (pool.capacity, pool.soft_threshold) == (2 << 20, 60)
    with open(os.path.join(path, POOL_FILE)) as f:
        doc = json.load(f)
    assert (doc["capacity"], doc["soft_threshold"], sorted(doc["disks"])) == (2 << 20, 60, ["d1"])


def test_disk_registered_by_the_daemon_survives_apply(tmp_path: os.PathLike[str]) -> None:
    """`apply` read pool.json, the daemon registered a disk, then `apply` wrote: the disk must
    still be registered. The other process is held between its read and its write."""
    import threading

    from tcmu_py.testing import wait_until

    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 1 << 20, 80, unit=UNIT)
    read_done = os.path.join(tmp_path, "read.done")
    go = os.path.join(tmp_path, "go")
    slow_apply = """
        import os, sys, time
        from tcmu_py.handlers.thin import pool as pool_mod
        real = pool_mod.load_pool_config

        def held(path):  # read, then wait for the test to let the write happen
            config = real(path)
            open(sys.argv[4], "w").close()
            deadline = time.monotonic() + 30
            while not os.path.exists(sys.argv[5]) and time.monotonic() < deadline:
                time.sleep(0.01)
            return config

        pool_mod.load_pool_config = held
        pool_mod.ensure_pool(sys.argv[1], "p", int(sys.argv[2]), int(sys.argv[3]))
    """
    with Pool.open(path) as pool:
        proc = _in_other_process(slow_apply, path, str(2 << 20), "80", read_done, go, wait=False)
        assert wait_until(lambda: os.path.exists(read_done), 30, 0.01)
        register = threading.Thread(target=lambda: pool.open_disk("d1", 64 * UNIT).close())
        register.start()
        register.join(timeout=0.5)  # done at once without a lock; waits for apply with one
        open(go, "w").close()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        register.join(timeout=30)
        assert not register.is_alive()
        assert pool.capacity == 2 << 20
    with open(os.path.join(path, POOL_FILE)) as f:
        doc = json.load(f)
    assert (doc["capacity"], sorted(doc["disks"])) == (2 << 20, ["d1"])


def test_racing_registrations_and_capacity_changes_lose_nothing(
        tmp_path: os.PathLike[str]) -> None:
    """One process registers 40 disks while another changes capacity and threshold 40 times
    (each change a whole `ensure_pool`, as `tcmu-py apply` does): every registration and the
    last capacity are in pool.json at the end."""
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 1 << 20, 80, unit=UNIT)
    churn = """
        import sys
        from tcmu_py.handlers.thin import ensure_pool
        for i in range(40):
            ensure_pool(sys.argv[1], "p", (1 << 20) + (i + 1) * 65536, 50 + i)
    """
    with Pool.open(path) as pool:
        proc = _in_other_process(churn, path, wait=False)
        for i in range(40):
            pool.open_disk(f"d{i}", 64 * UNIT).close()
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    with open(os.path.join(path, POOL_FILE)) as f:
        doc = json.load(f)
    assert sorted(doc["disks"]) == sorted(f"d{i}" for i in range(40))
    assert (doc["capacity"], doc["soft_threshold"]) == ((1 << 20) + 40 * 65536, 89)
