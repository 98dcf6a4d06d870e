"""Per-GPU memory of a training run, before launching it: `forcelab plan CONFIG --gpus N`.

    plan = plan_memory(cfg, gpus=8)         # cfg: load_train_config(...)
    plan.strategies["fsdp"].total            # bytes per GPU at the step's peak

The estimate adds what lives through the whole run (each role's weights; a trainable role's
AdamW states, 2 x fp32, and EMA copy, fp32) to the peak of the largest role update: that
role's gradients, the activations autograd saves for the recipe's gradient passes
(Recipe.workload, train/workload.py), the KV cache of its rollout, bf16 weight copies under
autocast and the working set of the largest pass, with the end of the forward and the
backward counted apart (peak_bytes). Sharding (train/parallel.py) divides the
first group and the gradients by the world size as each strategy does:

    ddp    weights, gradients, AdamW, EMA replicated; a 25 MiB flat all-reduce bucket
    fsdp   weights, gradients, AdamW, EMA sharded / N; frozen roles sharded (bf16 if unset);
           two blocks and the root unit gathered at a time
    zero2  fp32 weights replicated; fp32 master, AdamW, gradients partitioned / N; DeepSpeed's
           reduce bucket; frozen roles and the EMA replicated
    zero3  weights, master, AdamW, gradients, EMA partitioned / N; prefetched parameters;
           frozen roles replicated

Activations per DiT block (models/dit.py), counted from what autograd saves in its forward
on the torch backend (L query tokens, K key tokens, T text tokens, all times the batch):
BLOCK_HIGH tensors [L, dim] stay fp32 (norm inputs and outputs, modulated inputs, RMSNorm
inputs, gated residual branches); BLOCK_LOW [L, dim] and BLOCK_KEYS [K, dim] are linear
inputs and attention operands in the compute dtype (bf16 under autocast); BLOCK_FFN [L, ffn]
(the FFN's hidden before and after GELU); the cross-attention's prompt K/V; per-token
statistics (norms, attention log-sum-exp); a masked layout's additive mask. With gradient
checkpointing only each block's input stays, and one block is recomputed at a time.
tests/test_memory_plan.py holds these counts against autograd block by block and the plan
against measured peaks of every toy recipe's updates, on the CPU. On CUDA, masked layouts in
bf16 run the Triton kernels, which build no mask and are taken to save what the torch
backend's attention saves (q, k, v, the output and the log-sum-exp); that is not measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..dtypes import parse_dtype
from ..errors import ConfigError
from ..models.config import DiTConfig
from .workload import ModelPass, Workload

GiB = 2 ** 30
FP32, BF16 = 4, 2
STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")
ADAM_STATES = 2                 # exp_avg, exp_avg_sq (fp32 each)
# what autograd saves per block (see the module docstring; measured in tests/test_memory_plan.py)
BLOCK_HIGH = 10                 # [L, dim] fp32 whatever the autocast
BLOCK_LOW = 10                  # [L, dim] in the compute dtype
BLOCK_KEYS = 2                  # [K, dim] attention keys and values in the compute dtype
BLOCK_FFN = 2                   # [L, ffn] in the compute dtype
TEXT_HIGH, TEXT_LOW = 1, 3      # [T, dim] cross-attention prompt K/V and their norm
NORMS_PER_BLOCK = 3             # LayerNorms (mean and rstd per token)
RMS_PER_BLOCK = 3               # RMSNorms (rstd per token)
ATTENTIONS_PER_BLOCK = 2        # self and cross attention (log-sum-exp per token and head)
HEAD_HIGH, HEAD_LOW = 2, 1      # the output head: norm input and output fp32, linear input
HEAD_LATENTS = 3                # latent-sized fp32 tensors per token: the patch input, the output, the loss target
# the working set beyond the saved tensors, per token (measured: tests/test_memory_plan.py). A
# pass without gradients holds a block's intermediates at one of two moments, whichever is
# larger: attention (bytes per unit of dim: the residual and the fp32 norm/modulation path with
# q, k, v) or the FFN (bytes per unit of dim and per unit of ffn: its hidden before and after
# GELU), by compute dtype; plus every layer's prompt K/V. A backward holds the gradients of a
# block's activations (fp32, per unit of dim).
WORK_ATTENTION_BYTES = {FP32: 28, BF16: 26}
WORK_FFN_SIDE_BYTES = {FP32: (20, 8), BF16: (12, 4)}
WORK_BACKWARD_DIM = 3
DDP_BUCKET = 25 * 2 ** 20       # train/trainer.py's flat all-reduce bucket (bytes)
ZERO_REDUCE_BUCKET = 500_000_000    # DeepSpeed's default reduce_bucket_size (elements)
ZERO3_PREFETCH = 50_000_000     # DeepSpeed's default stage3_prefetch_bucket_size (elements)
FSDP_GATHERED_BLOCKS = 2        # the block running and the one prefetched
# headroom: the CUDA context and NCCL buffers, and what the caching allocator cannot reuse
CUDA_CONTEXT = 1 * GiB
FRAGMENTATION = 0.10            # of the GPU's memory
# codecs: (spatial, temporal) strides of a non-toy VAE (the Wan VAE)
WAN_VAE_STRIDES = (8, 4)


@dataclass
class RoleModel:
    name: str
    config: DiTConfig
    trainable: bool
    params: int                 # parameters
    cast_params: int            # parameters autocast copies to bf16 (Linear and Conv weights)
    block_params: int           # parameters of one block
    root_params: int            # parameters outside the blocks
    weight_bytes: int           # as held (frozen: its dtype)
    ema: bool = False
    gradient_checkpointing: bool = False


# components of a role update (update_activations) besides the role's gradients
SAVED, RECOMPUTED = "activations", "recomputed block"
CACHE, CACHE_FORWARD = "kv cache", "kv cache (forward only)"
CASTS, CASTS_FORWARD = "bf16 weight copies", "bf16 weight copies (forward only)"
FORWARD_WORK, BACKWARD_WORK, GRADIENTS = "forward working set", "backward working set", "gradients"


def peak_bytes(update: dict[str, int]) -> int:
    """The peak of a role update from its components (name -> bytes; the gradients' name may
    carry the role). Two moments compete: the end of the forward (saved activations, the
    largest pass's working set) and the backward, where the saved activations and the
    gradients count as the larger of the two, not their sum (the backward frees each block's
    saved tensors as it makes that block's weight gradients), with the recomputed block of a
    checkpointed pass and the gradients of one block's activations on top. The KV cache and
    autocast's bf16 weight copies live through both, or, when no gradient pass needs them
    (a critic's update: the student's rollout and its weights run without gradients), only
    through the forward."""
    get = update.get
    forward = get(SAVED, 0) + get(FORWARD_WORK, 0) + get(CACHE_FORWARD, 0) + get(CASTS_FORWARD, 0)
    backward = (max(get(SAVED, 0), sum(v for k, v in update.items() if k.startswith(GRADIENTS)))
                + get(RECOMPUTED, 0) + get(BACKWARD_WORK, 0))
    return get(CACHE, 0) + get(CASTS, 0) + max(forward, backward)


@dataclass
class StrategyPlan:
    name: str
    static: dict[str, int]      # weights, AdamW states, EMA, frozen roles, gathered units (bytes per GPU)
    updates: dict[str, dict[str, int]]   # role -> the components of its update (see peak_bytes)

    def role_total(self, role: str) -> int:
        """The peak per GPU during `role`'s update."""
        return sum(self.static.values()) + peak_bytes(self.updates[role])

    @property
    def peak_role(self) -> str:
        """The update that sets the peak."""
        return max(self.updates, key=self.role_total)

    @property
    def total(self) -> int:
        return self.role_total(self.peak_role)

    @property
    def components(self) -> dict[str, int]:
        """The static components and the peak update's."""
        return {**self.static, **self.updates[self.peak_role]}


@dataclass
class MemoryPlan:
    gpus: int
    gpu_memory: int
    usable: int                 # gpu_memory minus the headroom
    micro_batch: int            # per GPU
    accumulation: int           # to reach global_batch
    global_batch: int
    tokens_per_frame: int
    strategies: dict[str, StrategyPlan] = field(default_factory=dict)
    activations: dict[str, int] = field(default_factory=dict)   # per role update

    def fits(self, strategy: str) -> bool:
        return self.strategies[strategy].total <= self.usable


# ---------------------------------------------------------------------------- the roles
def _count(config: DiTConfig) -> tuple[int, int, int, int]:
    """(parameters, Linear/Conv parameters, one block's, outside the blocks) of a DiT."""
    from ..models.dit import CausalDiT

    with torch.device("meta"):
        model = CausalDiT(config)
    total = sum(p.numel() for p in model.parameters())
    cast = sum(p.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d))
               for p in m.parameters(recurse=False))
    block = sum(p.numel() for p in model.blocks[0].parameters())
    return total, cast, block, total - block * config.num_layers


