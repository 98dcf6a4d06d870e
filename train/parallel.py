"""How the trainer spreads its roles over processes: plain data-parallel (DDP arithmetic),
FSDP2 (sharded parameters, gradients and optimizer state) or DeepSpeed ZeRO-2/3.

    strategy = make_strategy(cfg, accelerator)      # cfg.parallel: auto | ddp | fsdp | zero2 | zero3
    strategy.prepare(role)                          # after build_role, before the optimizer exists
    strategy.attach_optimizer(role)                 # after make_optimizer (DeepSpeed wraps it here)

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
import importlib
import os
import sys
import warnings
from dataclasses import dataclass

import torch

from ..errors import CheckpointError, ConfigError
from .config import PARALLEL as STRATEGIES   # the choices live with the config field
from ..models.checkpoint import read_config, read_plan
from ..models.shard_loading import load_local_shards
from .checkpoint import ZERO3_PARTITIONS
from .roles import Role, ema_state, load_pending, plain_module, weights_record


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
        strategy = FSDP(accelerator, cfg, plugin)
    elif name in ("zero2", "zero3"):
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


# ---------------------------------------------------------------------------- FSDP2
class FSDP(DataParallel):
    """FSDP2 (`fully_shard`): every transformer block (and, inside it, its cross-attention,
    whose prompt K/V the model computes before the block runs) is one shard unit, the rest
    of the model the root unit. Trainable roles keep fp32 shards (autocast does the mixed
    precision, as without sharding); frozen roles are sharded in their configured dtype,
    bf16 when none is set."""
    name = "fsdp"
    sharded = True
    loads_rank_local = True

    def __init__(self, accelerator, cfg, plugin=None):
        super().__init__(accelerator, cfg)
        self.reshard_after_forward = True
        if plugin is not None and getattr(plugin, "reshard_after_forward", None) is not None:
            self.reshard_after_forward = bool(plugin.reshard_after_forward)
        from torch.distributed.device_mesh import init_device_mesh
        self.mesh = init_device_mesh(accelerator.device.type, (self.world,))
        # Linear on [B, L, dim] returns a view; Block adds the cross-attention output out of
        # place, so the hook FSDP warns about cannot be dropped there
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPCrossAttention\) returned a view")

    def prepare(self, role: Role) -> None:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        module = role.module
        if not role.trainable and role.cfg.dtype is None:
            module.set_dtype(SHARDED_FROZEN_DTYPE)
        reshard, mp = self.reshard_after_forward, self.mixed_precision_policy(role)
        for block in module.blocks:
            attn = block.cross_attn
            fully_shard(attn, mesh=self.mesh, reshard_after_forward=reshard, mp_policy=mp)
            # its K/V are views (unflatten): an in-place op on a view returned by an FSDP unit
            # would drop the hook that all-gathers its weights for backward, so return copies
            attn.context_kv = lambda context, kv=attn.context_kv: tuple(t.clone() for t in kv(context))
            register_fsdp_forward_method(attn, "context_kv")
            fully_shard(block, mesh=self.mesh, reshard_after_forward=reshard, mp_policy=mp)
        fully_shard(module, mesh=self.mesh, reshard_after_forward=reshard, mp_policy=mp)
        register_fsdp_forward_method(module, "set_prompt")   # rollouts call it outside forward
        self._load_rank_local(role)
        role.params = [p for p in module.parameters() if p.requires_grad]
        role.model = module

    def _load_rank_local(self, role: Role) -> None:
        """A role built on meta (its weights pending): allocate this rank's shards and read only
        their rows from the weights (models/shard_loading.py). The rank never holds more of the
        model than its shards and the part of one stored tensor it is copying."""
        if role.pending is None:
            return
        role.module.to_empty(device=self.acc.device)
        load_local_shards(role.module, role.pending)
        role.pending = None

    def mixed_precision_policy(self, role: Role):
        """fsdp_bf16_params (bf16 runs): the trainable role's parameters are all-gathered and
        used in forward and backward as bf16, its gradients reduce-scattered in fp32 into the
        fp32 shards the optimizer updates. Otherwise (and for frozen roles, kept in their own
        dtype) the parameters are used in the dtype they are stored in."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if role.trainable and self.cfg.fsdp_bf16_params:
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return MixedPrecisionPolicy()

    def reduces_grads(self, role: Role) -> bool:
        return True

    def before_backward(self, role: Role, last_micro: bool) -> None:
        role.module.set_requires_gradient_sync(last_micro)   # reduce-scatter once per update

    def clip_grad_norm(self, role: Role, max_norm: float) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(role.params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def _options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions
        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def _full_ema(self, role: Role) -> dict[str, torch.Tensor] | None:
        if role.ema is None:
            return None
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).cpu() for k, v in role.ema.items()}
        return full if self.acc.is_main_process else None

    def snapshot(self, role: Role) -> Snapshot:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        weights = get_model_state_dict(role.module, options=self._options())
        optim = get_optimizer_state_dict(role.module, role.optimizer, options=self._options())
        ema = self._full_ema(role)
        if not self.acc.is_main_process:
            return Snapshot(None, None, None)
        config = role.module.config
        return Snapshot(weights_record(config, weights), weights_record(config, ema_state(weights, ema)) if ema else None,
                        {"optimizer": optim, "scheduler": role.scheduler.state_dict(), "updates": role.updates})

    def load_optimizer(self, role: Role, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(role.module, role.optimizer, state, options=StateDictOptions(full_state_dict=True))

    def load_ema(self, role: Role, full: dict[str, torch.Tensor]) -> None:
        from torch.distributed.tensor import distribute_tensor

        role.ema = {k: distribute_tensor(full[k].to(p.device, torch.float32), p.device_mesh, p.placements)
                    for k, p in role.module.named_parameters()}

    def full_module(self, role: Role, use_ema: bool):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        weights = get_model_state_dict(role.module, options=self._options())
        ema = self._full_ema(role) if use_ema else None
        if not self.acc.is_main_process:
            return None
        return plain_module(role.module.config, ema_state(weights, ema) if ema else weights, self.acc.device)


# ---------------------------------------------------------------------------- DeepSpeed
def allocate_meta_parameters(unit: torch.nn.Module, device) -> None:
    """Give unit's meta parameters memory: views of one buffer per dtype, freed as a whole once
    every parameter has let go of it. A unit of more than 32 MiB is then one mmap of the C
    allocator, returned to the system when freed; tensor by tensor, the freed full tensors would
    stay resident between the partitions allocated after them (measured: +40% per block on the
    ranks that receive zero.Init's broadcast)."""
    owned = [(sub, name, p) for sub in unit.modules() for name, p in sub.named_parameters(recurse=False) if p.is_meta]
    for dtype in {p.dtype for _, _, p in owned}:
        mine = [(sub, name, p) for sub, name, p in owned if p.dtype == dtype]
        flat, offset = torch.empty(sum(p.numel() for _, _, p in mine), dtype=dtype, device=device), 0
        for sub, name, p in mine:
            view = flat[offset:offset + p.numel()].view(p.shape)
            sub._parameters[name] = torch.nn.Parameter(view, requires_grad=p.requires_grad)
            offset += p.numel()


class ZeRO(DataParallel):
    """DeepSpeed ZeRO-2 / ZeRO-3, one engine per trainable role (frozen roles stay plain
    modules). The trainer sets the accumulation boundary itself (engine.set_gradient_
    accumulation_boundary): micro-batches accumulate locally, the last one's backward reduces
    (the loss arrives already divided by the accumulation), and one engine.step per update
    clips (roles.X.grad_clip), skips non-finite updates and applies, so the global batch stays
    batch x processes x accumulation. Weights and optimizer stay fp32
    (mixed_precision bf16 is the trainer's autocast, as without DeepSpeed)."""
    sharded = True

    def __init__(self, accelerator, cfg, stage: int, plugin=None):
        super().__init__(accelerator, cfg)
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ConfigError(f"parallel: zero{stage} needs DeepSpeed; pip install 'forcelab[deepspeed]'") from None
        self.stage, self.name = stage, f"zero{stage}"
        self.base_config = dict(plugin.deepspeed_config) if plugin is not None else {}
        self.engines: dict[str, object] = {}
        self.loads_rank_local = stage == 3

    def prepare(self, role: Role) -> None:
        """ZeRO-3, a trainable role built on meta: partition it block by block and read each
        rank's partitions (`_load_partitioned`); any other role pending is read whole."""
        if self.stage == 3 and role.trainable and role.pending is not None:
            self._load_partitioned(role)
        super().prepare(role)

    def _load_partitioned(self, role: Role) -> None:
        """Allocate one unit (a transformer block, then the rest of the model) at a time and let
        DeepSpeed's zero.Init partition it (its full tensors are freed at once), then fill this
        rank's partitions from the weights: the rank holds its partitions and one block."""
        import deepspeed

        module, path = role.module, role.pending
        plan = read_plan(module, path, read_config(path)[1])   # the shapes, before partitioning
        config = self.ds_config(role)
        self._skip_cpu_build()
        deepspeed.init_distributed(dist_init_required=False)   # zero.Init reads the world size from it
        for unit in [*module.blocks, module]:   # the blocks are partitioned when the root comes
            allocate_meta_parameters(unit, self.acc.device)
            deepspeed.zero.Init(module=unit, config_dict_or_path=config)
        load_local_shards(module, path, held=self._held_partition, plan=plan)
        role.pending = None
        role.params = [p for p in module.parameters() if p.requires_grad]   # allocation renewed them

    def _held_partition(self, name: str, param) -> tuple[torch.Tensor, int, int]:
        """(this rank's ZeRO-3 partition of param, its first and end element); the padding past
        the parameter's end is zeroed."""
        start, length = self._partition(param)
        param.ds_tensor[length:].zero_()
        return param.ds_tensor[:length], start, start + length

    def _skip_cpu_build(self) -> None:
        if self.acc.device.type == "cpu":
            # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (a C++ build of
            # minutes) that only its inference all-reduce uses; ZeRO training runs on gloo.
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

    def attach_optimizer(self, role: Role) -> None:
        import deepspeed

        self._skip_cpu_build()
        engine, _, _, _ = deepspeed.initialize(model=role.module, optimizer=role.optimizer,
                                               config=self.ds_config(role), dist_init_required=False)
        self.engines[role.name] = engine
        role.model = role.module            # recipes call the module (rollouts use its methods)
        role.params = [p for p in role.module.parameters() if p.requires_grad]

    def ds_config(self, role: Role) -> dict:
        """The engine's config: the launch config's DeepSpeed settings (zero_optimization
        options, buckets) with the trainer's batch, accumulation, precision and clipping."""
        cfg = self.cfg
        if cfg.mixed_precision == "fp16":
            raise ConfigError("parallel: zero2/zero3 run with mixed_precision no or bf16 (fp16 loss scaling "
                              "is DeepSpeed's own and is not wired to the trainer's non-finite guard)")
        out = {k: v for k, v in self.base_config.items() if k not in ("optimizer", "scheduler") and v != "auto"}
        zero = {k: v for k, v in out.get("zero_optimization", {}).items() if v != "auto"}
        zero["stage"] = self.stage
        out["zero_optimization"] = zero
        A = cfg.gradient_accumulation_steps
        out.update(train_micro_batch_size_per_gpu=cfg.data.batch_size, gradient_accumulation_steps=A,
                   train_batch_size=cfg.data.batch_size * A * self.world,
                   gradient_clipping=role.cfg.grad_clip or 0.0, zero_allow_untested_optimizer=True,
                   steps_per_print=2 ** 31, wall_clock_breakdown=False)
        # weights and the optimizer stay fp32; autocast (mixed_precision) does the bf16 compute
        out["bf16"], out["fp16"] = {"enabled": False}, {"enabled": False}
        return out

    def reduces_grads(self, role: Role) -> bool:
        return role.name in self.engines

    def before_backward(self, role: Role, last_micro: bool) -> None:
        engine = self.engines.get(role.name)
        if engine is None:
            return
        engine.set_gradient_accumulation_boundary(last_micro)   # reduce in the last micro-batch only
        # what engine.forward does first: close the previous backward's books (ZeRO-3 counts
        # micro-steps here; the recipes call the module, whose rollouts need its methods)
        getattr(engine.optimizer, "clear_backward_seen_flag", lambda: None)()

    def backward(self, role: Role, loss: torch.Tensor) -> None:
        engine = self.engines.get(role.name)
        if engine is None:
            return super().backward(role, loss)
        engine.backward(loss, scale_wrt_gas=False)   # the trainer already divided by its accumulation

    def clip_grad_norm(self, role: Role, max_norm: float) -> torch.Tensor:
        """DeepSpeed clips (and skips non-finite updates) inside engine.step; the norm it
        measured is reported by step()."""
        return torch.zeros(())

    def step(self, role: Role) -> tuple[bool, float | None]:
        engine = self.engines[role.name]
        engine.step()
        norm = engine.get_global_grad_norm()
        # False when DeepSpeed's overflow check (agreed over all ranks) dropped the update
        return engine.was_step_applied(), None if norm is None else float(norm)

    def zero_grad(self, role: Role) -> None:
        self.engines[role.name].optimizer.zero_grad(set_to_none=True)

    def _partitions(self, role: Role) -> list[torch.Tensor]:
        """This rank's fp32 master partitions (the tensors the base optimizer updates)."""
        opt = self.engines[role.name].optimizer
        return list(opt.fp32_partitioned_groups_flat if self.stage == 3 else opt.single_partition_of_fp32_groups)

    def rank_state(self, roles: dict[str, Role]) -> dict:
        """Per role: this rank's fp32 partitions, the base optimizer's state of each, and the
        param groups' hyperparameters (lr ...). Keyed by partition index, not by tensor
        identity, which DeepSpeed's ZeRO-3 step swaps in and out of the param groups."""
        out = {}
        for name, engine in self.engines.items():
            base = engine.optimizer.optimizer        # torch AdamW over this rank's flat partitions
            parts = self._partitions(roles[name])
            out[name] = {"fp32": [t.detach().cpu().clone() for t in parts],
                         "state": [{k: v.detach().cpu().clone() if torch.is_tensor(v) else v
                                    for k, v in base.state.get(t, {}).items()} for t in parts],
                         "groups": [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]}
        return {"zero": out}

    def load_optimizer(self, role: Role, state: dict) -> None:
        pass    # the partitions come with each rank's state (load_rank_state)

    def load_rank_state(self, roles: dict[str, Role], state: dict) -> None:
        saved = state.get("zero", {})
        for name, engine in self.engines.items():
            if name not in saved:
                raise CheckpointError(f"checkpoint: no DeepSpeed optimizer state for role '{name}'; it was written "
                                      f"by another parallel strategy - resume with the one that wrote it")
            base, mine = engine.optimizer.optimizer, saved[name]
            parts = self._partitions(roles[name])
            with torch.no_grad():
                for part, value, st in zip(parts, mine["fp32"], mine["state"]):
                    part.copy_(value)
                    if st:
                        base.state[part] = {k: v.to(part.device) if torch.is_tensor(v) else v for k, v in st.items()}
            for group, hyper in zip(base.param_groups, mine["groups"]):
                group.update(hyper)

    def full_params(self, role: Role):
        if self.stage != 3 or role.name not in self.engines:
            return contextlib.nullcontext()
        import deepspeed
        return deepspeed.zero.GatheredParameters(list(role.module.parameters()))

    def ema_source(self, role: Role) -> dict[str, torch.Tensor]:
        if self.stage != 3 or role.name not in self.engines:
            return super().ema_source(role)
        return {k: p.ds_tensor[:self._partition(p)[1]] for k, p in role.module.named_parameters()}

    def _partition(self, p) -> tuple[int, int]:
        """(offset in the flat parameter, real elements) of this rank's ZeRO-3 partition of p
        (p.ds_tensor): rank r holds elements [r * size, (r + 1) * size), those past the
        parameter's end padding."""
        size = p.ds_tensor.numel()
        start = torch.distributed.get_rank(p.ds_process_group) * size
        return start, max(0, min(size, p.ds_numel - start))

    def _full_ema(self, role: Role) -> dict[str, torch.Tensor] | None:
        """The whole EMA on rank 0 (collective); ZeRO-3 gathers its partitions one tensor at a time."""
        if role.ema is None or self.stage != 3:
            return role.ema if self.acc.is_main_process else None
        full = {}
        for k, p in role.module.named_parameters():
            part = p.ds_tensor.new_zeros(p.ds_tensor.numel(), dtype=torch.float32)
            part[:role.ema[k].numel()] = role.ema[k]
            parts = [torch.empty_like(part) for _ in range(torch.distributed.get_world_size(p.ds_process_group))]
            torch.distributed.all_gather(parts, part, group=p.ds_process_group)
            if self.acc.is_main_process:
                full[k] = torch.cat(parts)[:p.ds_numel].view(p.ds_shape).cpu()
        return full if self.acc.is_main_process else None

    def load_ema(self, role: Role, full: dict[str, torch.Tensor]) -> None:
        if self.stage != 3 or role.name not in self.engines:
            return super().load_ema(role, full)
        role.ema = {}
        for k, p in role.module.named_parameters():
            start, length = self._partition(p)
            role.ema[k] = full[k].reshape(-1)[start:start + length].to(p.ds_tensor.device, torch.float32).clone()

    def snapshot(self, role: Role) -> Snapshot:
        with self.full_params(role):
            state = {k: v.detach().cpu().clone() for k, v in role.module.state_dict().items()} \
                if self.acc.is_main_process else None
        ema = self._full_ema(role)
        if not self.acc.is_main_process:
            return Snapshot(None, None, None)
        config = role.module.config
        return Snapshot(weights_record(config, state),
                        weights_record(config, ema_state(state, ema)) if ema is not None else None,
                        {"optimizer": {}, "scheduler": role.scheduler.state_dict(), "updates": role.updates})

    def checkpoint_shards(self, role: Role) -> tuple[dict, list]:
        """ZeRO-3: ({ZERO3_PARTITIONS: this rank's flat partition of every parameter (ds_tensor,
        padding included) and of the EMA, with what reassembles them}, no param groups: the
        optimizer's partitions travel in rng-rankR.pt). Nothing is gathered."""
        if self.stage != 3:
            raise ConfigError(f"{self.name}: sharded checkpoints are written under zero3 and fsdp only (ZeRO-2 "
                              f"holds whole weights on every rank); set checkpoint.format to auto or full")
        names, params = zip(*role.module.named_parameters())
        record = {"names": list(names), "shapes": [list(p.ds_shape) for p in params],
                  "numel": [int(p.ds_numel) for p in params], "partition": [p.ds_tensor.numel() for p in params],
                  "world_size": self.world, "model": [p.ds_tensor.detach().cpu().clone() for p in params],
                  "buffers": {k: b.detach().cpu().clone() for k, b in role.module.named_buffers()}}
        if role.ema is not None:
            record["ema"] = [role.ema[k].detach().cpu().clone() for k in names]   # the real elements only
        return {ZERO3_PARTITIONS: record}, []

    def load_partitions(self, role: Role, record: dict, where: str) -> None:
        """Put this rank's saved partitions (checkpoint_shards' record, same world size) back
        into the role's parameters and EMA, bit for bit."""
        names, params = zip(*role.module.named_parameters())
        mine = (list(names), [list(p.ds_shape) for p in params], [p.ds_tensor.numel() for p in params])
        theirs = (record.get("names"), record.get("shapes"), record.get("partition"))
        if mine != theirs:
            raise CheckpointError(f"{where}: partitions of another model or world size than this run's role "
                                  f"'{role.name}'; resume with the config and processes that wrote it")
        with torch.no_grad():
            for p, part in zip(params, record["model"]):
                p.ds_tensor.copy_(part)
            for k, b in role.module.named_buffers():
                if k in record["buffers"]:
                    b.copy_(record["buffers"][k])
        if "ema" in record:
            role.ema = {k: e.to(p.ds_tensor.device, torch.float32).clone()
                        for k, p, e in zip(names, params, record["ema"])}

    def checkpoint_template(self, role: Role, ema: bool) -> dict:
        return self.checkpoint_shards(role)

    def full_module(self, role: Role, use_ema: bool):
        snap = self.snapshot(role)
        if snap.weights is None:
            return None
        kept = snap.ema if use_ema and snap.ema is not None else snap.weights
        return plain_module(role.module.config, kept.state_dict(), self.acc.device)
