"""The memory planner (train/memory_plan.py) against measured peaks of real training steps.

The measurement is independent of the planner: a TorchDispatchMode sees every tensor an op
returns and counts its storage once, until the storage is freed (a weakref finalizer on it),
like cuda max_memory_allocated on a GPU; the roles' state at the step's start (weights,
gradients, AdamW states, EMA) is counted the same way. Each toy recipe runs one warm step
(the optimizer states exist afterwards), then the measured step, with every role updated in
it; the planner's single-process estimate of each role update's peak must be within
PLAN_TOLERANCE of the measured one (so a role that never sets the step's peak is held too),
with and without gradient checkpointing, in fp32 and under bf16 autocast (on the CPU every
layout runs on the torch backend: the plan is asked for device "cpu").
"""

import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from forcelab.cli import main
from forcelab.errors import ConfigError
from forcelab.models import CausalDiT, DiTConfig
from forcelab.train.config import load_train_config
from forcelab.train.memory_plan import (FP32, SAVED, GiB, block_bytes, working_bytes, accumulation_steps, parse_memory, plan_memory, role_models,
                                        static_bytes)
from forcelab.train.recipe import recipe_class
from forcelab.train.trainer import Trainer
from forcelab.train.workload import ModelPass

PLAN_TOLERANCE = 0.15           # |planned / measured - 1| for every toy recipe
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TOY = CONFIGS / "toy"
QUIET = ["logging.wandb=disabled", "logging.progress=false", "data.batch_size=2", "data.frames=8"]
TINY_MODEL = ["model_overrides.dim=32", "model_overrides.ffn_dim=64", "model_overrides.num_heads=2",
              "model_overrides.num_layers=2"]
DMD = ["roles.generator.update_every=1", "roles.generator.ema_start=0", "algo.frames=4"]
# case -> (recipe, overrides, steps before the measured one). Every role updates in the measured
# step; streaming_long's sequences are one step long, so the step is the largest (a sequence start)
CASES = {
    "teacher": ("teacher", TINY_MODEL + ["roles.generator.ema_start=0"], 1),
    "diffusion_forcing": ("diffusion_forcing", TINY_MODEL + ["roles.generator.ema_start=0"], 1),
    "ar_diffusion": ("ar_diffusion", TINY_MODEL + ["roles.generator.ema_start=0"], 1),
    "ode_init": ("ode_init", ["roles.generator.ema_start=0", "algo.num_pairs=4", "algo.pairs_per_shard=2",
                              "algo.teacher_steps=4", "algo.stored_steps=[0,2,-1]"], 1),
    "causvid": ("causvid", DMD, 1),
    "causal_cd": ("causal_cd", ["algo.cd_steps=4"], 1),
    "reward_forcing": ("reward_forcing", DMD, 1),
    "self_forcing": ("self_forcing", DMD, 1),
    "self_forcing-bf16_teacher": ("self_forcing", DMD + ["roles.teacher.dtype=bf16"], 1),   # Wan's setting
    "rolling_forcing": ("rolling_forcing", DMD + ["algo.min_chunks=2", "algo.max_chunks=2"], 1),
    "self_forcing_pp": ("self_forcing_pp", DMD + ["algo.rollout_frames=8", "algo.window_frames=4"], 1),
    "streaming_long": ("streaming_long", DMD + ["algo.new_frames=2", "algo.max_frames=4", "algo.window_frames=4",
                                                "algo.sink_frames=2", "algo.switch=false"], 1),
}


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storages: `now`, `peak`, and the peak of each phase (`phase`: a
    name set from outside, e.g. the role being updated) in `peaks`."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0
        self.phase, self.peaks = None, {}

    def enter(self, phase) -> None:
        self.phase = phase
        self.peaks[phase] = max(self.peaks.get(phase, 0), self.now)

    def add(self, t) -> None:
        if not isinstance(t, torch.Tensor):
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        self.live[key] = storage.nbytes()
        self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.now)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.add(t)
        return out


def role_state(trainer):
    """Every tensor of the roles' state: weights, gradients, buffers, AdamW states, EMA."""
    for role in trainer.roles.values():
        for p in role.module.parameters():
            yield p
            if p.grad is not None:
                yield p.grad
        yield from role.module.buffers()
        if role.optimizer is not None:
            for state in role.optimizer.state.values():
                yield from (v for v in state.values() if torch.is_tensor(v))
        yield from (role.ema or {}).values()


