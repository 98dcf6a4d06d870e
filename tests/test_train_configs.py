"""Every shipped recipe config loads against its recipe's strict schema, and every Wan-scale
config keeps the hyperparameters of the paper / public code it cites (pinned, with the source)."""

from dataclasses import replace
from pathlib import Path

import pytest

from forcelab.train.config import load_train_config
from forcelab.train.recipe import recipe_class, recipe_names

RECIPES = recipe_names()

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
FILES = sorted(p for d in ("toy", "toy/textured", "recipes") for p in (CONFIGS / d).glob("*.yaml"))


@pytest.mark.parametrize("path", FILES, ids=[f"{p.parent.name}/{p.name}" for p in FILES])
def test_config_loads(path):
    cfg = load_train_config([path])
    assert cfg.recipe in RECIPES
    if path.stem in RECIPES:
        assert cfg.recipe == path.stem        # a config named after a recipe runs that recipe


def test_textured_configs_are_their_plain_recipe_on_the_textured_world():
    """Each textured row is its plain config's recipe and options on the textured world; a
    *_nosink row moves the sink's frames into the window (the same cache budget, no sink)."""
    textured = sorted((CONFIGS / "toy" / "textured").glob("*.yaml"))
    assert textured
    for path in textured:
        plain_name = path.name.replace("_nosink", "")
        cfg, plain = load_train_config([path]), load_train_config([CONFIGS / "toy" / plain_name])
        assert cfg.data.background_texture > 0 and plain.data.background_texture == 0
        expected = plain.algo
        if "_nosink" in path.name:
            budget = plain.algo.window_frames + plain.algo.sink_frames
            expected = replace(plain.algo, window_frames=budget, sink_frames=0)
        assert cfg.recipe == plain.recipe and cfg.algo == expected, path.name


def test_textured_dmd_rows_share_one_budget():
    """The study's DMD rows differ by their recipe only: 300 steps from the ODE init, generator
    lr 2e-4 and critic lr 4e-5."""
    rows = ("self_forcing", "causvid", "rolling_forcing", "rolling_forcing_nosink", "streaming_long",
            "streaming_long_nosink", "self_forcing_pp")
    for row in rows:
        cfg = load_train_config([CONFIGS / "toy" / "textured" / f"{row}.yaml"])
        starts = {**recipe_class(cfg.recipe).starts_from, **cfg.starts_from}
        assert starts["generator"] == "ode_init", row
        assert (cfg.max_steps, cfg.roles["generator"].lr, cfg.roles["critic"].lr) == (300, 2.0e-4, 4.0e-5), row


def test_every_recipe_has_a_toy_config():
    implemented = [name for name in RECIPES if (CONFIGS.parent / "train" / f"{name}.py").exists()
                   or (CONFIGS.parent / "distill" / f"{name}.py").exists()]
    missing = [n for n in implemented if not (CONFIGS / "toy" / f"{n}.yaml").exists()]
    assert not missing


# ------------------------------------------------------------------ published values, pinned
# Each Wan-scale config's hyperparameters against the values of the paper / public code they
# cite, typed out here from those sources (never read back from the configs), so an edit that
# drifts from a published value fails and names its source. Guidance is forcelab's
# uncond + g (cond - uncond); the public cond + w (cond - uncond) is g = w + 1.
SF = "Self-Forcing public config (33593df)"
CV = "CausVid wan_causal_dmd.yaml + train_distillation.py (ca21150)"
CV_ODE = "CausVid wan_causal_ode.yaml + train_ode.py (ca21150)"
RF = "Rolling Forcing rolling_forcing_dmd.yaml + default_config.yaml (a1477d0)"
LL1 = "LongLive v1 longlive_train_init.yaml + default_config.yaml (e52d9ef)"
RWF = "Reward Forcing paper (algorithms.md)"
LL2 = "LongLive v1 longlive_train_long.yaml + default_config.yaml (e52d9ef)"
ODE = "Self-Forcing's ODE data: 48 steps, shift 8, CFG 6, indices [0, 12, 24, 36, -1]"
TORCH_ADAMW = "torch AdamW default weight decay (the public optimiser passes none)"
CF = "Causal Forcing (algorithms.md)"


