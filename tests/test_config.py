"""Composed YAML configs with strict keys and dotted overrides."""

from dataclasses import dataclass, field

import pytest

from forcelab.config import load_config, to_yaml
from forcelab.errors import ConfigError
from forcelab.models import DiTConfig


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Run:
    name: str = "run"
    steps: int = 10
    window: int | None = None
    optim: Optim = field(default_factory=Optim)


def write(path, text):
    path.write_text(text)
    return path


def test_compose_base_file_and_overrides(tmp_path):
    write(tmp_path / "base.yaml", "steps: 100\noptim:\n  lr: 0.001\n")
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\nname: child\n")
    cfg = load_config(Run, [child], ["optim.lr=2e-6", "window=12"])
    assert isinstance(cfg, Run) and isinstance(cfg.optim, Optim)
    assert (cfg.name, cfg.steps, cfg.window, cfg.optim.lr) == ("child", 100, 12, 2e-6)
    assert cfg.optim.betas == (0.9, 0.999)
    assert "lr: 2.0e-06" in to_yaml(cfg)


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    bad = write(tmp_path / "bad.yaml", "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(Run, [bad])
    msg = str(err.value)
    assert "bad.yaml" in msg and "optim.lrr" in msg and "optim.lr" in msg
    with pytest.raises(ConfigError, match=r"command line: unknown config key 'stesp'.*steps"):
        load_config(Run, [], ["stesp=3"])


def test_bad_values_and_files(tmp_path):
    with pytest.raises(ConfigError, match="steps"):
        load_config(Run, [], ["steps=many"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Run, [tmp_path / "missing.yaml"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(Run, [], ["steps"])
    loop = write(tmp_path / "a.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(Run, [loop])
    write(tmp_path / "broken.yaml", "steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Run, [tmp_path / "broken.yaml"])


def test_dit_config_from_yaml(tmp_path):
    f = write(tmp_path / "dit.yaml", "dim: 128\nnum_heads: 4\npatch_size: [1, 2, 2]\nwindow_frames: 12\n")
    cfg = load_config(DiTConfig, [f])
    assert cfg.head_dim == 32 and cfg.window_frames == 12 and cfg.patch_size == (1, 2, 2)
    with pytest.raises(ConfigError, match="divisible by num_heads"):
        load_config(DiTConfig, [f], ["num_heads=5"])


def test_add_and_remove_overrides_apply_in_order(tmp_path):
    """Hydra's forms: ~key puts a setting (or a section) back to its default, +key only adds."""
    f = write(tmp_path / "run.yaml", "steps: 50\noptim:\n  lr: 0.5\n  betas: [0.1, 0.2]\n")
    cfg = load_config(Run, [f], ["~optim.lr", "~steps", "steps=7", "window=3", "++name=b"])
    assert (cfg.optim.lr, cfg.optim.betas, cfg.steps, cfg.window, cfg.name) == (1e-4, (0.1, 0.2), 7, 3, "b")
    assert load_config(Run, [f], ["~optim"]).optim == Optim()
    assert load_config(Run, [f], ["~steps", "steps=9"]).steps == 9
    assert load_config(Run, [f], ["steps=9", "~steps"]).steps == 10
    with pytest.raises(ConfigError, match=r"^command line: \+steps: 'steps' is already in the config"):
        load_config(Run, [f], ["+steps=3"])
    with pytest.raises(ConfigError, match=r"^command line: unknown config key 'optim.rl'; did you mean optim.lr"):
        load_config(Run, [f], ["~optim.rl"])
    with pytest.raises(ConfigError, match=r"'name' is a value, not a section"):
        load_config(Run, [f], ["~name.x"])