def _frozen_bytes(config: DiTConfig, dtype: torch.dtype) -> int:
    """Weights of a frozen role in dtype, its `keeps_fp32` parameters in fp32 (CausalDiT.set_dtype)."""
    from ..models.dit import CausalDiT

    with torch.device("meta"):
        model = CausalDiT(config)
    size = torch.tensor([], dtype=dtype).element_size()
    return sum(p.numel() * (FP32 if CausalDiT.keeps_fp32(n) else size) for n, p in model.named_parameters())


def role_models(cfg, frozen_dtype: torch.dtype | None = None) -> dict[str, RoleModel]:
    """Each role's architecture (its init weights' config when readable, else its preset with
    the overrides), parameter counts and settings. frozen_dtype: the dtype of frozen roles
    whose config sets none (FSDP: bf16)."""
    from .config import RoleConfig, weights_config
    from .recipe import recipe_class

    specs = recipe_class(cfg.recipe).roles
    out = {}
    for name, spec in specs.items():
        rcfg = cfg.roles.get(name) or RoleConfig()
        trainable = spec.trainable if rcfg.trainable is None else rcfg.trainable
        config = weights_config(cfg, name) or DiTConfig.preset(rcfg.preset or cfg.model_preset,
                                                              **dict(cfg.model_overrides))
        total, cast, block, root = _count(config)
        if trainable:
            weights = total * FP32
        else:
            weights = _frozen_bytes(config, parse_dtype(rcfg.dtype) or frozen_dtype or torch.float32)
        out[name] = RoleModel(name, config, trainable, total, cast, block, root, weights,
                              ema=trainable and rcfg.ema_decay is not None,
                              gradient_checkpointing=trainable and bool(rcfg.gradient_checkpointing))
    return out


