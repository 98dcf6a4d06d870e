"""How the trainer spreads its roles over processes: plain data-parallel (DDP arithmetic),
FSDP2 (sharded parameters, gradients and optimizer state) or DeepSpeed ZeRO-2/3.

    strategy = make_strategy(cfg, accelerator)      # cfg.parallel: auto | ddp | fsdp | zero2 | zero3
    strategy.prepare(role)                          # after build_role, before the optimizer exists
    strategy.attach_optimizer(role)                 # after make_optimizer (DeepSpeed wraps it here)

This module holds the launch logic and `DataParallel` (the interface, and plain data-parallel);
the sharded strategies subclass it in train/fsdp.py (FSDP) and train/zero.py (ZeRO).

One source of truth: a run launched with an accelerate config that asks for sharding
(accelerate launch --config_file configs/accelerate/fsdp.yaml | zero2.yaml | zero3.yaml) runs
that strategy, on GPU and on CPU alike; `parallel` in the training config then must be `auto`
(the default) or name the same strategy, else the run refuses in one line. Without such a
launch config (torchrun, plain python, configs/accelerate/ddp.yaml) `parallel` decides, `auto`
meaning ddp. accelerate itself enables FSDP and DeepSpeed on GPUs only (on CPU its state says
MULTI_CPU and drops both plugins), but `accelerate launch` exports the config file to every
process (ACCELERATE_USE_FSDP, FSDP_*, ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_*), and
accelerate's own plugin classes rebuild the plugins from those variables: that is what
launch_strategy reads when the state has none. `accelerate launch --cpu` (or use_cpu: true)
starts ONE process whatever --num_processes says; such a run refuses instead of silently
training alone (check_launch).

FSDP writes sharded checkpoints by default (checkpoint.format auto; train/checkpoint.py): each
rank its own shards of the weights, EMA and optimizer state (checkpoint_shards), read back at
any number of processes (load_checkpoint_shards). So does ZeRO-3, in its own form: each rank its
flat partitions of the weights and EMA (ZeRO.checkpoint_shards), read back by the same ranks
(ZeRO.load_partitions). In the full format every strategy writes the
same checkpoint: FULL weights as DiT directories (so generate, export and init read a sharded
run unchanged), the EMA as full weights, and the optimizer state:

    ddp    optim-ROLE.pt holds torch's optimizer state dict (as without this module)
    fsdp   optim-ROLE.pt holds the FULL optimizer state keyed by parameter name
           (torch.distributed.checkpoint's full_state_dict), gathered to rank 0; every rank
           reads it back and keeps its shard
    zero*  optim-ROLE.pt holds the LR schedule and update count; each rank's DeepSpeed
           optimizer partition travels with that rank's state (rng-rankR.pt, key `zero`)

The EMA lives where the weights do: each process keeps the EMA of the part it holds (FSDP: the
DTensor shards; ZeRO-3: the rank's partition; ddp, ZeRO-2: all of it), updates it without
gathering (ema_source) and gathers it only to write a checkpoint or sample (snapshot,
full_module).

Resume is exact for the same strategy and number of processes (the trainer already requires
the same number of processes for its per-rank RNG states). A sharded checkpoint also resumes
at another number of processes, under FSDP or ddp (train/checkpoint.py says what starts fresh).

Mixed precision: autocast (mixed_precision bf16) under every strategy; under FSDP
fsdp_bf16_params adds FSDP2's MixedPrecisionPolicy (bf16 parameters, fp32 reduction).

Gradients: ddp averages them itself after accumulation (Trainer._all_reduce_grads); FSDP
reduce-scatters them in the last micro-batch's backward (gradient sync is off for the
others); DeepSpeed reduces them in the last micro-batch's backward too (the trainer sets the
engine's accumulation boundary) and clips and applies them in engine.step.

Non-finite updates: under ZeRO the trainer's guard sees the loss (a non-finite loss skips the
update, as elsewhere); a non-finite gradient behind a finite loss is caught by DeepSpeed's own
check inside engine.step, which step() reports (engine.was_step_applied) so that the trainer
treats it as its own skip: logged, counted toward max_nonfinite_steps, no schedule, EMA or
update count advance.

Loading pretrained weights (loads_rank_local): under FSDP and ZeRO-3 the trainer builds a role
that has weights on the meta device (roles.build_role(defer_loading=True)) and prepare() reads
only this rank's part of the safetensors files (models/shard_loading.py): FSDP shards the empty
model first and fills each DTensor shard with its rows; ZeRO-3 allocates one block at a time,
lets zero.Init partition it, and fills the rank's flat partitions. A rank holds its part and one
stored tensor's rows, never the whole model. Roles read whole instead: frozen roles under ZeRO,
every role under ddp and ZeRO-2 (replicated anyway), a random init (the same seeded draw on
every rank, sharded after), and a role a recipe adapts before sharding (LoRA).

Left to later: frozen roles under ZeRO stay whole on every process (FSDP shards them).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import sys
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .config import PARALLEL as STRATEGIES   # the choices live with the config field
from .roles import Role, load_pending


@functools.cache
def leave_process_group_at_exit() -> None:
    """Once per process: leave the process group before the interpreter exits. A gloo group torn
    down during interpreter shutdown, with its peer already gone, can abort the process
    ("terminate called without an active exception", exit -6) after a run that succeeded."""
    atexit.register(_leave_process_group)


def _leave_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def exit_processes(code: int = 0) -> None:
    """End a process of a multi-process run whose work is saved: leave the process group, flush
    the output and exit without the interpreter's teardown, during which objects still holding the
    group (wrapped models, device meshes) are freed after their peer process is gone and can abort
    a run that succeeded ("terminate called without an active exception", exit -6). Every process
    reaches this point before any leaves."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    _leave_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