def dmd_optimiser(lr_g, lr_c, betas, source, wd_source=None, clip_source=None):
    """The optimiser block every DMD-family config shares: generator and critic."""
    return [("roles.generator.lr", lr_g, source), ("roles.critic.lr", lr_c, source),
            ("roles.generator.betas", betas, source), ("roles.critic.betas", betas, source),
            ("roles.generator.weight_decay", 0.01, wd_source or source),
            ("roles.critic.weight_decay", 0.01, wd_source or source),
            ("roles.generator.grad_clip", 10.0, clip_source or source),
            ("roles.critic.grad_clip", 10.0, clip_source or source),
            ("roles.generator.update_every", 5, source), ("roles.critic.update_every", 1, source),
            ("roles.generator.gradient_checkpointing", True, source),
            ("roles.critic.gradient_checkpointing", True, source),
            ("model_overrides.chunk_frames", 3, source), ("mixed_precision", "bf16", source)]


SF_DMD = [*dmd_optimiser(2e-6, 4e-7, [0.0, 0.999], SF),
          ("roles.generator.ema_decay", 0.99, SF), ("roles.generator.ema_start", 200, SF),
          ("algo.steps", [1000, 750, 500, 250], SF), ("algo.warp_shift", 5.0, SF), ("algo.snap_shift", 5.0, SF),
          ("algo.guidance", 4.0, SF + ": w = 3.0"), ("algo.score_shift", 5.0, SF),
          ("algo.t_min", 20.0, SF), ("algo.t_max", 980.0, SF), ("algo.context_noise", 0.0, SF),
          ("algo.frames", 21, SF)]
ODE_INIT = [("algo.teacher_steps", 48, ODE), ("algo.teacher_shift", 8.0, ODE),
            ("algo.teacher_guidance", 6.0, ODE + " in uncond + 6 (cond - uncond)"),
            ("algo.stored_steps", [0, 12, 24, 36, -1], ODE), ("algo.teacher_solver", "euler", ODE),
            ("algo.teacher_sigma_max", 1.0, ODE + ": t = 1000 first"), ("roles.teacher.dtype", "fp32", ODE),
            ("roles.generator.lr", 2e-6, CV_ODE), ("roles.generator.betas", [0.9, 0.999], CV_ODE),
            ("roles.generator.weight_decay", 0.01, TORCH_ADAMW), ("roles.generator.grad_clip", 10.0, CV_ODE),
            ("model_overrides.chunk_frames", 3, CV_ODE + ": num_frame_per_block 3"),
            ("max_steps", 3000, CV_ODE + ": the DMD stage loads its model_003000")]