# ---------------------------------------------------------------------------- activations
def _strides(vae: str) -> tuple[int, int]:
    if vae == "toy" or str(vae).startswith("toy:"):
        from ..models.autoencoder import load_autoencoder
        codec = load_autoencoder(vae)
        return codec.spatial_stride, codec.temporal_stride
    return WAN_VAE_STRIDES


def clip_shape(cfg, student: DiTConfig) -> tuple[int, int]:
    """(latent frames of a data clip, tokens per latent frame) from data.frames/height/width.
    Clips of shard sources without data.frames: forcelab preprocess's default length (set
    data.frames to plan other clips)."""
    from ..data.preprocess import DEFAULT_CLIP_FRAMES
    from ..data.toyworld import ToyWorldConfig
    from .data import TOYWORLD

    spatial, temporal = _strides(cfg.vae)
    default = ToyWorldConfig.frames if cfg.data.source == TOYWORLD else DEFAULT_CLIP_FRAMES
    pixel_frames = cfg.data.frames or default
    frames = 1 + (pixel_frames - 1) // temporal
    return frames, student.tokens_per_frame(cfg.data.height // spatial, cfg.data.width // spatial)


def _sizes(p: ModelPass, c: DiTConfig, batch: int, tokens: int) -> tuple[int, int, int]:
    """(query, key, text) tokens of a pass, over its batch."""
    B = p.batch * batch
    return B * p.frames * tokens, B * p.keys * tokens, B * c.text_len


def block_bytes(p: ModelPass, c: DiTConfig, batch: int, tokens: int, low: int, mask_layouts: bool) -> int:
    """One block's saved tensors (also the recomputed block of a checkpointed pass). low: bytes
    of the compute dtype; mask_layouts: masked layouts run on the torch backend, which keeps
    their additive mask [Lq, Lk] fp32 (shared by the batch; the Triton kernels build none)."""
    L, K, T = _sizes(p, c, batch, tokens)
    per_token = FP32 * (2 * NORMS_PER_BLOCK + RMS_PER_BLOCK + ATTENTIONS_PER_BLOCK * c.num_heads)
    mask = FP32 * p.frames * tokens * p.keys * tokens if p.masked and mask_layouts else 0
    return (L * c.dim * (BLOCK_HIGH * FP32 + BLOCK_LOW * low) + K * c.dim * BLOCK_KEYS * low
            + L * c.ffn_dim * BLOCK_FFN * low + T * c.dim * (TEXT_HIGH * FP32 + TEXT_LOW * low)
            + L * per_token + mask)


def saved_bytes(p: ModelPass, model: RoleModel, batch: int, tokens: int, low: int, mask_layouts: bool) -> int:
    """Bytes autograd keeps for a gradient pass until its backward (see the module docstring):
    every block's saved tensors, or with gradient checkpointing each block's fp32 input."""
    c = model.config
    L = _sizes(p, c, batch, tokens)[0]
    head = L * c.dim * (HEAD_HIGH * FP32 + HEAD_LOW * low) + L * latent_numbers(c) * HEAD_LATENTS * FP32
    if model.gradient_checkpointing:
        return c.num_layers * L * c.dim * FP32 + head
    return c.num_layers * block_bytes(p, c, batch, tokens, low, mask_layouts) + head


def latent_numbers(c: DiTConfig) -> int:
    """Latent numbers per token (in_channels x the patch)."""
    return c.in_channels * math.prod(c.patch_size)


def working_bytes(p: ModelPass, c: DiTConfig, batch: int, tokens: int, low: int) -> int:
    """What a pass holds beyond the saved tensors: without gradients one block's
    intermediates and every layer's prompt K/V; with gradients, in its backward, the
    gradients of one block's activations. low: bytes of the pass's compute dtype."""
    L, _, T = _sizes(p, c, batch, tokens)
    if p.grad:
        return L * WORK_BACKWARD_DIM * c.dim * FP32
    per_dim, per_ffn = WORK_FFN_SIDE_BYTES[low]
    block = max(WORK_ATTENTION_BYTES[low] * c.dim, per_dim * c.dim + per_ffn * c.ffn_dim)
    return L * block + c.num_layers * 2 * T * c.dim * low


def cache_bytes(w: Workload, model: RoleModel, batch: int, tokens: int, bf16: bool) -> int:
    """The rollout's KV cache: layers x (K, V) x tokens x dim in the dtype the passes compute in
    (CausalDiT.cache_dtype: bf16 under autocast, else the model's), and the prompt's
    cross-attention K/V (V in the compute dtype, K in the model's: its RMSNorm weight promotes it)."""
    if not w.cache_frames:
        return 0
    c = model.config
    low, high = compute_bytes(model, bf16), compute_bytes(model, bf16=False)
    frames = batch * w.cache_frames * tokens * 2 * low
    prompt = batch * c.text_len * ((high if c.qk_norm else low) + low)
    return c.num_layers * (frames + prompt) * c.dim


def compute_bytes(role: RoleModel, bf16: bool) -> int:
    """Bytes per element a role computes in: bf16 under autocast or with 16-bit weights (a
    frozen role's dtype; its few fp32 parameters aside), else fp32."""
    return BF16 if bf16 or role.weight_bytes < role.params * FP32 else FP32


def update_activations(w: Workload, roles: dict[str, RoleModel], batch: int, tokens: int, bf16: bool,
                       mask_layouts: bool) -> dict[str, int]:
    """The activation-side components of one role update (bytes per GPU)."""
    low = BF16 if bf16 else FP32
    grad = [p for p in w.passes if p.grad]
    saved = sum(p.count * saved_bytes(p, roles[p.role], batch, tokens, low, mask_layouts) for p in grad)
    recompute = max((block_bytes(p, roles[p.role].config, batch, tokens, low, mask_layouts)
                     for p in grad if roles[p.role].gradient_checkpointing), default=0)
    forward = max((working_bytes(p, roles[p.role].config, batch, tokens, compute_bytes(roles[p.role], bf16))
                   for p in w.passes if not p.grad), default=0)
    backward = max((working_bytes(p, roles[p.role].config, batch, tokens, low) for p in grad), default=0)
    # autocast keeps a bf16 copy of every weight that requires gradients for the micro-step; a
    # gradient pass's copies stay saved through the backward
    trained = {r for r in {p.role for p in w.passes} if roles[r].trainable}
    with_grad = {p.role for p in grad}
    casts = {r: roles[r].cast_params * BF16 if bf16 else 0 for r in trained}
    cache = cache_bytes(w, roles[w.cache_role], batch, tokens, bf16) if w.cache_role in roles else 0
    cache_in_backward = any(p.cached for p in grad)
    return {SAVED: saved, RECOMPUTED: recompute,
            CACHE if cache_in_backward else CACHE_FORWARD: cache,
            CASTS: sum(v for r, v in casts.items() if r in with_grad),
            CASTS_FORWARD: sum(v for r, v in casts.items() if r not in with_grad),
            FORWARD_WORK: forward, BACKWARD_WORK: backward}


# ---------------------------------------------------------------------------- strategies
def static_bytes(roles: dict[str, RoleModel], strategy: str, world: int) -> dict[str, int]:
    """Weights, AdamW states and EMA copies per GPU (everything but gradients and activations)."""
    n = world
    out = {"weights (trainable)": 0, "master weights": 0, "AdamW states": 0, "EMA": 0, "frozen roles": 0,
           "gathered weights": 0}
    for r in roles.values():
        if not r.trainable:
            out["frozen roles"] += r.weight_bytes // n if strategy == "fsdp" else r.weight_bytes
            continue
        P = r.params
        shard = strategy in ("fsdp", "zero2", "zero3")
        out["weights (trainable)"] += P * FP32 // (n if strategy in ("fsdp", "zero3") else 1)
        out["master weights"] += P * FP32 // n if strategy in ("zero2", "zero3") else 0
        out["AdamW states"] += ADAM_STATES * P * FP32 // (n if shard else 1)
        out["EMA"] += (P * FP32 // (n if strategy in ("fsdp", "zero3") else 1)) if r.ema else 0
    sharded = [r for r in roles.values() if strategy == "fsdp" or (strategy == "zero3" and r.trainable)]
    if sharded and n > 1:
        big = max(sharded, key=lambda r: r.block_params)
        if strategy == "fsdp":
            size = big.weight_bytes // max(big.params, 1)
            out["gathered weights"] = (FSDP_GATHERED_BLOCKS * big.block_params + big.root_params) * size
        else:
            out["gathered weights"] = min(ZERO3_PREFETCH, big.params) * FP32 + big.block_params * FP32
    return out


def gradient_bytes(role: RoleModel, strategy: str, world: int) -> int:
    """A role's gradients per GPU during its update, with the strategy's reduction buffers."""
    P, n = role.params, world
    if strategy == "ddp":
        return P * FP32 + (min(DDP_BUCKET, P * FP32) if n > 1 else 0)
    if strategy == "fsdp":     # sharded; one block's unsharded gradients before the reduce-scatter
        return P * FP32 // n + (role.block_params * FP32 if n > 1 else 0)
    # ZeRO: each rank keeps its partition; gradients pass through the reduce bucket
    return P * FP32 // n + min(ZERO_REDUCE_BUCKET, P) * FP32


# ---------------------------------------------------------------------------- the plan
def parse_memory(text: str, name: str | None = None) -> int:
    """'80GB', '80GiB', '80G', '96000MB' -> bytes (GB and GiB alike: binary, as nvidia-smi
    reports). name: what the value is, for the error (argparse names the flag itself)."""
    units = {"tb": 2 ** 40, "tib": 2 ** 40, "t": 2 ** 40, "gb": GiB, "gib": GiB, "g": GiB,
             "mb": 2 ** 20, "mib": 2 ** 20, "m": 2 ** 20}
    s = str(text).strip().lower()
    number = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(number):].strip()
    try:
        value = float(number)
    except ValueError:
        value = math.nan
    if unit not in units or not math.isfinite(value) or value <= 0:
        what = f"{name} " if name else ""
        raise ConfigError(f"{what}{text!r}: not a memory size; write a positive size with a unit, e.g. 80GB, "
                          f"141GB, 96000MB (units: {', '.join(sorted(units))}, case-insensitive)")
    return int(value * units[unit])


def headroom(gpu_memory: int) -> int:
    """Bytes left out of the plan: the CUDA context (and NCCL's buffers) and fragmentation."""
    return CUDA_CONTEXT + int(FRAGMENTATION * gpu_memory)


def accumulation_steps(global_batch: int, micro_batch: int, gpus: int) -> int:
    """ceil(global / (micro x gpus)): the accumulation that reaches at least the global batch."""
    return -(-global_batch // (micro_batch * gpus))


def plan_memory(cfg, gpus: int, gpu_memory: int = 80 * GiB, global_batch: int | None = None,
                strategies: tuple[str, ...] = STRATEGIES, device: str = "cuda") -> MemoryPlan:
    """The per-GPU plan of cfg (a loaded training config) on `gpus` GPUs for every strategy.
    global_batch: the samples per optimizer update to reach (None: the config's
    data.batch_size x gradient_accumulation_steps x gpus). device: "cuda" (masked layouts in bf16
    run the Triton kernels) or "cpu" (every layout on the torch backend)."""
    from .recipe import recipe_class

    micro = cfg.data.batch_size
    target = global_batch or micro * cfg.gradient_accumulation_steps * gpus
    accum = accumulation_steps(target, micro, gpus)
    bf16 = cfg.mixed_precision == "bf16"
    mask_layouts = device == "cpu" or not bf16     # the Triton kernels serve 16-bit (kernels/dispatch.py)
    base = role_models(cfg)
    student = base.get("generator", next(iter(base.values()))).config
    frames, tokens = clip_shape(cfg, student)
    workloads = recipe_class(cfg.recipe).workload(getattr(cfg, "algo", None), frames, student.chunk_frames)
    plan = MemoryPlan(gpus, gpu_memory, gpu_memory - headroom(gpu_memory), micro, accum, micro * gpus * accum,
                      tokens)
    for strategy in strategies:
        roles = role_models(cfg, torch.bfloat16) if strategy == "fsdp" else base
        static = static_bytes(roles, strategy, gpus)
        updates = {}
        for name, w in workloads.items():
            if name not in roles or not roles[name].trainable:
                continue
            parts = update_activations(w, roles, micro, tokens, bf16, mask_layouts)
            plan.activations[name] = parts[SAVED]
            updates[name] = {f"{GRADIENTS} ({name})": gradient_bytes(roles[name], strategy, gpus), **parts}
        if not updates:
            raise ConfigError(f"recipe {cfg.recipe}: no trainable role to plan (every role is frozen)")
        plan.strategies[strategy] = StrategyPlan(strategy, static, updates)
    return plan


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a table per strategy, a fit verdict each and the accumulation rule."""
    gib = lambda b: f"{b / GiB:9.2f}"   # noqa: E731
    lines = [f"per-GPU memory on {plan.gpus} GPU(s) of {plan.gpu_memory / GiB:.0f} GiB: usable "
             f"{plan.usable / GiB:.1f} GiB after {CUDA_CONTEXT / GiB:.0f} GiB CUDA context + "
             f"{FRAGMENTATION:.0%} fragmentation headroom; {plan.tokens_per_frame} tokens per latent frame"]
    for s in plan.strategies.values():
        lines.append("")
        lines.append(f"{s.name}  (peak in the {s.peak_role} update)")
        for k, v in s.components.items():
            if v:
                lines.append(f"  {k:36s}{gib(v)} GiB")
        verdict = "fits" if plan.fits(s.name) else "does NOT fit"
        lines.append(f"  {'total (peak)':36s}{gib(s.total)} GiB   {verdict}")
    lines.append("")
    lines.append("peak = the components above, except that the end of the forward (activations + forward working "
                 "set + the forward-only items) and the backward (the larger of activations and gradients + "
                 "recomputed block + backward working set) do not overlap")
    lines.append(f"global batch {plan.global_batch} = micro-batch {plan.micro_batch} per GPU x {plan.gpus} GPU(s) x "
                 f"{plan.accumulation} accumulation step(s) (accumulation = ceil(global / (micro x GPUs)); "
                 f"it adds no memory: gradients accumulate in place)")
    return "\n".join(lines)
