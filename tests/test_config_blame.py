"""A bad config value is blamed on where it came from (command line or YAML file); a non-pool --pool says so."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from lmselect.artifacts import ArtifactError, read_manifest
from lmselect.cli import main
from lmselect.config import ConfigError, load_config


@dataclass
class _Optim:
    lr: float = 1e-3


@dataclass
class _Cfg:
    rounds: int = 3
    optim: _Optim = field(default_factory=_Optim)
    tags: list[int] = field(default_factory=list)


def test_command_line_value_blamed_on_command_line(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("rounds: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(_Cfg, y, ["--rounds=two"])
    assert str(e.value) == "command line: --rounds=two: config key 'rounds' must be int, got 'two'"
    with pytest.raises(ConfigError, match=r"^command line: --optim\.lr abc: config key 'optim\.lr' must be float"):
        load_config(_Cfg, y, ["--optim.lr", "abc"])
    with pytest.raises(ConfigError, match=r"^command line: --tags=1,x: config key 'tags\[1\]' must be int"):
        load_config(_Cfg, y, ["--tags=1,x"])
    with pytest.raises(ConfigError, match=r"^command line: --optimizer\.lr=1: unknown config key 'optimizer'"):
        load_config(_Cfg, y, ["--optimizer.lr=1"])


def test_yaml_value_blamed_on_file(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("rounds: two\n")
    with pytest.raises(ConfigError) as e:
        load_config(_Cfg, y, ["--optim.lr=0.1"])  # a good override does not take the blame
    assert str(e.value) == f"{y}: config key 'rounds' must be int, got 'two'"
    with pytest.raises(ConfigError, match="^config key 'rounds' must be int"):
        load_config(_Cfg, None, [], base={"rounds": "two"})


def test_cli_demo_bad_override_names_command_line(tmp_path, capsys):
    assert main(["demo", "--rounds=two", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "lmselect demo: error: command line: --rounds=two: config key 'rounds' must be int, got 'two'"
    assert not (tmp_path / "run").exists()  # nothing computed, nothing written


def test_pool_path_that_is_not_a_pool(tmp_path, capsys):
    d = tmp_path / "somedir"
    d.mkdir()
    (d / "notes.txt").write_text("x")
    with pytest.raises(ArtifactError) as e:
        read_manifest(d, kind="pool")
    assert str(e.value) == f"{d}: not a pool directory (no manifest.json); run lmselect prepare"
    assert main(["train", "--pool", str(d), "--out", str(tmp_path / "ck"), "--steps", "1"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"{d}: not a pool directory (no manifest.json); run lmselect prepare")
    (d / "tokens.bin").write_bytes(b"")  # a pool's data without its manifest: an interrupted prepare
    with pytest.raises(ArtifactError, match="incomplete artifact"):
        read_manifest(d, kind="pool")
