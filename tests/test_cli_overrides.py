"""`forcelab train|distill` as a Hydra user expects it: +key / ~key overrides in any order with
the flags, --print-config, every missing path of a Wan recipe in one message, the toy recipes
on the committed teacher from any folder, errors naming the key the user wrote, and one path
convention in the Wan configs."""

from pathlib import Path

import pytest
import yaml

from forcelab.cli import main
from forcelab.errors import ConfigError
from forcelab.train.cli import split_args
from forcelab.train.config import load_train_config
from forcelab.train.paths import check_paths
from forcelab.train.recipe import recipe_class
from forcelab.train.roles import resolve_init

REPO = Path(__file__).resolve().parent.parent
TOY, RECIPES = REPO / "configs" / "toy", REPO / "configs" / "recipes"
SF = str(TOY / "self_forcing.yaml")
COMMITTED_TEACHER = TOY / "teacher_checkpoint"


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


# ------------------------------------------------------------------ +key and ~key
def test_plus_adds_a_key_the_config_lacks_and_refuses_one_it_has():
    cfg = load_train_config([SF], ["+model_overrides.window_frames=4", "~roles.critic", "+roles.critic.lr=3e-5"])
    assert cfg.model_overrides == {"window_frames": 4}
    assert cfg.roles["critic"].lr == 3e-5 and cfg.roles["critic"].weight_decay == 0.0   # a fresh critic
    for item, key in (("+max_steps=3", "max_steps"), ("+roles.teacher.init=x", "roles.teacher.init"),
                      ("+model_overrides.window_frames=2", "model_overrides.window_frames")):
        overrides = ["model_overrides.window_frames=4", item]
        with pytest.raises(ConfigError, match=rf"^command line: \+{key}: '{key}' is already in the config; "
                                              rf"write {key}=VALUE"):
            load_train_config([SF], overrides)


def test_tilde_removes_a_mapping_key_or_resets_a_setting_in_order():
    cfg = load_train_config([SF], ["~roles.critic", "~roles.generator.lr", "~data", "max_steps=7", "~max_steps",
                                   "~logging.every", "logging.every=3"])
    assert "critic" not in cfg.roles and set(cfg.roles) == {"teacher", "generator"}
    assert cfg.roles["generator"].lr == 1e-4 and cfg.roles["generator"].update_every == 5   # only lr reset
    assert cfg.data.batch_size == 1 and cfg.data.frames is None                            # the whole section
    assert cfg.max_steps == 1000 and cfg.logging.every == 3                                # later wins
    assert load_train_config([SF], ["~roles", "+roles.generator.lr=0.5"]).roles.keys() == {"generator"}


@pytest.mark.parametrize("item, message", [
    ("~max_stepz", "unknown config key 'max_stepz'; did you mean max_steps"),
    ("~roles.generator.lrr", "unknown config key 'roles.generator.lrr'; did you mean roles.generator.lr"),
    ("~model_overrides.window_frames", "nothing to remove ('model_overrides.window_frames' is not in the config)"),
    ("~roles.nobody.lr", "nothing to remove ('roles.nobody' is not in the config)"),
    ("~max_steps=3", "write ~max_steps (a removal takes no value)"),
    ("~", "must look like key.sub=value, +key.sub=value (add) or ~key.sub (remove)"),
    ("+=3", "must look like key.sub=value"),
    ("+nope=1", "unknown config key 'nope'"),
    ("+roles.generator.betas.x=1", "keys given below a list"),
])
def test_bad_plus_and_tilde_overrides_are_one_line(item, message):
    with pytest.raises(ConfigError) as err:
        load_train_config([SF], [item])
    assert str(err.value).startswith("command line: ") and message in str(err.value)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ the command line
def test_files_and_overrides_are_told_apart():
    args = ["a.yaml", "~/b.yaml", "x=1", "+y.z=2", "~w", "~user/c.yml"]
    assert split_args(args) == (["a.yaml", "~/b.yaml", "~user/c.yml"], ["x=1", "+y.z=2", "~w"])


