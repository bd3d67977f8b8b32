"""The curated public API (tcmu_py/__init__.py): every exported name resolves to the object its
module defines, and ``import tcmu_py`` stays cheap (no submodule imported until a name is used:
the CLI's start time in an emulated VM is measured)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import tcmu_py


def test_all_names_resolve_to_their_definitions() -> None:
    assert tcmu_py.__all__ == sorted(set(tcmu_py.__all__))
    assert set(tcmu_py.__all__) == set(tcmu_py._EXPORTS)
    import importlib

    for name in tcmu_py.__all__:
        value = getattr(tcmu_py, name)
        assert value is getattr(importlib.import_module(tcmu_py._EXPORTS[name]), name), name
    assert set(tcmu_py.__all__) <= set(dir(tcmu_py))


def test_unknown_names_are_attribute_errors() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        tcmu_py.Nope  # noqa: B018
    assert not hasattr(tcmu_py, "Nope")


def test_the_names_a_handler_author_needs_do_not_collide() -> None:
    """One name, one thing: the handler class is not the device engine's callable alias, the
    SCSI command is not a handler's CLI subcommand."""
    from tcmu_py.device import core
    from tcmu_py.handler import Handler

    assert tcmu_py.Handler is Handler
    assert not hasattr(core, "Handler")
    assert tcmu_py.Command.__module__ == "tcmu_py.device.command"
    assert tcmu_py.CliCommand.__module__ == "tcmu_py.handler"
    for name in ("Unmap", "WriteSame", "LbaStatus", "ThinProvisioning", "Resizable", "Closable"):
        assert getattr(tcmu_py, name)._is_protocol, name  # the capability Protocols
    assert issubclass(tcmu_py.InvalidFieldInCdb, tcmu_py.IllegalRequest)
    assert issubclass(tcmu_py.IllegalRequest, tcmu_py.ScsiError)


def test_import_tcmu_py_imports_no_submodule() -> None:
    code = ("import sys, tcmu_py; print(sorted(m for m in sys.modules"
            " if m.startswith('tcmu_py.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "[]"