def measured_peaks(trainer, warm_steps: int) -> tuple[dict[str, int], dict[str, int]]:
    """Role -> the peak of live bytes during its update in one training step (from the start
    of its loss to the next role's), and role -> bytes of the storages autograd saved for its
    backward (created in the step: not the weights)."""
    trainer.run(stop_at=warm_steps)
    meter = LiveBytes()
    for t in role_state(trainer):
        meter.add(t)
    before = set(meter.live)
    saved: dict[str, dict[int, int]] = {}
    loss = trainer.recipe.loss

    def tracked_loss(role, batch, ctx):
        meter.enter(role)
        return loss(role, batch, ctx)

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in before:
            saved.setdefault(meter.phase, {})[storage._cdata] = storage.nbytes()
        return t
    trainer.recipe.loss = tracked_loss
    with meter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.train_step()
    peaks = {role: peak for role, peak in meter.peaks.items() if role is not None}
    return peaks, {role: sum(kept.values()) for role, kept in saved.items()}


def test_live_bytes_counts_storages_once_and_frees_them():
    meter = LiveBytes()
    with meter:
        a = torch.zeros(1000)                       # 4000 bytes
        view = a[10:20]                             # the same storage
        b = torch.ones(250, dtype=torch.float64)    # 2000 bytes
        assert meter.now == 6000 and view.numel() == 10
        del b
        assert meter.now == 4000
        c = a * 2                                   # a new storage
        del a, view
        assert meter.now == 4000 and meter.peak == 8000   # a and c together
        del c
    assert meter.now == 0


BLOCK_TOLERANCE = 0.05          # |planned / measured - 1| of one block's saved bytes


def block_saved(config: DiTConfig, masked: bool, bf16: bool, batch=2, frames=4, hw=8) -> int:
    """Bytes autograd saves for one block: a forward of a 2-block DiT minus a 1-block one."""
    def saved(layers):
        torch.manual_seed(0)
        model = CausalDiT(config.replace(num_layers=layers))
        x, t = torch.randn(batch, config.in_channels, frames, hw, hw), torch.rand(batch, frames) * 1000
        context = torch.randn(batch, config.text_len, config.text_dim)
        weights = {p.untyped_storage()._cdata for p in model.parameters()}
        kept = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage._cdata not in weights:
                kept[storage._cdata] = storage.nbytes()
            return tensor
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x, t, context, chunk_frames=config.chunk_frames if masked else None)
        del out
        return sum(kept.values())
    return saved(2) - saved(1)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("masked", [False, True], ids=["bidirectional", "block_causal"])
@pytest.mark.parametrize("dim, ffn", [(64, 256), (128, 256), (64, 512)])
def test_block_saved_bytes_match_autograd(dim, ffn, masked, bf16):
    """The per-block counts (BLOCK_HIGH, BLOCK_LOW, BLOCK_KEYS, BLOCK_FFN, the prompt K/V, the
    per-token statistics, the mask) against what autograd keeps, at three widths."""
    config = DiTConfig.preset("toy", dim=dim, ffn_dim=ffn, num_heads=2, chunk_frames=2)
    tokens, batch, frames = config.tokens_per_frame(8, 8), 2, 4
    planned = block_bytes(ModelPass("generator", frames, frames, grad=True, masked=masked), config, batch, tokens,
                          2 if bf16 else FP32, mask_layouts=True)
    if bf16:    # autocast's bf16 copies of the block's Linear weights (the plan's "bf16 weight copies")
        linears = [m for m in CausalDiT(config).blocks[0].modules() if isinstance(m, torch.nn.Linear)]
        planned += sum(p.numel() for m in linears for p in m.parameters()) * 2
    measured = block_saved(config, masked, bf16, batch, frames)
    assert abs(planned / measured - 1) <= BLOCK_TOLERANCE, (planned, measured)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dim, ffn", [(128, 512), (256, 512), (128, 1024), (256, 1024)])
def test_working_set_of_a_pass_without_gradients(dim, ffn, bf16):
    """A frozen model's forward (a teacher's score): the peak above its inputs and weights
    against working_bytes, where the attention side (wide models) or the FFN side sets it."""
    config = DiTConfig.preset("toy", dim=dim, ffn_dim=ffn, num_heads=2, num_layers=2)
    model = CausalDiT(config).requires_grad_(False)
    if bf16:
        model.set_dtype(torch.bfloat16)
    batch, frames = 2, 4
    x, t = torch.randn(batch, config.in_channels, frames, 8, 8), torch.rand(batch, frames) * 1000
    context = torch.randn(batch, config.text_len, config.text_dim)
    meter = LiveBytes()
    for tensor in (*model.parameters(), x, t, context):
        meter.add(tensor)
    start = meter.now
    with meter, torch.no_grad():
        model(x, t, context)
    planned = working_bytes(ModelPass("teacher", frames, frames, grad=False), config, batch,
                            config.tokens_per_frame(8, 8), 2 if bf16 else FP32)
    assert abs(planned / (meter.peak - start) - 1) <= BLOCK_TOLERANCE, (planned, meter.peak - start)


