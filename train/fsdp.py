"""FSDP2, a strategy of train/parallel.py (whose docstring says how the strategies share one
interface): each role sharded per block (fully_shard), its weights read rank-locally, its
checkpoint shards written and read per rank, its EMA kept on the local shards."""

from __future__ import annotations

import warnings

import torch

from ..models.shard_loading import load_local_shards
from .parallel import SHARDED_FROZEN_DTYPE, DataParallel, Snapshot
from .roles import Role, ema_state, plain_module, weights_record


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
