"""Fault injection: settings that make no sense (train/config.py, each recipe's Options).

Every numeric setting is checked once, when the config is loaded: ranges, finiteness, ratios
in [0, 1], choices, the recipe's cross-field rules. Through the CLI a bad one is one line
naming the key, exit 2, and no run folder: nothing is built or written before the check.
"""

import re
from pathlib import Path

import pytest

from forcelab.cli import main as cli_main
from forcelab.train.config import load_train_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TOY = CONFIGS / "toy"
SHIPPED = sorted(p for d in ("toy", "recipes") for p in (CONFIGS / d).glob("*.yaml"))

# case -> (toy config, override, what the one line must say). max_steps=1 keeps a case that
# slipped through short; it then fails on the folder it created.
CASES = {
    # the cases of the reliability probe
    "guidance-nan": ("teacher", "algo.guidance=.nan", "algo.guidance must be a finite number, got nan"),
    "dmd-guidance-nan": ("self_forcing", "algo.guidance=.nan", "algo.guidance must be a finite number"),
    "min_lr_ratio-5": ("teacher", "roles.generator.min_lr_ratio=5",
                       "roles.generator.min_lr_ratio must be between 0 and 1, got 5"),
    "uncond_prob-5": ("teacher", "algo.uncond_prob=5", "algo.uncond_prob must be between 0 and 1, got 5"),
    "shuffle--1": ("teacher", "data.shuffle=-1", "data.shuffle must be a whole number >= 0, got -1"),
    "eps-negative": ("teacher", "roles.generator.eps=-1e-8", "roles.generator.eps must be > 0"),
    "weight_decay-negative": ("teacher", "roles.generator.weight_decay=-0.01",
                              "roles.generator.weight_decay must be >= 0, got -0.01"),
    "override-unknown": ("teacher", "model_overrides.bogus=1", "model_overrides.bogus: not a setting of the model"),
    "override-typo": ("teacher", "model_overrides.chunk_frame=3", "did you mean chunk_frames"),
    "override-value": ("teacher", "model_overrides.num_heads=0", "model_overrides.num_heads must be a whole number >= 1"),
    "seed-negative": ("teacher", "seed=-1", "seed must be a whole number from 0 to 2^63 - 1"),
    "seed-2-64": ("teacher", f"seed={2**64}", "seed must be a whole number from 0 to 2^63 - 1 (seeds are 63-bit)"),
    "batch_size-huge": ("teacher", "data.batch_size=100000000", "data.batch_size 100000000 x data.frames 8 x 32x32 "
                        "pixels needs about"),
    # infinities anywhere
    "lr-inf": ("teacher", "roles.generator.lr=.inf", "roles.generator.lr must be a finite number"),
    "grad_clip-inf": ("teacher", "roles.generator.grad_clip=.inf", "roles.generator.grad_clip must be a finite number"),
    "shift--inf": ("teacher", "algo.shift=-.inf", "algo.shift must be a finite number"),
    "steps-inf": ("self_forcing", "algo.steps=[1000,.inf]", "algo.steps[1] must be a finite number"),
    "override-inf": ("teacher", "model_overrides.rope_theta=.inf", "model_overrides.rope_theta must be a finite number"),
    # text no setting can mean
    "prompt-nul": ("teacher", 'logging.sample_prompts=["a red\\0ball"]', "logging.sample_prompts[0] holds a NUL byte"),
    "negative-nul": ("teacher", 'negative_prompt="x\\0"', "negative_prompt holds a NUL byte"),
    # the other rules of the schema
    "betas-1": ("teacher", "roles.generator.betas=[0.9,1.0]", "roles.generator.betas[1] must be >= 0 and < 1"),
    "ema_decay-1": ("teacher", "roles.generator.ema_decay=1.0", "roles.generator.ema_decay must be >= 0 and < 1"),
    "lr_schedule": ("teacher", "roles.generator.lr_schedule=cosin", "roles.generator.lr_schedule must be one of"),
    "dtype": ("teacher", "roles.generator.dtype=fp8", "roles.generator.dtype must be one of"),
    "preset": ("teacher", "model_preset=huge", "model_preset must be one of"),
    "batch_size-0": ("teacher", "data.batch_size=0", "data.batch_size must be a whole number >= 1"),
    "keep_last-0": ("teacher", "checkpoint.keep_last=0", "checkpoint.keep_last must be a whole number >= 1"),
    "height-0": ("teacher", "data.height=0", "data.height must be a whole number >= 1"),
    "precision": ("teacher", "mixed_precision=fp16", "mixed_precision must be one of no, bf16"),
    "role-typo": ("self_forcing", "roles.critc.lr=1e-4", "recipe 'self_forcing' has no role(s) ['critc']"),
    # each recipe's Options, and their rules across fields
    "sigma_dist": ("teacher", "algo.sigma_dist=normal", "algo.sigma_dist must be one of uniform, logit_normal"),
    "sample_plan": ("diffusion_forcing", "algo.sample_plan=pyramid", "algo.sample_plan must be one of"),
    "num_levels-1": ("ar_diffusion", "algo.num_levels=1", "algo.num_levels must be >= 2, got 1"),
    "ar_step": ("ar_diffusion", "algo.ar_step=30", "algo.ar_step must be between 0 and 20 (algo.sample_steps)"),
    "dmd-loss": ("self_forcing", "algo.loss=kl", "algo.loss must be one of dmd, sid"),
    "t_min-above-t_max": ("self_forcing", "algo.t_min=990", "algo.t_min must be between 0 and 980"),
    "causvid-levels": ("causvid", "algo.levels=[1000,-5]", "algo.levels[1] must be between 0 and 1000"),
    # a subclass that only changes a default keeps its base's rule
    "inherited-steps": ("rolling_forcing", "algo.steps=[1000,1200]", "algo.steps[1] must be between 0 and 1000"),
    "inherited-warp": ("causvid", "algo.warp_shift=-1", "algo.warp_shift must be >= 0, got -1"),
    "frames-of-chunks": ("self_forcing", "model_overrides.chunk_frames=3",
                         "algo.frames (8) must be a multiple of the student's chunk_frames (3)"),
    "max_chunks": ("rolling_forcing", "algo.min_chunks=7", "algo.max_chunks must be >= 7 (algo.min_chunks), got 6"),
    "rolling_prob": ("rolling_forcing", "algo.rolling_prob=1.5", "algo.rolling_prob must be between 0 and 1"),
    "new_frames": ("streaming_long", "algo.new_frames=10", "algo.new_frames must be between 1 and 8 (algo.frames"),
    "switch_frames": ("streaming_long", "algo.switch_frames=[9]", "algo.switch_frames: [9] are not step starts"),
    "lora_roles": ("streaming_long", "algo.lora_roles=[teacher]", "algo.lora_roles[0] must be one of generator, critic"),
    "rollout_frames": ("self_forcing_pp", "algo.rollout_frames=4", "algo.rollout_frames must be >= 8 (algo.frames)"),
    "stored_steps": ("ode_init", "algo.stored_steps=[0,6]", "algo.stored_steps must increase"),
    "pairs_dtype": ("ode_init", "algo.pairs_dtype=int8", "algo.pairs_dtype must be one of"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_setting_is_one_line_exit_2_and_no_folder(tmp_path, capsys, case):
    config, override, expected = CASES[case]
    command = "train" if config in ("teacher", "diffusion_forcing", "ar_diffusion") else "distill"
    run = tmp_path / "run"
    code = cli_main([command, str(TOY / f"{config}.yaml"), override, "max_steps=1", f"output_dir={run}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert expected in err[0], err[0]
    assert not run.exists() and not any(tmp_path.iterdir())


def test_the_study_refuses_an_unknown_recipe_before_any_work(tmp_path, capsys):
    out = tmp_path / "study"
    code = cli_main(["eval", "toybench", "--suite", "quick", "--recipes", "self_forcing", "bogus", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "--recipes must be one of " in err[0] and "self_forcing, " in err[0] and "got 'bogus'" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_an_empty_config_is_refused_rather_than_trained_on_defaults(tmp_path, capsys, text):
    empty = tmp_path / "empty.yaml"
    empty.write_text(text)
    assert cli_main(["train", str(empty), f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"config {empty}: holds no settings (empty, or comments only)" in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("path", SHIPPED, ids=[f"{p.parent.name}/{p.name}" for p in SHIPPED])
def test_every_shipped_config_passes_every_rule(path):
    """No false positives: each shipped config loads as it is, and with every role at random
    init (then the student's chunk size is known at load time and the rules that need it run)."""
    cfg = load_train_config([path])
    at_random = [f"roles.{name}.init=null" for name, role in cfg.roles.items() if role.init]
    again = load_train_config([path], at_random)
    assert not any(role.init for role in again.roles.values())


def test_legal_extremes_stay_legal():
    """A huge lr, a zero ratio, an empty prompt list: surprising, but meaningful."""
    cfg = load_train_config([TOY / "teacher.yaml"], ["roles.generator.lr=1e30", "roles.generator.min_lr_ratio=0",
                                                      "roles.generator.min_lr_ratio=1", "algo.uncond_prob=1",
                                                      "data.shuffle=0", "seed=0", "algo.guidance=-2"])
    assert cfg.roles["generator"].lr == 1e30 and cfg.data.shuffle == 0
    sf = load_train_config([TOY / "self_forcing.yaml"], ["roles.teacher.init=null", "algo.prefix_frames=2",
                                                         "algo.min_chunks=4", "algo.max_chunks=6"])
    assert sf.algo.max_chunks == 6


def test_the_rules_of_a_config_dataclass():
    """setting() declares a field with its rule; check_settings names the dotted key."""
    import dataclasses

    from forcelab.errors import ForcelabError
    from forcelab.validate import (check_settings, decay, each, multiple_of, optional, positive_int, setting,
                                   text, unit_interval)

    @dataclasses.dataclass
    class Inner:
        ratio: float = setting(0.5, unit_interval)

    @dataclasses.dataclass
    class Outer:
        steps: list = setting([3, 2], each(positive_int, min_items=1))
        window: int | None = setting(None, optional(positive_int))
        inner: dict = dataclasses.field(default_factory=lambda: {"a": Inner()})

    @dataclasses.dataclass
    class Child(Outer):
        steps: list = dataclasses.field(default_factory=lambda: [5])     # a new default, the same rule

    check_settings(Outer())
    assert Outer().steps is not Outer().steps                               # list defaults are copied
    for obj, message in [(Outer(steps=[]), "steps must list at least 1 value(s)"),
                         (Outer(steps=[1, 0]), "steps[1] must be a whole number >= 1, got 0"),
                         (Outer(window=0), "window must be a whole number >= 1, got 0"),
                         (Outer(inner={"a": Inner(ratio=1.5)}), "inner.a.ratio must be between 0 and 1"),
                         (Outer(inner={"a": Inner(ratio=float("nan"))}), "inner.a.ratio must be a finite number"),
                         (Child(steps=[0]), "steps[0] must be a whole number >= 1")]:
        with pytest.raises(ForcelabError) as e:
            check_settings(obj)
        assert message in str(e.value), (message, str(e.value))
    for check, value, message in [(decay, 1.0, "x must be >= 0 and < 1, got 1.0"),
                                  (text, "a\0b", "x holds a NUL byte"),
                                  (lambda v, n: multiple_of(v, n, 3, "the chunk"), 7,
                                   "x (7) must be a multiple of the chunk (3)")]:
        with pytest.raises(ForcelabError, match=re.escape(message)):
            check(value, "x")
    assert decay(0.0, "x") == 0.0 and unit_interval(1, "x") == 1.0 and text("caf\u00e9", "x") == "caf\u00e9"