@pytest.fixture(scope="module")
def teacher_dir(tiny_teacher):
    return tiny_teacher(layers=2)


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["stored", "checkpointed"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_is_within_tolerance_of_the_measured_peak(case, checkpointing, precision, teacher_dir, tmp_path):
    recipe, overrides, warm = CASES[case]
    roles = recipe_class(recipe).roles
    extra = [f"output_dir={tmp_path / 'run'}", f"mixed_precision={precision}"]
    if "teacher" in roles:
        extra.append(f"roles.teacher.init={teacher_dir}")
    if checkpointing:
        extra += [f"roles.{name}.gradient_checkpointing=true" for name, spec in roles.items() if spec.trainable]
    cfg = load_train_config([TOY / f"{recipe}.yaml"], QUIET + overrides + extra)
    # ODE init reads its pairs from the run folder (a data stage the dry run skips)
    trainer = Trainer(cfg, dry_run=recipe != "ode_init")
    try:
        measured, saved = measured_peaks(trainer, warm)
    finally:
        trainer.release()
    plan = plan_memory(cfg, gpus=1, strategies=("ddp",), device="cpu").strategies["ddp"]
    assert set(measured) == set(plan.updates)       # every trainable role updated in the step
    for role, peak in measured.items():
        assert abs(plan.role_total(role) / peak - 1) <= PLAN_TOLERANCE, (role, plan.role_total(role), peak)
        if not checkpointing and precision == "no":     # the per-block counts alone (fp32: no weight casts)
            planned = plan.updates[role][SAVED]
            assert abs(planned / saved[role] - 1) <= PLAN_TOLERANCE, (role, planned, saved[role])


# ---------------------------------------------------------------------------- strategies and flags
def test_sharding_divides_what_each_strategy_shards():
    cfg = load_train_config([TOY / "teacher.yaml"], QUIET)     # one trainable role with EMA
    roles = role_models(cfg)
    with torch.device("meta"):
        P = sum(p.numel() for p in CausalDiT(DiTConfig.preset("toy")).parameters())
    N = 8
    ddp, fsdp = static_bytes(roles, "ddp", N), static_bytes(roles, "fsdp", N)
    zero2, zero3 = static_bytes(roles, "zero2", N), static_bytes(roles, "zero3", N)
    assert ddp["weights (trainable)"] == 4 * P and ddp["AdamW states"] == 8 * P and ddp["EMA"] == 4 * P
    assert fsdp["weights (trainable)"] == 4 * P // N and fsdp["AdamW states"] == 8 * P // N
    assert zero2["weights (trainable)"] == 4 * P and zero2["master weights"] == 4 * P // N
    assert zero3["weights (trainable)"] == 4 * P // N and zero3["AdamW states"] == 8 * P // N
    assert fsdp["EMA"] == zero3["EMA"] == 4 * P // N and zero2["EMA"] == 4 * P   # ZeRO-2 keeps it whole
    assert FP32 == 4


def test_accumulation_reaches_the_global_batch():
    assert accumulation_steps(64, 1, 8) == 8
    assert accumulation_steps(64, 3, 8) == 3        # 72 >= 64: the smallest that reaches it
    cfg = load_train_config([CONFIGS / "recipes" / "self_forcing.yaml"], [])
    plan = plan_memory(cfg, gpus=8, global_batch=64)
    assert (plan.accumulation, plan.global_batch, plan.tokens_per_frame) == (8, 64, 1560)


@pytest.mark.parametrize("text, value", [("80GB", 80 * GiB), ("141gib", 141 * GiB), ("96000MB", 96000 * 2 ** 20)])
def test_memory_sizes(text, value):
    assert parse_memory(text) == value


@pytest.mark.parametrize("text", ["80XB", "80", "-1GB", "GB", "nanGB"])
def test_bad_memory_sizes_are_refused(text):
    with pytest.raises(ConfigError, match="not a memory size"):
        parse_memory(text)


def test_cli_prints_every_strategy(capsys):
    assert main(["plan", str(TOY / "self_forcing.yaml"), "--gpus", "8", "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    for name in ("ddp", "fsdp", "zero2", "zero3", "fits", "global batch"):
        assert name in out


def test_cli_bad_flag_is_one_line(capsys):
    assert main(["plan", str(TOY / "self_forcing.yaml"), "--gpu-memory", "80XB"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--gpu-memory" in err and "80XB" in err


@pytest.mark.parametrize("config", sorted((CONFIGS / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_wan_recipe_plans_and_sharding_only_lowers_it(config):
    """Every published recipe plans without its weights (presets stand in for them); FSDP,
    which shards everything, never needs more per GPU than replicating everything (DDP)."""
    plan = plan_memory(load_train_config([config], []), gpus=8)
    totals = {name: s.total for name, s in plan.strategies.items()}
    assert set(totals) == {"ddp", "fsdp", "zero2", "zero3"} and all(v > 0 for v in totals.values())
    assert totals["fsdp"] < totals["zero3"] < totals["zero2"] < totals["ddp"]