SHARDED_FROZEN_DTYPE = torch.bfloat16   # frozen roles without a dtype are kept in bf16 when sharded


@dataclass
class Snapshot:
    """What a checkpoint writes for one trainable role (rank 0's copy; None fields elsewhere)."""
    weights: object                      # has .config and .state_dict() (full tensors)
    ema: object | None
    optimizer: dict | None               # torch.save-able: optimizer, scheduler, updates


def make_strategy(cfg, accelerator) -> "DataParallel":
    """The strategy the launch config asks for, else the one cfg.parallel names (module docstring)."""
    name = cfg.parallel
    if name not in STRATEGIES:
        raise ConfigError(f"parallel must be one of {list(STRATEGIES)}, got {name!r}")
    check_launch(accelerator)
    launched, plugin = launch_strategy(accelerator)
    if launched != "ddp" and name not in ("auto", launched):
        raise ConfigError(f"parallel={name} in the training config, but the accelerate launch config asks for "
                          f"{launched}: set parallel=auto (or {launched}), or launch with "
                          f"configs/accelerate/{name}.yaml")
    chosen_by = "the accelerate launch config" if launched != "ddp" else f"parallel={name} in the training config"
    if name == "auto":
        name = launched
    if accelerator.num_processes == 1:
        strategy = DataParallel(accelerator, cfg)    # one process: nothing to shard or reduce
    elif name == "fsdp":
        from .fsdp import FSDP

        strategy = FSDP(accelerator, cfg, plugin)
    elif name in ("zero2", "zero3"):
        from .zero import ZeRO

        strategy = ZeRO(accelerator, cfg, stage=int(name[-1]), plugin=plugin)
    else:
        strategy = DataParallel(accelerator, cfg)
    strategy.chosen_by = chosen_by
    return strategy