def test_print_config_takes_flags_and_overrides_in_any_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["distill", "--print-config", SF, "max_steps=7", "~roles.critic", "+model_overrides.window_frames=4"]
    assert main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["max_steps"] == 7 and set(printed["roles"]) == {"teacher", "generator"}
    assert printed["model_overrides"] == {"window_frames": 4}
    assert Path(printed["roles"]["teacher"]["init"]) == COMMITTED_TEACHER    # resolved, absolute
    assert main(["distill", SF, "max_steps=7", "--print-config", "seed=3", "~seed"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["seed"] == 0
    assert list(tmp_path.iterdir()) == []                                    # nothing built or written


def test_a_bad_tilde_on_the_command_line_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(TOY / "teacher.yaml"), "--dry-run", "~optim.lr"]) == 2
    assert "unknown config key 'optim.lr'" in error_line(capsys)


def test_dry_run_of_a_wan_recipe_lists_every_missing_path_at_once(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["distill", str(RECIPES / "self_forcing.yaml"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[0].startswith("forcelab distill: error: 6 paths of the config")
    listed = {line.split(":")[0].strip(): line for line in lines[1:]}
    assert list(listed) == ["vae", "text_encoder", "data.source", "roles.generator.init", "roles.critic.init",
                            "roles.teacher.init"]
    assert "hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir checkpoints/Wan2.1-T2V-1.3B-Diffusers" \
        in listed["roles.teacher.init"]
    prompts = listed["data.source"]          # the prompt file says what it is and where it comes from
    assert "one prompt per line" in prompts and "VidProM" in prompts
    assert "hf download gdhe17/Self-Forcing vidprom_filtered_extended.txt --local-dir prompts" in prompts
    assert "runs/wan_ode_init: not found" in listed["roles.generator.init"]
    assert list(tmp_path.iterdir()) == []


def test_one_missing_path_is_one_line(tmp_path):
    (tmp_path / "prompts.txt").write_text("a red ball\n")
    cfg = load_train_config([SF], [f"data.source={tmp_path / 'prompts.txt'}", "vae=nowhere/vae"])
    with pytest.raises(ConfigError) as err:
        check_paths(cfg)
    assert str(err.value).startswith("vae: nowhere/vae: not found; give a local diffusers Wan VAE folder")
    assert "\n" not in str(err.value)
    check_paths(load_train_config([SF]))      # the toy config's paths all exist, from any folder


def test_toy_distillation_runs_on_the_committed_teacher_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["distill", SF, "--dry-run", "max_steps=1", "logging.progress=false", "data.batch_size=1"]) == 0
    assert str(COMMITTED_TEACHER) in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_errors_name_the_key_the_path_was_written_under(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # the generator and critic start from the teacher's weights: the path is roles.teacher.init's
    assert main(["distill", SF, "roles.teacher.init=gone/teacher", "--dry-run"]) == 2
    err = error_line(capsys)
    assert "error: roles.teacher.init: gone/teacher: not found" in err and "roles.generator" not in err
    (tmp_path / "empty").mkdir()       # a folder that exists but holds no weights
    cfg = load_train_config([SF], [f"roles.teacher.init={tmp_path / 'empty'}"])
    with pytest.raises(ConfigError, match=r"^roles\.teacher\.init \(the generator's weights as well\): weights "):
        resolve_init(cfg, recipe_class(cfg.recipe).roles, "generator")
    with pytest.raises(ConfigError, match=r"^roles\.teacher\.init: weights .*not a DiT directory"):
        check_paths(cfg)


def test_package_paths_stay_inside_the_package():
    cfg = load_train_config([SF])
    assert Path(cfg.roles["teacher"].init) == COMMITTED_TEACHER
    with pytest.raises(ConfigError, match="give a path inside the forcelab package") as err:
        load_train_config([SF], ["roles.teacher.init=${forcelab:../outside}"])
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ the Wan configs' paths
def test_wan_configs_keep_one_path_convention():
    """Weights in checkpoints/<repo name>, earlier stages in runs/, prompts in prompts/, shards in data/."""
    for path in sorted(RECIPES.glob("*.yaml")):
        cfg = load_train_config([path])
        assert cfg.vae.startswith("checkpoints/Wan2.1-") and cfg.text_encoder == cfg.vae, path.name
        for name, role in cfg.roles.items():
            assert role.init is None or role.init.startswith(("checkpoints/Wan2.1-", "runs/")), (path.name, name)
        assert cfg.data.source.startswith(("prompts/", "data/")), path.name
