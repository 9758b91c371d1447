"""speechssl.config: typed dataclass configs from YAML with dotted overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from speechssl.config import ConfigError, apply_override, from_dict, load_config, to_dict, to_yaml


@dataclass
class Inner:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    steps: int = 10
    name: str = "adam"
    kind: Literal["linear", "cosine"] = "linear"

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    dirs: list[str] = field(default_factory=list)
    layers: list[tuple[int, int, int]] = field(default_factory=lambda: [(512, 10, 5), (512, 3, 2)])
    out: Optional[str] = None
    flag: bool = True
    limit: float | None = None
    tags: dict[str, int] = field(default_factory=dict)


def test_defaults_and_nested_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("inner:\n  lr: 2\n  betas: [0.8, 0.9]\ndirs: [a, b]\nlayers: [[64, 3, 2]]\n")
    cfg = load_config(Outer, p)
    assert cfg.inner.lr == 2.0 and isinstance(cfg.inner.lr, float)  # int accepted for float
    assert cfg.inner.betas == (0.8, 0.9)
    assert cfg.inner.steps == 10  # default kept
    assert cfg.dirs == ["a", "b"]
    assert cfg.layers == [(64, 3, 2)]


def test_overrides_types():
    cfg = load_config(
        Outer,
        None,
        [
            "inner.lr=1e-4",  # YAML 1.1 reads this as a string; a float field accepts it
            "inner.steps=20",
            "inner.name=001",  # str fields take the text verbatim
            "dirs=[x/y, z]",
            "flag=false",
            "out=exp/run1",
            "limit=3",
            "inner.kind=cosine",
            "tags={a: 1}",
        ],
    )
    assert cfg.inner.lr == pytest.approx(1e-4)
    assert cfg.inner.steps == 20
    assert cfg.inner.name == "001"
    assert cfg.dirs == ["x/y", "z"]
    assert cfg.flag is False
    assert cfg.out == "exp/run1"
    assert cfg.limit == 3.0
    assert cfg.inner.kind == "cosine"
    assert cfg.tags == {"a": 1}
    cfg = load_config(Outer, None, ["out=null", "limit=null"])
    assert cfg.out is None and cfg.limit is None


def test_unknown_keys_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'inner\.lrr'.*did you mean 'inner\.lr'"):
        load_config(Outer, None, ["inner.lrr=1"])
    p = tmp_path / "bad.yaml"
    p.write_text("inner:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'inner\.stepz' in .*bad\.yaml.*did you mean 'inner\.steps'"):
        load_config(Outer, p)
    with pytest.raises(ConfigError, match=r"unknown key 'nope'"):
        load_config(Outer, None, ["nope.x=1"])
    with pytest.raises(ConfigError, match=r"'flag' is a bool, not a section"):
        load_config(Outer, None, ["flag.x=1"])


def test_type_errors_are_named():
    with pytest.raises(ConfigError, match=r"'inner\.steps'.*expected int, got 'ten'"):
        load_config(Outer, None, ["inner.steps=ten"])
    with pytest.raises(ConfigError, match=r"'inner\.steps'.*expected int, got 2\.5"):
        load_config(Outer, None, ["inner.steps=2.5"])
    with pytest.raises(ConfigError, match=r"'flag'.*expected bool"):
        load_config(Outer, None, ["flag=1"])
    with pytest.raises(ConfigError, match=r"'inner\.kind'.*one of 'linear', 'cosine'"):
        load_config(Outer, None, ["inner.kind=step"])
    with pytest.raises(ConfigError, match=r"'layers\[0\]'.*3 items"):
        load_config(Outer, None, ["layers=[[1, 2]]"])
    with pytest.raises(ConfigError, match=r"must look like key=value"):
        load_config(Outer, None, ["inner.lr"])
    with pytest.raises(ConfigError, match=r"'dirs'.*expected list"):
        from_dict(Outer, {"dirs": "a"})


def test_post_init_runs_after_overrides():
    with pytest.raises(ConfigError, match=r"lr must be > 0"):
        load_config(Outer, None, ["inner.lr=-1"])


def test_yaml_round_trip():
    cfg = load_config(Outer, None, ["inner.lr=0.5", "dirs=[a]", "tags={x: 2}"])
    text = to_yaml(cfg)
    data = yaml.safe_load(text)
    assert data["inner"]["lr"] == 0.5
    assert from_dict(Outer, data) == cfg
    assert to_dict(cfg)["layers"] == [[512, 10, 5], [512, 3, 2]]


def test_apply_override_in_place():
    cfg = Outer()
    apply_override(cfg, "inner.steps=7")
    assert cfg.inner.steps == 7


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"x\.yaml: top level must be a mapping"):
        load_config(Outer, p)
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(Outer, tmp_path / "missing.yaml")
