"""Operator inputs that `check` passed and `apply`/`status` then failed on with a traceback, or
with damage (an operations audit): each is now a configuration error naming the file, the key
and what was expected, before anything is touched."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from tcmu_py.daemon.config import load_config_text
from tcmu_py.errors import ConfigError, TcmuError


def problems(text: str) -> str:
    with pytest.raises(ConfigError) as ei:
        load_config_text(textwrap.dedent(text), "cfg.yaml")
    return str(ei.value)


def _raw(tmp_path: Path, image: str, size: str = "1M") -> str:
    return f"""
        state_dir: {tmp_path}/state
        devices:
          - name: d0
            handler: raw
            size: {size}
            options: {{path: "{image}"}}
    """


@pytest.mark.parametrize(("image", "expected"), [
    ("{tmp}", "an image file or a block device, not a directory"),
    ("/dev/null", "an image file or a block device, not a character device"),
    ("{tmp}/state/lio-state.json", "an image path other than tcmu-py's own state file"),
    ("/tmp/a\\0b.img", "an absolute path"),
])
def test_a_raw_image_path_apply_cannot_use_is_refused(tmp_path: Path, image: str,
                                                       expected: str) -> None:
    text = problems(_raw(tmp_path, image.replace("{tmp}", str(tmp_path))))
    assert "cfg.yaml: devices[0].options.path: got" in text and expected in text, text


def test_a_missing_image_still_passes_check(tmp_path: Path) -> None:
    """`apply` creates it: only what exists and cannot be an image is refused."""
    cfg = load_config_text(textwrap.dedent(_raw(tmp_path, f"{tmp_path}/new.img")), "cfg.yaml")
    assert cfg.device("d0").options_dict()["path"] == f"{tmp_path}/new.img"
    assert not os.path.exists(f"{tmp_path}/new.img")


def test_a_size_beyond_64_bits_is_refused(tmp_path: Path) -> None:
    text = problems(_raw(tmp_path, f"{tmp_path}/x.img", size="999999999999P"))
    assert "devices[0].size: got '999999999999P', expected a size of at most" in text


def _iscsi(tmp_path: Path, iqn: str = "iqn.2003-01.org.x:t", attrs: str = "{}") -> str:
    return f"""
        state_dir: {tmp_path}/state
        devices:
          - {{name: d0, handler: raw, size: 1M}}
        exports:
          iscsi:
            - iqn: {iqn}
              generate_node_acls: true
              attributes: {attrs}
              luns: [{{device: d0, lun: 0}}]
    """


@pytest.mark.parametrize(("attrs", "key", "expected"), [
    ("{default_erl: 5}", "default_erl", "an integer 0..2"),
    ("{authentication: 7}", "authentication", "an integer 0..1"),
    ("{login_timeout: 4}", "login_timeout", "an integer 5..30"),
    ("{default_cmdsn_depth: 1024}", "default_cmdsn_depth", "an integer 1..512"),
    ("{fabric_prot_type: 2}", "fabric_prot_type", "one of 0, 1, 3"),
])
def test_tpg_attribute_values_the_kernel_refuses_are_refused(tmp_path: Path, attrs: str,
                                                             key: str, expected: str) -> None:
    text = problems(_iscsi(tmp_path, attrs=attrs))
    assert f"exports.iscsi[0].attributes.{key}: got" in text and expected in text, text


def test_tpg_attribute_values_the_kernel_takes_pass(tmp_path: Path) -> None:
    load_config_text(textwrap.dedent(_iscsi(
        tmp_path, attrs="{default_erl: 2, login_timeout: 30, default_cmdsn_depth: 512, "
        "fabric_prot_type: 3}")), "cfg.yaml")


def test_an_iqn_longer_than_223_bytes_is_refused(tmp_path: Path) -> None:
    long = "iqn.2003-01.org.example:" + "a" * 200
    assert len(long) == 224
    text = problems(_iscsi(tmp_path, iqn=long))
    assert "exports.iscsi[0].iqn: got" in text and "at most 223 bytes" in text
    load_config_text(textwrap.dedent(_iscsi(tmp_path, iqn=long[:-1])), "cfg.yaml")


def test_status_with_an_error_answer_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    """The daemon's error answer ({"error": ...}) made `tcmu-py status` die with a KeyError;
    and a handler status value JSON has no form for turned the whole answer into one."""
    from tcmu_py.daemon.control import ControlServer, query_status

    def failing() -> dict[str, object]:
        raise RuntimeError("boom")

    server = ControlServer(tmp_path / "control.sock", {"status": failing})
    server.start()
    try:
        with pytest.raises(TcmuError, match="could not answer the status request.*boom"):
            query_status(tmp_path)
    finally:
        server.close()
    server = ControlServer(tmp_path / "control.sock",
                           {"status": lambda: {"devices": [], "x": {"path": Path("/a")}}})
    server.start()
    try:
        assert query_status(tmp_path)["x"] == {"path": "/a"}
    finally:
        server.close()


def test_a_missing_raw_image_is_made_with_a_warning(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A missing image is made empty (targetcli's user:raw relies on it, as on tcmu-runner's
    file handler); before, silently: an image whose file system was not mounted yet became a
    blank disk with nothing in the log."""
    from tcmu_py.handlers.raw import RawBackend

    img = tmp_path / "gone.img"
    backend = RawBackend(str(img), 1 << 20, 512)
    try:
        assert img.stat().st_size == 1 << 20
        assert f"image {img} did not exist: created empty" in caplog.text
    finally:
        os.close(backend.fd)
    caplog.clear()
    backend = RawBackend(str(img), 1 << 20, 512)  # there now: no warning
    os.close(backend.fd)
    assert "did not exist" not in caplog.text


