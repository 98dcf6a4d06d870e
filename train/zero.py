"""DeepSpeed ZeRO-2/3, a strategy of train/parallel.py (whose docstring says how the strategies
share one interface): a DeepSpeed engine per trainable role, ZeRO-3's partitioned weights (read
rank-locally) and EMA, each rank's partitions in its checkpoint."""

from __future__ import annotations

import contextlib
import importlib

import torch

from ..errors import CheckpointError, ConfigError
from ..models.checkpoint import read_config, read_plan
from ..models.shard_loading import load_local_shards
from .checkpoint import ZERO3_PARTITIONS
from .parallel import DataParallel, Snapshot
from .roles import Role, ema_state, plain_module, weights_record


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
