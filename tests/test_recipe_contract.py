"""The recipe contract: recipes register themselves by name (no table to edit), randomness comes
from named streams (distinct names never share numbers; per-sample draws follow the sample's
position, shared draws are the same on every rank), recipes see a narrow run context and never
the trainer, and every option rule runs when the config loads - before any model is built,
with the student's architecture read from its init weights."""

from pathlib import Path

import pytest
import torch

from forcelab.errors import ConfigError
from forcelab.seeds import mix_seed, name_key, stream_seed
from forcelab.train.config import load_train_config
from forcelab.train.recipe import Recipe, recipe_class, recipe_names
from forcelab.train.step_context import StepContext

PACKAGE = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


# ---------------------------------------------------------------------- the registry
def test_every_recipe_module_registers_its_recipe():
    names = recipe_names()
    for name in names:
        assert recipe_class(name).name == name
    assert {"teacher", "diffusion_forcing", "ar_diffusion", "ode_init", "causvid", "self_forcing",
            "rolling_forcing", "streaming_long", "self_forcing_pp"} <= set(names)


def test_unknown_recipe_is_one_line_naming_the_known_ones():
    with pytest.raises(ConfigError) as e:
        recipe_class("self_forcin")
    text = str(e.value)
    assert "\n" not in text and "'self_forcin'" in text and all(n in text for n in recipe_names())


def test_a_new_recipe_registers_by_name_and_a_taken_name_is_refused(monkeypatch):
    from forcelab.train import recipe

    monkeypatch.setattr(recipe, "_REGISTRY", dict(recipe._REGISTRY))     # the probe leaves no trace

    class Probe(Recipe):
        name = "contract_probe"

    assert recipe_class("contract_probe") is Probe and "contract_probe" in recipe_names()
    with pytest.raises(TypeError, match="taken"):
        type("Other", (Recipe,), {"name": "teacher", "__module__": __name__})


def test_recipes_never_see_the_trainer():
    for d in ("train", "distill"):
        for path in (PACKAGE / d).glob("*.py"):
            if path.name != "trainer.py":
                assert "self.trainer" not in path.read_text(), path


# ---------------------------------------------------------------------- named streams
def test_stream_names_are_hashed_into_the_seed():
    assert stream_seed(0, "noise", 3) == mix_seed(0, name_key("noise"), 3)
    assert len({stream_seed(0, n, 3) for n in ("noise", "exit_step", "dmd_noise", "critic_noise")}) == 4
    assert name_key("noise") == name_key("noise") and 0 <= name_key("noise") < 2 ** 63
    with pytest.raises(TypeError, match="string"):
        name_key(1)


def test_per_sample_draws_follow_the_position_and_shared_draws_the_step():
    a = StepContext(4, 0, 7, [10, 11], CPU)
    b = StepContext(9, 1, 7, [11, 30], CPU)              # another rank / step holding sample 11
    assert torch.equal(a.stream("noise").normal((3,))[1], b.stream("noise").normal((3,))[0])
    assert not torch.equal(a.stream("noise").normal((3,))[1], a.stream("other").normal((3,))[1])
    assert a.stream("noise").seeds()[1] == b.stream("noise").seeds()[0]
    other_rank = StepContext(4, 0, 7, [12, 13], CPU)
    assert [a.stream("exit_step").shared_int(1000) for _ in range(2)] == \
        [other_rank.stream("exit_step").shared_int(1000)] * 2
    draws = {StepContext(s, 0, 7, [0], CPU).stream("exit_step").shared_int(1000) for s in range(20)}
    assert len(draws) > 10                                  # a new draw per step


# ---------------------------------------------------------------------- options at load time
@pytest.fixture(scope="module")
def teacher_dir(tiny_teacher):
    return tiny_teacher(layers=1)


def test_option_rules_run_at_load_with_the_architecture_of_the_init_weights(teacher_dir, tmp_path):
    """The student starts from the teacher's weights (chunks of 2 frames): the loader reads
    their config, so a rule on the chunk size fails before any model is built."""
    base = [f"roles.teacher.init={teacher_dir}", f"output_dir={tmp_path / 'run'}"]
    with pytest.raises(ConfigError, match="algo.frames"):
        load_train_config([], ["recipe=self_forcing", "algo.frames=3", *base])
    with pytest.raises(ConfigError, match="window_frames"):
        load_train_config([], ["recipe=rolling_forcing", "algo.frames=4", "algo.window_frames=3", *base])
    with pytest.raises(ConfigError, match="window_frames"):
        load_train_config([], ["recipe=self_forcing_pp", "algo.frames=4", "algo.window_frames=3", *base])
    with pytest.raises(ConfigError, match="algo.sample_timesteps"):
        load_train_config([], ["recipe=ode_init", "algo.sample_timesteps=[250,500]", *base])
    with pytest.raises(ConfigError, match="algo.teacher_"):
        load_train_config([], ["recipe=ode_init", "algo.teacher_sigma_max=0", *base])
    load_train_config([], ["recipe=self_forcing", "algo.frames=4", *base])    # a fitting config loads


def test_each_recipe_states_its_sampling_plan_and_sources_once_and_the_study_reads_them():
    """The study (and the demo) take what a recipe samples with and which runs it starts from
    from the recipe itself: nothing to restate when a recipe is added."""
    from forcelab.models.plans import CausalPlan, Teacher
    from forcelab.pipeline import TOY_CONFIGS, sampling_plan
    from forcelab.study import row_config, row_sources, study_recipes

    order = study_recipes()           # the rows: every toy config naming a recipe (its own, or a variant)
    stems = {p.stem for p in TOY_CONFIGS.glob("*.yaml")}
    framewise = {f"framewise/{p.stem}" for p in TOY_CONFIGS.glob("framewise/*.yaml")}
    assert stems & set(recipe_names()) <= set(order) <= stems | framewise and framewise <= set(order)
    for recipe in order:
        cls = recipe_class(row_config(recipe).recipe)
        plan = sampling_plan(recipe)
        causal = cls.roles["generator"].causal
        assert isinstance(plan, CausalPlan if causal else Teacher), recipe
        for role, source in row_sources(recipe).items():
            assert role in cls.roles and order.index(source) < order.index(recipe), (recipe, role, source)
    causvid = load_train_config([TOY_CONFIGS / "causvid.yaml"]).algo
    assert sampling_plan("causvid").timesteps == [float(t) for t in causvid.steps]   # its own 3-step list
    assert recipe_class("self_forcing").starts_from == {"teacher": "teacher", "generator": "ode_init"}
    # Causal Forcing's chain: the causal teacher -> causal ODE init / causal CD -> Self-Forcing DMD
    assert row_sources("causal_ode_init")["teacher"] == row_sources("causal_cd")["teacher"] == "teacher_forcing"
    assert row_sources("causal_forcing") == {"teacher": "teacher", "generator": "causal_ode_init"}
    assert row_sources("causal_forcing_cd")["generator"] == "causal_cd"
