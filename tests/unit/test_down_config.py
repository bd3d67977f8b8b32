"""`tcmu-py down` reads only the configuration's ``state_dir`` (`config.load_state_dir`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tcmu_py import cli
from tcmu_py.daemon import lio
from tcmu_py.daemon.config import DEFAULT_STATE_DIR, load_config, load_state_dir
from tcmu_py.errors import ConfigError


def test_state_dir_of_a_valid_file_is_the_full_loaders(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(f"state_dir: {tmp_path}/state\n"
                 "devices:\n  - {name: d0, handler: 'null', size: 1M}\n")
    assert load_state_dir(f) == load_config(f).state_dir == f"{tmp_path}/state"


def test_default_is_the_embedded_configurations() -> None:
    assert load_state_dir(None) == DEFAULT_STATE_DIR


def test_the_rest_of_the_file_is_not_looked_at(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(f"state_dir: {tmp_path}\ndevices:\n  - {{name: d0, handler: gone}}\nbogus: 1\n")
    with pytest.raises(ConfigError):
        load_config(f)
    assert load_state_dir(f) == str(tmp_path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("state_dir: relative/dir\n", "state_dir: got 'relative/dir', expected an absolute path"),
        ("- a list\n", "got ['a list'], expected a mapping"),
        ("state_dir: [1\n", "line 2 column 1"),
    ],
)
def test_a_bad_state_dir_is_named(tmp_path: Path, text: str, expected: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_state_dir(f)
    assert str(f) in str(e.value) and expected in str(e.value)


def test_down_takes_down_a_file_that_no_longer_validates(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    monkeypatch.setattr(lio, "down", lambda state_dir: seen.append(str(state_dir)) or [])
    f = tmp_path / "c.yaml"
    f.write_text(f"state_dir: {tmp_path}\ndevices:\n  - {{name: d0, handler: gone}}\n")
    assert cli.main(["down", "-c", str(f)]) == 0
    assert seen == [str(tmp_path)]
    assert cli.main(["down", "-c", str(tmp_path / "missing.yaml")]) == 2
