"""Fault injection: YAML configs, overrides and the DiTConfig schema (config.py, models/config.py).

Every bad input is one ConfigError line naming the file (or "command line") and the key,
without echoing a wrong file's content; valid-but-surprising inputs keep their stated meaning.
"""

import dataclasses
from pathlib import Path

import pytest

from forcelab.config import load_config
from forcelab.errors import ConfigError
from forcelab.models import DiTConfig


@dataclasses.dataclass
class Optim:
    lr: float = 1e-4
    steps: int = 10
    ema: bool = False


@dataclasses.dataclass
class Run:
    name: str = "run"
    optim: Optim = dataclasses.field(default_factory=Optim)
    tags: list = dataclasses.field(default_factory=list)


def write(path: Path, text, mode="w"):
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def error_of(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(Run, *args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and "for 'None'" not in msg, msg
    return msg


# (file content, substrings the one-line error must contain)
BAD_FILES = {
    "base-int": ("_base_: 5\n", ["_base_ must be a file name"]),
    "base-empty-list": ("_base_: []\n", ["_base_ must be a file name"]),
    "base-mapping": ("_base_: {a: 1}\n", ["_base_ must be a file name"]),
    "base-missing": ("_base_: nope.yaml\n", ["config file not found", "nope.yaml"]),
    "base-not-yaml": ("_base_: notes.txt\n", ["not a YAML config file"]),
    "interpolation": ("name: ${missing.key}\n", ["'name' refers to something that does not exist", "missing.key"]),
    "section-as-value": ("optim: 5\n", ["'optim' is a section", "optim.lr"]),
    "value-as-section": ("name:\n  a: 1\n", ["bad value for 'name'"]),
    "bad-int": ("optim:\n  steps: abc\n", ["bad value for 'optim.steps'"]),
    "null-string": ("name: null\n", ["bad value for 'name'"]),
    "unknown-key": ("optim:\n  lrr: 0.1\n", ["unknown config key 'optim.lrr'", "optim.lr"]),
    "top-level-list": ("- a\n- b\n", ["top level must be a mapping"]),
    "top-level-scalar": ("hello\n", ["top level must be a mapping"]),
    "duplicate-key": ("name: a\nname: b\n", ["not valid YAML"]),
    "broken-yaml": ("steps: [1,\n", ["not valid YAML"]),
    "tab-indent": ("optim:\n\tlr: 1\n", ["not valid YAML"]),
    "latin1": (b"name: caf\xe9\n", ["not UTF-8", ":1"]),
    "binary": (b"\x00\x01\x02\xff\xfe", ["not UTF-8"]),
    "non-string-key": ("1: a\n", ["not a forcelab config"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_config_files_are_one_clear_line(tmp_path, case):
    write(tmp_path / "notes.txt", "x")
    text, expected = BAD_FILES[case]
    f = write(tmp_path / f"{case}.yaml", text)
    msg = error_of([f])
    for part in expected:
        assert part in msg, (case, msg)
    assert str(f) in msg or "config:" in msg or "nope.yaml" in msg or "notes.txt" in msg


def test_a_system_file_as_base_is_not_echoed(tmp_path):
    secret = write(tmp_path / "passwd", "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin\n")
    msg = error_of([write(tmp_path / "a.yaml", f"_base_: {secret}\n")])
    assert "not a YAML config file" in msg and "root:x" not in msg
    # the same content under a .yaml name: an unknown key, shown truncated
    copy = write(tmp_path / "copy.yaml", "root:x:0:0:root:/root:/bin/bash" * 10 + ": 1\n")
    msg = error_of([copy])
    assert "unknown config key" in msg and len(msg) < len(str(copy)) + 200


def test_missing_file_and_cycle(tmp_path):
    assert "config file not found" in error_of([tmp_path / "missing.yaml"])
    assert "cycle" in error_of([write(tmp_path / "a.yaml", "_base_: a.yaml\n")])


@pytest.mark.parametrize("word", ["NO", "no", "Yes", "off", "ON", "y", "n"])
def test_yaml11_booleans_stay_strings_for_string_fields(tmp_path, word):
    assert load_config(Run, [write(tmp_path / "a.yaml", f"name: {word}\n")]).name == word
    assert load_config(Run, [], [f"name={word}"]).name == word


def test_booleans_and_numbers_keep_their_types(tmp_path):
    cfg = load_config(Run, [write(tmp_path / "a.yaml", "optim:\n  ema: yes\n  lr: 1e-5\n  steps: 3\n")])
    assert cfg.optim.ema is True and cfg.optim.lr == 1e-5 and cfg.optim.steps == 3
    assert load_config(Run, [], ["optim.ema=true", "optim.lr=2e-6"]).optim.lr == 2e-6


def test_bom_config_is_read(tmp_path):
    f = write(tmp_path / "a.yaml", "\ufeffname: bom\n".encode("utf-8"))
    assert load_config(Run, [f]).name == "bom"


def test_empty_file_means_defaults(tmp_path):
    assert load_config(Run, [write(tmp_path / "a.yaml", "")]) == Run()


BAD_OVERRIDES = {
    "no-equals": (["optim.lr"], "must look like key.sub=value"),
    "empty-key": (["=3"], "must look like key.sub=value"),
    "double-dot": (["optim..lr=3"], "must look like key.sub=value"),
    "unknown": (["optim.lrr=3"], "unknown config key 'optim.lrr'"),
    "bad-int": (["optim.steps=abc"], "bad value for 'optim.steps'"),
    "section": (["optim=3"], "'optim' is a section"),
    "interpolation": (["name=${oops}"], "refers to something that does not exist"),
    "below-value": (["name=a", "name.x=1"], "sets a key below a value"),
    "broken-yaml": (["tags=[1,"], "not valid YAML"),
}


@pytest.mark.parametrize("case", sorted(BAD_OVERRIDES))
def test_bad_overrides_are_one_clear_line(case):
    overrides, expected = BAD_OVERRIDES[case]
    msg = error_of([], overrides)
    assert expected in msg and (msg.startswith("command line") or msg.startswith("config:")), msg


# ---------------------------------------------------------------------- DiTConfig
BAD_DIT = {
    "num_heads-0": (dict(num_heads=0), "num_heads must be a whole number >= 1, got 0"),
    "num_layers--1": (dict(num_layers=-1), "num_layers must be a whole number >= 1, got -1"),
    "dim-0": (dict(dim=0), "dim must be a whole number >= 1"),
    "dim-float": (dict(dim=64.5), "dim must be a whole number"),
    "dim-bool": (dict(dim=True), "dim must be a number"),
    "text_len-0": (dict(text_len=0), "text_len must be"),
    "rope_max_len-0": (dict(rope_max_len=0), "rope_max_len must be"),
    "chunk_frames-0": (dict(chunk_frames=0), "chunk_frames must be"),
    "window-0": (dict(window_frames=0), "window_frames (None: no window) must be"),
    "sink--1": (dict(sink_frames=-1), "sink_frames must be a whole number >= 0"),
    "eps-0": (dict(eps=0.0), "eps must be > 0"),
    "eps-nan": (dict(eps=float("nan")), "eps must be a finite number"),
    "theta-inf": (dict(rope_theta=float("inf")), "rope_theta must be a finite number"),
    "patch-2d": (dict(patch_size=(2, 2)), "patch_size must be 3 numbers"),
    "patch-0": (dict(patch_size=(1, 0, 2)), "patch_size entries must be"),
    "freq-odd": (dict(freq_dim=63), "freq_dim (63) must be even"),
    "heads-indivisible": (dict(num_heads=5), "divisible by num_heads"),
    "backend": (dict(attention_backend="cuda"), "attention_backend must be one of None, torch, triton"),
    "sink_rope": (dict(sink_rope="far"), "sink_rope must be one of"),
}


@pytest.mark.parametrize("case", sorted(BAD_DIT))
def test_dit_config_numbers_are_checked_once_at_construction(case):
    changes, expected = BAD_DIT[case]
    with pytest.raises(ConfigError) as e:
        DiTConfig.preset("toy", **changes)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_dit_config_from_yaml_reports_the_bad_number(tmp_path):
    f = write(tmp_path / "dit.yaml", "num_heads: 0\n")
    with pytest.raises(ConfigError, match="num_heads must be a whole number >= 1"):
        load_config(DiTConfig, [f])


def test_valid_dit_configs_still_build():
    cfg = DiTConfig.preset("toy", window_frames=None, sink_frames=0, patch_size=[1, 2, 2])
    assert cfg.patch_size == (1, 2, 2) and cfg.window_frames is None
    assert DiTConfig.preset("toy", num_layers=1, attention_backend="torch").num_layers == 1


# ---------------------------------------------------------------------- the shared validators
def test_validators_convert_or_name_the_thing():
    import argparse

    from forcelab.errors import ForcelabError
    from forcelab.validate import arg, choice, in_range, non_negative_int, optional, positive_float, positive_int

    assert positive_int("3", "--x") == 3 and positive_int(4.0, "--x") == 4 and non_negative_int(0, "--x") == 0
    assert positive_float("1e-3", "--lr") == 1e-3 and optional(positive_int)(None, "--x") is None
    for fn, value, msg in [(positive_int, True, "--x must be a number, got True"),
                           (positive_int, 2.5, "--x must be a whole number, got 2.5"),
                           (positive_int, "0x10", "--x must be a whole number, got '0x10'"),
                           (positive_float, "nan", "--x must be a finite number"),
                           (positive_float, -1, "--x must be > 0, got -1")]:
        with pytest.raises(ForcelabError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            fn(value, "--x")
    with pytest.raises(ForcelabError, match=r"--steps must be between 1 and 1000 \(the schedule\), got 5000"):
        in_range(5000, "--steps", 1, 1000, integer=True, why="the schedule")
    with pytest.raises(ForcelabError, match="--mode must be one of a, b; got 'c'"):
        choice("c", "--mode", ["a", "b"])
    with pytest.raises(argparse.ArgumentTypeError, match="must be a whole number >= 1, got '-4'"):
        arg(positive_int)("-4")
    assert arg(in_range, 0, 10)("2.5") == 2.5
