"""Issue 13, "a package that installs": `pip install tcmu-py` (no extras) gives a daemon that
runs, and the commands that need an extra say which one."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from tcmu_py import cli

ROOT = Path(__file__).resolve().parents[2]

# What `tcmu-py serve` imports before it serves a device and while it follows netlink and udev.
_SERVE_MODULES = ("tcmu_py.cli", "tcmu_py.daemon.serve", "tcmu_py.daemon.netlink",
                  "tcmu_py.daemon.control", "tcmu_py.daemon.config", "tcmu_py.handler")

_PROBE = """
import importlib, json, sys
for m in sys.argv[1:]:
    importlib.import_module(m)
def installed(m):
    f = getattr(m, "__file__", None) or ""
    return "site-packages" in f or "dist-packages" in f
tops = {n.split('.')[0] for n, m in list(sys.modules.items()) if installed(m)}
print(json.dumps(sorted(tops - set(sys.stdlib_module_names) - {'tcmu_py'})))
"""


def _core_dependencies() -> set[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in deps}


def test_serve_imports_only_core_dependencies() -> None:
    """Every third-party package the serve path imports belongs to a core dependency (pyroute2,
    the netlink one until tcmu-py encoded netlink itself, was once in the `lio` extra: `tcmu-py
    serve` died with ModuleNotFoundError)."""
    from importlib.metadata import packages_distributions

    out = subprocess.run([sys.executable, "-c", _PROBE, *_SERVE_MODULES], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    dists = packages_distributions()
    core = _core_dependencies()
    # cffi's compiled half, and the finder of an editable install: not imports of ours.
    ignore = {"_cffi_backend", "_distutils_hack"}
    missing = {}
    for top in json.loads(out):
        if top in ignore or top.startswith("__editable__"):
            continue
        owners = {d.lower() for d in dists.get(top, [top])}
        if not owners & core:
            missing[top] = sorted(owners)
    assert not missing, f"serve imports packages outside the core dependencies: {missing}"


def test_serve_does_not_import_pyroute2() -> None:
    """The netlink code is tcmu-py's own: pyroute2's package import alone took 4.4 s of every
    daemon start in the lab's emulated guest (it loads every protocol it knows)."""
    out = subprocess.run([sys.executable, "-c", _PROBE, *_SERVE_MODULES], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    assert "pyroute2" not in json.loads(out)


def _no_rtslib(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "rtslib_fb" or m.startswith("rtslib_fb.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "rtslib_fb", None)  # `import rtslib_fb` raises ImportError


def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(textwrap.dedent(f"""
        state_dir: {tmp_path}/state
        devices:
          - {{name: d0, handler: "null", size: 1M}}
        exports:
          loopback: [{{device: d0}}]
    """))
    return cfg


@pytest.mark.parametrize("argv", [["apply"], ["serve", "--run-dir", "RUN"]])
def test_lio_command_without_rtslib_names_the_extra(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]) -> None:
    """Without rtslib-fb, `apply` and `serve -c` print one line naming the extra and exit 2,
    before anything is created (it was a ModuleNotFoundError traceback, exit 1)."""
    _no_rtslib(monkeypatch)
    argv = [str(tmp_path / "run") if a == "RUN" else a for a in argv]
    assert cli.main([*argv, "-c", str(_config(tmp_path))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    what = "serve -c" if argv[0] == "serve" else "apply"
    assert err == [f"tcmu-py: {what} needs rtslib-fb, which is not installed: "
                   "pip install 'tcmu-py[lio]'"], err
    assert not (tmp_path / "state").exists() and not (tmp_path / "run").exists()


def test_down_without_rtslib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    """`down` with nothing recorded needs no rtslib-fb (exit 0); with recorded objects it says
    which extra to install (one line, exit 2)."""
    from tcmu_py.daemon import lio
    from tcmu_py.daemon.config import load_config

    cfg = _config(tmp_path)
    _no_rtslib(monkeypatch)
    assert cli.main(["down", "-c", str(cfg)]) == 0
    lio.apply_backstores(load_config(cfg), backend=lio.MemoryBackend())
    assert lio.read_state(f"{tmp_path}/state")
    capsys.readouterr()
    assert cli.main(["down", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tcmu-py: LIO objects need rtslib-fb, which is not installed: "
                   "pip install 'tcmu-py[lio]'"], err