PINNED = {
    "self_forcing": [*SF_DMD, ("algo.loss", "dmd", SF), ("algo.min_chunks", 7, SF), ("algo.max_chunks", 7, SF),
                     ("max_steps", 600, SF + ": 600 iterations")],
    "longlive_stage1": [*SF_DMD, ("max_steps", 700, LL1 + ": max_iters"), ("algo.min_chunks", 7, LL1),
                        ("algo.max_chunks", 7, LL1), ("model_overrides.window_frames", 9, LL1 + ": local_attn_size 12"),
                        ("model_overrides.sink_frames", 3, LL1 + ": sink_size 3"),
                        ("model_overrides.sink_rope", "true_distance", LL1 + ": sink at absolute frames"),
                        ("roles.teacher.init", "checkpoints/Wan2.1-T2V-14B-Diffusers", LL1 + ": real_name")],
    "rolling_forcing": [*dmd_optimiser(1.5e-6, 4e-7, [0.0, 0.999], RF),
                        ("roles.generator.ema_decay", 0.99, RF), ("roles.generator.ema_start", 200, RF),
                        ("algo.steps", [1000, 800, 600, 400, 200], RF), ("algo.warp_shift", 5.0, RF),
                        ("algo.guidance", 4.0, RF + ": guidance_scale 3.0"), ("algo.score_shift", 5.0, RF),
                        ("algo.t_min", 20.0, SF), ("algo.t_max", 980.0, SF), ("algo.context_noise", 0.0, RF),
                        ("algo.frames", 21, RF + ": DMD on the last 21 frames"),
                        ("algo.min_chunks", 7, RF + ": blocks uniform in [21, 27] / 3"),
                        ("algo.max_chunks", 9, RF + ": num_training_frames 27"),
                        ("algo.rolling_prob", 0.5, RF), ("model_overrides.sink_frames", 3, RF + ": 3-frame anchor"),
                        ("model_overrides.sink_rope", "adjacent", RF + ": the anchor re-rotated"),
                        ("roles.teacher.init", "checkpoints/Wan2.1-T2V-14B-Diffusers", RF + ": real_name")],
    "causvid": [*dmd_optimiser(2e-6, 2e-6, [0.9, 0.999], CV, wd_source=TORCH_ADAMW),
                ("roles.generator.ema_decay", None, CV + ": no EMA"),
                ("algo.steps", [1000, 757, 522], CV), ("algo.warp_shift", None, CV),
                ("algo.levels", [1000, 757, 522, 0], CV), ("algo.guidance", 4.5, CV + ": real_guidance_scale 3.5"),
                ("algo.score_shift", 8.0, CV + ": timestep_shift 8"), ("algo.t_min", 20.0, CV),
                ("algo.t_max", 980.0, CV), ("algo.frames", 21, CV), ("data.batch_size", 1, CV)],
    "streaming_long": [*dmd_optimiser(1e-5, 2e-6, [0.0, 0.999], LL2),
                       ("roles.generator.ema_decay", None, LL2 + ": EMA skipped with LoRA"),
                       ("algo.lora_rank", 256, LL2), ("algo.lora_alpha", 256, LL2),
                       ("algo.lora_roles", ["generator", "critic"], LL2 + ": apply_to_critic"),
                       ("algo.steps", [1000, 750, 500, 250], LL2), ("algo.warp_shift", 5.0, LL2),
                       ("algo.guidance", 4.0, LL2 + ": guidance_scale 3.0"), ("algo.score_shift", 5.0, LL2),
                       ("algo.frames", 21, LL2 + ": streaming_chunk_size"), ("algo.new_frames", 18, LL2),
                       ("algo.max_frames", 240, LL2 + ": streaming_max_length"), ("algo.sink_frames", 3, LL2),
                       ("algo.window_frames", 9, LL2 + ": local_attn_size 12 = 3 sink + 9"),
                       ("algo.switch", True, LL2), ("algo.recache_frames", 21, LL2), ("max_steps", 3000, LL2),
                       ("roles.teacher.init", "checkpoints/Wan2.1-T2V-14B-Diffusers", LL2 + ": real_name"),
                       ("roles.critic.init", "runs/longlive_stage1", LL2 + ": stage 2 loads stage 1's critic")],
    "self_forcing_pp": [*SF_DMD, ("algo.sink_frames", 0, "Self-Forcing++ paper: no sink")],
    "reward_forcing": [*SF_DMD, ("algo.loss", "dmd", RWF + ": Re-DMD"), ("max_steps", 601, RWF),
                       ("gradient_accumulation_steps", 8, RWF), ("model_overrides.window_frames", 9, RWF),
                       ("model_overrides.sink_frames", 3, RWF)],
    "ode_init": ODE_INIT,
    "causal_ode_init": [*(p for p in ODE_INIT if p[0] != "algo.teacher_guidance"),
                        ("algo.teacher_kind", "causal", CF + ": ODE pairs from the AR teacher"),
                        ("roles.teacher.init", "runs/wan_teacher_forcing", CF + ": stage 2 from the AR teacher")],
    "causal_cd": [("max_steps", 3000, CF + ": causal CD >= 3K"),
                  ("roles.teacher.init", "runs/wan_teacher_forcing", CF + ": stage 2 from the AR teacher"),
                  ("algo.steps", [1000, 750, 500, 250], SF), ("algo.warp_shift", 5.0, SF),
                  ("model_overrides.chunk_frames", 3, SF)],
    "teacher_forcing": [("max_steps", 2000, CF + ": AR diffusion >= 2K steps"),
                        ("algo.teacher_forcing", True, CF + ": [clean | noisy] layout"),
                        ("model_overrides.chunk_frames", 3, "the Self-Forcing / CausVid chunk")],
    "causal_forcing": [*SF_DMD, ("algo.loss", "dmd", SF), ("max_steps", 600, SF + ": 600 iterations"),
                       ("roles.teacher.init", "checkpoints/Wan2.1-T2V-1.3B-Diffusers",
                        CF + ": the bidirectional teacher as the real score"),
                       ("roles.generator.init", "runs/wan_causal_ode_init", CF + ": DMD from the causal init")],
    "ar_diffusion": [("algo.num_levels", 1000, "AR-Diffusion: T = 1000 levels"),
                     ("algo.sampler", "fopp", "AR-Diffusion: the FoPP scheduler"),
                     ("algo.chunk_frames", 1, "AR-Diffusion: temporal-causal per frame")],
    "diffusion_forcing": [("model_overrides.chunk_frames", 3, "the Self-Forcing / CausVid chunk"),
                          ("algo.sample_plan", "step_matrix", "SkyReels-V2 diffusion forcing"),
                          ("algo.ar_step", 5, "SkyReels-V2 README: ar_step 5 (asynchronous)"),
                          ("algo.sample_steps", 30, "SkyReels-V2 README: 30 inference steps")],
    "teacher": [("algo.sample_shift", 8.0, "Wan2.1 README, T2V-1.3B"), ("algo.guidance", 6.0, "Wan2.1 README"),
                ("algo.sample_steps", 50, "Wan2.1 T2V sampling"),
                ("algo.sample_solver", "unipc", "Wan2.1 T2V sampling")],
}