def test_a_thin_pool_and_a_dedup_pool_cannot_share_a_directory(tmp_path: Path) -> None:
    """Before: `check` passed; `apply` made the dedup pool, then the thin pool failed on its
    pool.json ("version: got 3, expected 1")."""
    text = problems(f"""
        state_dir: {tmp_path}/state
        pools: [{{name: p, path: {tmp_path}/pool, capacity: 1G}}]
        dedup_pools: [{{name: q, path: {tmp_path}/pool/, capacity: 1G}}]
    """)
    assert "expected a directory no other pool or library uses" in text, text


def _library(tmp_path: Path, media_dir: str, cartridges: str) -> str:
    return f"""
        state_dir: {tmp_path}/state
        libraries:
          - {{name: L, changer: ch, media_dir: {media_dir}, slots: 4, drives: [{{name: dr}}],
              cartridges: {cartridges}}}
    """


def test_a_library_media_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    """Before: `check` passed, `apply` died with a NotADirectoryError traceback."""
    (tmp_path / "afile").write_text("x")
    text = problems(_library(tmp_path, f"{tmp_path}/afile", "[ABC000L8]"))
    assert "libraries[0].media_dir: got" in text and "it is a file" in text, text


def test_a_barcode_listed_twice_is_refused(tmp_path: Path) -> None:
    """Before: `check` passed; `apply` wrote library.json, then refused the second cartridge
    with a message naming neither the file nor the key."""
    text = problems(_library(tmp_path, f"{tmp_path}/lib", "[ABC000L8..ABC002L8, ABC002L8]"))
    assert "libraries[0].cartridges[1]: got 'ABC002L8', expected barcodes not listed before" \
        in text, text


def test_a_library_and_a_pool_cannot_share_a_directory(tmp_path: Path) -> None:
    text = problems(f"pools: [{{name: p, path: {tmp_path}/d, capacity: 1G}}]\n"
                    + textwrap.dedent(_library(tmp_path, f"{tmp_path}/d", "[ABC000L8]")))
    assert "expected a directory no other pool or library uses" in text, text


@pytest.mark.parametrize("other", ["raw", "mirror"])
def test_a_mirror_leg_is_no_other_devices_image(tmp_path: Path, other: str) -> None:
    """Before: a raw disk on a mirror's leg, or two mirrors sharing one, passed `check`: both
    devices would write the file (the mirror's metadata at its end too)."""
    leg = f"{tmp_path}/leg1.img"
    first = (f'{{name: d0, handler: raw, size: 1M, options: {{path: "{leg}"}}}}'
             if other == "raw" else
             f'{{name: d0, handler: mirror, size: 1M, options: {{legs: ["{leg}", '
             f'"{tmp_path}/leg0.img"]}}}}')
    text = problems(f"""
        state_dir: {tmp_path}/state
        devices:
          - {first}
          - {{name: m1, handler: mirror, size: 1M,
              options: {{legs: ["{tmp_path}/leg2.img", "{tmp_path}/./leg1.img"]}}}}
    """)
    assert "devices[1].options: got" in text and "expected an image file of its own (d0 uses" \
        in text, text


def test_yaml_merge_keys_work(tmp_path: Path) -> None:
    """`<<: *anchor` (YAML's merge key, common in configurations with repeated settings) was
    refused with PyYAML's internal "could not determine a constructor for the tag"."""
    cfg = load_config_text(textwrap.dedent(f"""
        state_dir: {tmp_path}/state
        devices:
          - &d0 {{name: d0, handler: raw, size: 1M, block_size: 4096}}
          - {{<<: *d0, name: d1, size: 2M}}
    """), "cfg.yaml")
    assert [(d.name, d.handler, d.size, d.block_size) for d in cfg.devices] == [
        ("d0", "raw", 1 << 20, 4096), ("d1", "raw", 2 << 20, 4096)]
    text = problems(f"""
        state_dir: {tmp_path}/state
        devices:
          - {{name: d0, handler: raw, size: 1M, size: 2M}}
    """)
    assert "duplicate key 'size'" in text, text