def launch_strategy(accelerator) -> tuple[str, object | None]:
    """(ddp | fsdp | zero2 | zero3, the launch config's FSDP or DeepSpeed plugin or None): from
    accelerate's state where it enabled the plugin (GPUs), else from the variables `accelerate
    launch --config_file` exported (CPU), through accelerate's own plugin classes."""
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    env = lambda key: os.environ.get(key, "false").lower() == "true"  # noqa: E731  (accelerate's spelling)
    if state.distributed_type == DistributedType.FSDP or env("ACCELERATE_USE_FSDP"):
        return "fsdp", getattr(state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()
    if state.distributed_type == DistributedType.DEEPSPEED or env("ACCELERATE_USE_DEEPSPEED"):
        plugin = getattr(state, "deepspeed_plugin", None) or DeepSpeedPlugin()
        stage = int(plugin.zero_stage)
        if stage not in (2, 3):
            raise ConfigError(f"the accelerate DeepSpeed config asks for ZeRO stage {stage}; forcelab runs "
                              f"ZeRO-2 or ZeRO-3 (set zero_stage: 2 or 3, or use configs/accelerate/ddp.yaml)")
        return f"zero{stage}", plugin
    return "ddp", None


# what `accelerate launch --cpu` (its simple launcher) leaves in a process it starts alone although
# --num_processes asked for more: MASTER_ADDR/PORT for a group that never forms, and no WORLD_SIZE
SOLO_LAUNCH = ("ACCELERATE_USE_CPU", "MASTER_ADDR", "MASTER_PORT")
MPI_WORLD = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def check_launch(accelerator) -> None:
    """Refuse a run that `accelerate launch --cpu --num_processes N>1` started as one process."""
    env = os.environ
    if (accelerator.num_processes == 1 and env.get("ACCELERATE_USE_CPU") == "True"
            and all(k in env for k in SOLO_LAUNCH) and not any(k in env for k in MPI_WORLD)):
        raise ConfigError("accelerate launch --cpu (or use_cpu: true) started ONE process whatever --num_processes "
                          "says; for N CPU processes drop --cpu (forcelab runs on CPU where there is no GPU): "
                          "accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes N ... "
                          "(or torchrun --nproc_per_node N -m forcelab.train ...)")


# ---------------------------------------------------------------------------- data-parallel
class DataParallel:
    """Every process holds the whole model; the trainer averages gradients itself."""
    name = "ddp"
    sharded = False
    loads_rank_local = False    # True: roles are built on meta and prepare() reads each rank's part

    def __init__(self, accelerator, cfg):
        self.acc, self.cfg = accelerator, cfg
        self.world = accelerator.num_processes
        self.chosen_by = "the training config"

    def describe(self) -> str:
        """One line for the start of a run: strategy, who chose it, world size, global batch."""
        B, A = self.cfg.data.batch_size, self.cfg.gradient_accumulation_steps
        return (f"parallel: {self.name} (chosen by {self.chosen_by}) over {self.world} process(es) on "
                f"{self.acc.device.type}; global batch {B} x {self.world} x {A} = {B * self.world * A} "
                f"(batch_size x processes x gradient_accumulation_steps)")

    def prepare(self, role: Role) -> None:
        """Shard / wrap a freshly built role (weights already loaded, or pending: read here)."""
        load_pending(role, self.acc.device)

    def attach_optimizer(self, role: Role) -> None:
        """Called once the role's optimizer and LR schedule exist."""

    def reduces_grads(self, role: Role) -> bool:
        """True when the strategy averages the role's gradients (the trainer must not)."""
        return False

    def before_backward(self, role: Role, last_micro: bool) -> None:
        """Called before each micro-batch's backward of `role`'s loss."""

    def backward(self, role: Role, loss: torch.Tensor) -> None:
        self.acc.backward(loss)

    def clip_grad_norm(self, role: Role, max_norm: float) -> torch.Tensor:
        """Clip to max_norm (inf: measure only); the global norm as a plain scalar tensor."""
        return torch.nn.utils.clip_grad_norm_(role.params, max_norm)

    def full_params(self, role: Role):
        """A context in which role.module's parameters hold their full values (ZeRO-3
        gathers them; elsewhere they do, or are DTensors)."""
        return contextlib.nullcontext()

    def ema_source(self, role: Role) -> dict[str, torch.Tensor]:
        """The tensors the role's EMA follows, by parameter name: the part of each parameter
        this process holds (all of it; FSDP: the DTensor, whose shard the EMA keeps; ZeRO-3:
        this rank's partition). The EMA is gathered only to be saved or sampled."""
        return dict(role.module.named_parameters())

    def step(self, role: Role) -> tuple[bool, float | None]:
        """Apply the update: (whether it was applied, a gradient norm measured while stepping or
        None). Not applied: the strategy's own check found a non-finite gradient (DeepSpeed)."""
        role.optimizer.step()
        return True, None

    def zero_grad(self, role: Role) -> None:
        role.optimizer.zero_grad(set_to_none=True)

    # checkpoints of sharded strategies: snapshot() is collective (every rank calls it); rank 0
    # writes the result (unsharded roles are written as they are by train/checkpoint.py)
    def snapshot(self, role: Role) -> Snapshot:
        raise NotImplementedError

    def rank_state(self, roles: dict[str, Role]) -> dict:
        """Per-rank state to keep with the rank's RNG states (DeepSpeed partitions)."""
        return {}

    def load_optimizer(self, role: Role, state: dict) -> None:
        role.optimizer.load_state_dict(state)

    def load_rank_state(self, roles: dict[str, Role], state: dict) -> None:
        pass

    def load_ema(self, role: Role, full: dict[str, torch.Tensor]) -> None:
        params = dict(role.module.named_parameters())
        role.ema = {k: full[k].to(params[k].device, torch.float32) for k in params}

    def full_module(self, role: Role, use_ema: bool):
        """Sharded strategies (collective): a plain CausalDiT with the role's full weights (EMA
        when asked and kept) on rank 0, None elsewhere."""
        raise NotImplementedError

    # sharded checkpoints (torch.distributed.checkpoint): the same code serves every strategy but
    # ZeRO - plain tensors here, DTensors whose local shards each rank writes and reads under FSDP
    def checkpoint_shards(self, role: Role) -> tuple[dict, list]:
        """(the role's tensors as this process holds them: {"model": weights and buffers, "optim":
        the optimizer's per-parameter state keyed by parameter name, "ema": when kept}, the
        optimizer's param groups - hyperparameters, parameters by name - saved beside them)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        optim = get_optimizer_state_dict(role.module, role.optimizer)
        tensors = {"model": get_model_state_dict(role.module), "optim": optim["state"]}
        if role.ema is not None:
            tensors["ema"] = dict(role.ema)
        return tensors, optim["param_groups"]

    def checkpoint_template(self, role: Role, ema: bool) -> dict:
        """checkpoint_shards' tensors, allocated where this process holds them, for a load to fill
        in place (the optimizer's state is created first; an EMA of zeros shaped like the weights)."""
        tensors, _ = self.checkpoint_shards(role)
        tensors.pop("ema", None)
        if ema:
            tensors["ema"] = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in role.module.named_parameters()}
        return tensors

    def load_checkpoint_shards(self, role: Role, tensors: dict, param_groups: list) -> None:
        """Put a loaded checkpoint_template (and the saved param groups) into the role."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        set_model_state_dict(role.module, tensors["model"])
        set_optimizer_state_dict(role.module, role.optimizer, {"state": tensors["optim"], "param_groups": param_groups})
        role.ema = tensors.get("ema")