def lookup(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def test_every_wan_config_has_pinned_values():
    assert sorted(PINNED) == sorted(p.stem for p in (CONFIGS / "recipes").glob("*.yaml") if p.stem != "wan_base")


@pytest.mark.parametrize("name", sorted(PINNED))
def test_wan_config_keeps_the_published_values(name):
    cfg = load_train_config([CONFIGS / "recipes" / f"{name}.yaml"])
    wrong = []
    for key, expected, source in PINNED[name]:
        got = lookup(cfg, key)
        got = list(got) if isinstance(got, tuple) else got
        if got != (pytest.approx(expected) if isinstance(expected, (float, list)) else expected):
            wrong.append(f"{key} = {got!r}, {source} has {expected!r}")
    assert not wrong, "\n".join(wrong)


def test_causal_forcing_step_counts_are_within_the_published_bounds():
    """algorithms.md (Causal Forcing): AR diffusion >= 2K steps, causal CD >= 3K, DMD <= 1K."""
    steps = {n: load_train_config([CONFIGS / "recipes" / f"{n}.yaml"]).max_steps
             for n in ("teacher_forcing", "causal_cd", "causal_forcing")}
    assert steps["teacher_forcing"] >= 2000 and steps["causal_cd"] >= 3000 and steps["causal_forcing"] <= 1000, steps


def test_warped_lists_and_ode_levels_are_the_published_ones():
    """The configured lists through forcelab's warp / teacher schedule give the levels the
    public code trains at (algorithms.md: [1000, 937.5, 833.3, 625], [1000, 952.4, 882.4,
    769.2, 555.6]; ODE pairs stored at t ~ [1000, 960, 888.9, 727.3, 0])."""
    from forcelab.models.schedule import teacher_sigmas, warp_timesteps

    for name, levels in (("self_forcing", [1000, 937.5, 833.3, 625]), ("streaming_long", [1000, 937.5, 833.3, 625]),
                         ("rolling_forcing", [1000, 952.4, 882.4, 769.2, 555.6])):
        cfg = load_train_config([CONFIGS / "recipes" / f"{name}.yaml"])
        assert warp_timesteps(cfg.algo.steps, cfg.algo.warp_shift) == pytest.approx(levels, abs=0.1), name
    o = load_train_config([CONFIGS / "recipes" / "ode_init.yaml"]).algo
    sigmas = teacher_sigmas(o.teacher_steps, o.teacher_shift, o.teacher_sigma_max)
    assert [1000 * float(sigmas[k]) for k in o.stored_steps] == pytest.approx([1000, 960, 888.9, 727.3, 0], abs=0.1)

