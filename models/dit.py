"""CausalDiT: the Wan2.1 transformer, as teacher, critic and causal student.

One module, three ways to call it (x [B, C, F, H, W] latents, timestep [B] or per-frame
[B, F] in [0, 1000], context [B, L, text_dim] with L <= text_len):

    v = model(x, t, context)                                  # bidirectional (teacher, critic)
    v = model(x, t, context, chunk_frames=3)                  # block-causal over the whole clip
    cache = model.new_cache(batch_size=B, height=H, width=W)  # streaming (student)
    model.set_prompt(cache, context)
    v = model(x_chunk, t_chunk, cache=cache)                  # reads the cache, changes nothing
    model(x_clean, t_zero, cache=cache, commit=True)          # the clean pass writes the chunk

It returns the flow prediction v = noise - x0 with x's shape (see models/schedule.py).
Module and parameter names follow the original Wan2.1 checkpoints (models/checkpoint.py maps
diffusers names). Block math (Wan2.1; e0 = per-frame modulation, computed in fp32):

    x = x + self_attn(norm1(x) * (1 + scale_msa) + shift_msa) * gate_msa
    x = x + cross_attn(norm3(x), context)
    x = x + ffn(norm2(x) * (1 + scale_ffn) + shift_ffn) * gate_ffn
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import ForcelabError
from ..kernels import AttentionLayout, apply_rope, attention, qk_norm_rope, rms_norm
from ..validate import positive_int
from .checkpoint import DEFAULT_SHARD_BYTES, load_state_into, read_config, save_state
from .config import DiTConfig
from .kv_cache import KVCache
from .rope import rope_tables

MODULATION_TERMS = 6  # shift, scale, gate for attention, then for the FFN
FP32_PREFIXES = ("time_embedding.", "time_projection.")
FP32_SUFFIXES = ("modulation",)


@lru_cache(maxsize=8)
def _frequencies(half: int, device: torch.device) -> torch.Tensor:
    """10000^(-i / half), i < half, float64: built once per width and device (shared, read-only)."""
    return torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=device) / half)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [N] -> [N, dim], cat(cos, sin), in float64 as Wan computes it."""
    angles = torch.outer(t.to(torch.float64), _frequencies(dim // 2, t.device))
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def init_modulation(terms: int, dim: int) -> torch.Tensor:
    """A modulation table [1, terms, dim] ~ N(0, 1 / dim) (randn / sqrt(dim), bit for bit).
    Nothing is drawn on the meta device (loading): there torch's normal_ runs its Python
    reference, which imports its symbolic-shape machinery (sympy; seconds at start-up)."""
    table = torch.empty(1, terms, dim)
    return table if table.is_meta else table.normal_().div_(dim ** 0.5)


def fp32(x: torch.Tensor) -> torch.Tensor:
    """x in float32; x itself when it already is (no dispatch for the no-op cast)."""
    return x if x.dtype == torch.float32 else x.float()


def modulate(normed: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """normed * (1 + scale) + shift, in fp32 (Wan), returned in dtype."""
    out = torch.addcmul(shift, fp32(normed), 1 + scale)
    return out if out.dtype == dtype else out.to(dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + y * gate, in fp32 (Wan), returned in x's dtype."""
    out = torch.addcmul(fp32(x), fp32(y), gate)
    return out if out.dtype == x.dtype else out.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in fp32 (affine parameters too), returned in the input dtype (Wan)."""

    def forward(self, x):
        weight = None if self.weight is None else fp32(self.weight)
        bias = None if self.bias is None else fp32(self.bias)
        out = F.layer_norm(fp32(x), self.normalized_shape, weight, bias, self.eps)
        return out if out.dtype == x.dtype else out.to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.num_heads, self.eps = cfg.num_heads, cfg.eps
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        self.norm_q = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else None
        self.norm_k = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else None

    def _norm(self, x, norm):
        x = norm(x) if norm is not None else x
        return x.unflatten(-1, (self.num_heads, -1))

    def forward(self, x, rope, layout, backend, cache=None, layer=0, start_frame=0, commit=False, past=None):
        """x [B, L, dim]; rope = (cos, sin, cos_k, sin_k). Without a cache: tables for the
        queries and for the keys. With one: tables for this pass's frames (queries and new
        keys alike), then for the sink keys or (None, None) (see KVCache.attention_kv).
        past: the cached keys/values this pass reads, taken before the pass (a CachedKV;
        passes with gradients), so that a recomputation sees what the forward saw."""
        cos_q, sin_q, cos_k, sin_k = rope
        if cache is not None:
            cos_k, sin_k = cos_q, sin_q          # cached keys are stored already rotated
        v = self.v(x).unflatten(-1, (self.num_heads, -1))
        if self.norm_q is not None:
            q = qk_norm_rope(self.q(x), self.norm_q.weight, cos_q, sin_q, self.eps, self.num_heads, backend)
            k = qk_norm_rope(self.k(x), self.norm_k.weight, cos_k, sin_k, self.eps, self.num_heads, backend)
        else:
            q = apply_rope(self._norm(self.q(x), None), cos_q, sin_q)
            k = apply_rope(self._norm(self.k(x), None), cos_k, sin_k)
        if cache is None:
            # under autocast v is bf16 while the fp32 norm/RoPE tables promote q and k
            return self.o(attention(q.to(v.dtype), k.to(v.dtype), v, layout, backend=backend).flatten(2))
        sink_rope = rope[2:] if rope[2] is not None else None
        read = layout.num_keys - k.shape[1]                  # cached key tokens this pass reads
        k_all, v_all = cache.attention_kv(layer, read, k, v, sink_rope, past=past)
        if cache.policy.plain:
            out = attention(q.to(v_all.dtype), k_all, v_all, layout, backend=backend)
        else:
            out = cache.policy.attend(cache, layer, q.to(v_all.dtype), k_all, v_all, layout, backend,
                                      past=past, commit=commit)
        if commit:
            k_pre = self._norm(self.k(x), self.norm_k).detach() if cache.needs_pre_rope(start_frame) else None
            cache.write(layer, start_frame, k.detach(), v.detach(), k_pre)
        return self.o(out.flatten(2))


class CrossAttention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.num_heads, self.eps = cfg.num_heads, cfg.eps
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        self.norm_q = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()

    def context_kv(self, context):
        """context [B, L, dim] (after text_embedding) -> K, V [B, L, H, D]: cacheable per prompt."""
        k = self.norm_k(self.k(context)).unflatten(-1, (self.num_heads, -1))
        v = self.v(context).unflatten(-1, (self.num_heads, -1))
        return k, v

    def forward(self, x, kv):
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        k, v = kv
        # every text token is visible (Wan attends the zero padding too): a dense call
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(out.transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.modulation = nn.Parameter(init_modulation(MODULATION_TERMS, cfg.dim))
        self.norm1 = LayerNorm32(cfg.dim, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg)
        self.norm3 = LayerNorm32(cfg.dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = LayerNorm32(cfg.dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))

    def forward(self, x, e0, context_kv, rope, layout, backend, **cache_args):
        """x [B, f, S, dim] (tokens grouped by frame); e0 [B, f or 1, 6, dim] fp32."""
        B, f, S, dim = x.shape
        mod = (fp32(self.modulation)[None] + e0).unsqueeze(3)  # [B, f, 6, 1, dim]
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = mod.unbind(2)

        y = modulate(self.norm1(x), shift_msa, scale_msa, x.dtype)
        y = self.self_attn(y.flatten(1, 2), rope, layout, backend, **cache_args).view(B, f, S, dim)
        x = gated_residual(x, y, gate_msa)

        y = self.cross_attn(self.norm3(x).flatten(1, 2), context_kv).view(B, f, S, dim)
        x = x + y

        y = self.ffn(modulate(self.norm2(x), shift_ffn, scale_ffn, x.dtype))
        return gated_residual(x, y, gate_ffn)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.modulation = nn.Parameter(init_modulation(2, cfg.dim))
        self.norm = LayerNorm32(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_channels * math.prod(cfg.patch_size))

    def forward(self, x, e):
        """x [B, f, S, dim]; e [B, f or 1, dim] (the time embedding, not e0)."""
        shift, scale = (fp32(self.modulation)[None] + fp32(e)[:, :, None]).unsqueeze(3).unbind(2)
        return self.head(modulate(self.norm(x), shift, scale, x.dtype))


class CausalDiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = cfg = config
        self.patch_embedding = nn.Conv3d(cfg.in_channels, cfg.dim, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, MODULATION_TERMS * cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.gradient_checkpointing = False   # training switch: trade compute for activation memory

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def keeps_fp32(name: str) -> bool:
        """Parameters kept in fp32 when the model runs in bf16/fp16 (as diffusers keeps its
        time embedder and scale-shift tables): the timestep path and the modulation tables,
        whose small differences are amplified by every block."""
        return name.startswith(FP32_PREFIXES) or name.endswith(FP32_SUFFIXES)

    def set_dtype(self, dtype: torch.dtype) -> "CausalDiT":
        """Cast the weights to dtype, keeping `keeps_fp32` parameters in fp32."""
        for name, param in self.named_parameters():
            param.data = param.data.to(torch.float32 if self.keeps_fp32(name) else dtype)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def _check_input(self, x: torch.Tensor, timestep: torch.Tensor) -> None:
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ForcelabError(f"CausalDiT: x must be [B, {cfg.in_channels}, F, H, W], got {tuple(x.shape)}")
        pt, ph, pw = cfg.patch_size
        if x.shape[2] % pt or x.shape[3] % ph or x.shape[4] % pw:
            raise ForcelabError(f"CausalDiT: frames/height/width {tuple(x.shape[2:])} must be multiples "
                                f"of the patch size {cfg.patch_size}")
        B, F_ = x.shape[0], x.shape[2]
        if timestep.shape not in ((B,), (B, F_)) and timestep.shape != ():
            raise ForcelabError(f"CausalDiT: timestep must be [B]={B} or per-frame [B, F]=[{B}, {F_}], "
                                f"got {tuple(timestep.shape)}")
        if timestep.ndim == 2 and pt != 1:
            raise ForcelabError("CausalDiT: per-frame timesteps need a temporal patch size of 1")

    @staticmethod
    def _as_timestep(timestep, device) -> torch.Tensor:
        """The timestep as a tensor on device. Values given as Python numbers are checked here;
        a tensor's values are not read (on an accelerator that read would synchronise every
        forward): the rollout engine's plans and the recipes' timestep laws are validated once,
        where they are made."""
        if isinstance(timestep, torch.Tensor):
            return timestep.to(device)
        values = torch.as_tensor(timestep)
        if values.is_floating_point() and not bool(torch.isfinite(values).all()):
            raise ForcelabError(f"CausalDiT: timestep has NaN or infinite values ({values.flatten()[:8].tolist()}); "
                                f"timesteps are finite numbers in [0, 1000]")
        return values.to(device)

    def embed_context(self, context: torch.Tensor) -> torch.Tensor:
        """[B, L, text_dim] -> [B, text_len, dim]: zero-pad to text_len (Wan), then embed."""
        cfg = self.config
        if context.ndim != 3 or context.shape[2] != cfg.text_dim:
            raise ForcelabError(f"CausalDiT: context must be [B, L, {cfg.text_dim}], got {tuple(context.shape)}")
        if context.shape[1] > cfg.text_len:
            raise ForcelabError(f"CausalDiT: context has {context.shape[1]} tokens, more than text_len={cfg.text_len}")
        context = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
        return self.text_embedding(context.to(self.dtype))

    def context_kv(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention K/V of every layer for a prompt's embedding."""
        ctx = self.embed_context(context)
        return [blk.cross_attn.context_kv(ctx) for blk in self.blocks]

    def time_embed(self, timestep: torch.Tensor, batch: int, frames: int):
        """-> e [B, f or 1, dim] and e0 [B, f or 1, 6, dim], both fp32."""
        t = timestep.reshape(batch, -1) if timestep.ndim else timestep.expand(batch)[:, None]
        emb = timestep_embedding(t.flatten(), self.config.freq_dim).to(self.time_embedding[0].weight.dtype)
        e = self.time_embedding(emb)
        e0 = self.time_projection(e).unflatten(-1, (MODULATION_TERMS, -1))
        return fp32(e).view(batch, t.shape[1], -1), fp32(e0).view(batch, t.shape[1], MODULATION_TERMS, -1)

    # ------------------------------------------------------------------ streaming
    def new_cache(self, batch_size: int, height: int, width: int, *, chunk_frames: int | None = None,
                  window_frames: int | None = ..., sink_frames: int | None = None,
                  max_frames: int | None = None, sink_rope: str | None = None,
                  dtype: torch.dtype | None = None, device=None, cache_policy=None) -> KVCache:
        """A KV cache for latents of height x width; unset options come from the config, an
        unset dtype from cache_dtype. cache_policy: what a full window keeps (a spec or a
        CachePolicy; None: sink_window, see models/cache_policy.py)."""
        cfg = self.config
        height, width = positive_int(height, "new_cache: height"), positive_int(width, "new_cache: width")
        return KVCache(
            num_layers=cfg.num_layers, batch_size=batch_size,
            tokens_per_frame=cfg.tokens_per_frame(height, width), num_heads=cfg.num_heads,
            head_dim=cfg.head_dim, chunk_frames=cfg.chunk_frames if chunk_frames is None else chunk_frames,
            window_frames=cfg.window_frames if window_frames is ... else window_frames,
            sink_frames=cfg.sink_frames if sink_frames is None else sink_frames,
            max_frames=max_frames, sink_rope=sink_rope or cfg.sink_rope,
            dtype=dtype or self.cache_dtype(device), device=device or self.device, cache_policy=cache_policy)

    def cache_dtype(self, device=None) -> torch.dtype:
        """The dtype of the keys and values a pass produces, which a cache stores: autocast's
        when autocast is on for the device (mixed precision keeps the weights fp32 and would
        double an fp32 cache), else the weights'."""
        kind = torch.device(device or self.device).type
        if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
        return self.dtype

    def set_prompt(self, cache: KVCache, context: torch.Tensor) -> None:
        """Compute the prompt's cross-attention K/V once and keep them in the cache."""
        cache.set_context(self.context_kv(context))

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, timestep, context: torch.Tensor | None = None, *,
                chunk_frames: int | None = None, window_frames: int | None = None,
                sink_frames: int = 0, cache: KVCache | None = None, start_frame: int | None = None,
                commit: bool = False, attention_backend: str | None = None,
                teacher_forcing: bool = False) -> torch.Tensor:
        """v [B, C, F, H, W] for x [B, C, F, H, W] at timestep [B] or [B, F] (0..1000).

        Without a cache: bidirectional over the prompt `context`, or block-causal with
        chunk_frames (optional window_frames, sink_frames). teacher_forcing: x holds [clean |
        noisy] copies of one video (F = 2 * frames, both halves at the same RoPE positions);
        a noisy chunk sees the clean copies of earlier chunks and itself (needs chunk_frames).
        With a cache: frames [start_frame, start_frame + F) against it (commit=True writes them)."""
        cfg = self.config
        timestep = self._as_timestep(timestep, x.device)
        self._check_input(x, timestep)
        backend = attention_backend or cfg.attention_backend
        B = x.shape[0]
        tokens = self.patch_embedding(x.to(self.dtype))        # [B, dim, f, h, w]
        f, h, w = tokens.shape[2:]
        S = h * w
        tokens = tokens.flatten(3).permute(0, 2, 3, 1).contiguous()  # [B, f, h * w, dim]
        e, e0 = self.time_embed(timestep, B, f)

        if cache is None:
            if context is None:
                raise ForcelabError("CausalDiT: context is required without a cache")
            ctx_kv = self.context_kv(context)
            if f > cfg.rope_max_len or max(h, w) > cfg.rope_max_len:
                raise ForcelabError(f"CausalDiT: {f} frames / {h}x{w} tokens exceed rope_max_len="
                                    f"{cfg.rope_max_len}; generate long videos by streaming with a window")
            positions = range(f)
            if teacher_forcing:
                if chunk_frames is None or f % 2:
                    raise ForcelabError("CausalDiT: teacher_forcing needs chunk_frames and [clean | noisy] "
                                        f"halves of equal length, got {f} frames")
                layout = AttentionLayout.teacher_forcing(f // 2, S, chunk_frames, window_frames, sink_frames)
                positions = list(range(f // 2)) * 2
            elif chunk_frames is None:
                layout = AttentionLayout.full(f, S)
            else:
                layout = AttentionLayout.block_causal(f, S, chunk_frames, window_frames, sink_frames)
            cos_q, sin_q = rope_tables(cfg, positions, h, w, x.device)
            rope = (cos_q, sin_q, cos_q, sin_q)
            cache_args = {}
        else:
            start = cache.end_frame if start_frame is None else start_frame
            layout, rope, ctx_kv = self._stream_setup(cache, context, B, f, h, w, start, x.device)
            cache_args = dict(cache=cache, start_frame=start, commit=commit)

        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        # A pass with gradients reads the cache before its block runs: a checkpointed block is
        # recomputed in backward, after later passes wrote the cache (see KVCache.read).
        read_first = cache is not None and torch.is_grad_enabled()
        for i, blk in enumerate(self.blocks):
            if cache is not None:
                cache_args["layer"] = i
            if read_first:
                cache_args["past"] = cache.read(i, layout.num_keys - f * S, rope[2:] if rope[2] is not None else None,
                                                recomputable=recompute)
            if recompute:   # keep only block inputs; recompute each block in backward
                tokens = checkpoint(blk, tokens, e0, ctx_kv[i], rope, layout, backend, use_reentrant=False,
                                    **cache_args)
            else:
                tokens = blk(tokens, e0, ctx_kv[i], rope, layout, backend, **cache_args)
        out = self.head(tokens, e)                               # [B, f, S, C * prod(patch)]
        pt, ph, pw = cfg.patch_size
        # [B, f, (h w), (p q r c)] -> [B, c, (f p), (h q), (w r)]
        out = out.unflatten(-1, (pt, ph, pw, -1)).unflatten(2, (h, w)).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = out.reshape(B, -1, f * pt, h * ph, w * pw)
        return out if out.dtype == x.dtype else fp32(out).to(x.dtype)

    def _stream_setup(self, cache: KVCache, context, batch, f, h, w, start, device):
        """Layout, RoPE tables and cross-attention K/V for a pass over frames
        [start, start + f) against the cache."""
        if batch != cache.batch_size:
            raise ForcelabError(f"CausalDiT: a batch of {batch} against a KV cache made for batch "
                                f"{cache.batch_size}; make the cache with model.new_cache({batch}, ...)")
        if h * w != cache.tokens_per_frame:
            raise ForcelabError(f"CausalDiT: latents give {h * w} tokens per frame, the cache was made "
                                f"for {cache.tokens_per_frame}")
        if self.config.patch_size[0] != 1:
            raise ForcelabError("CausalDiT: streaming needs a temporal patch size of 1")
        if context is not None:
            ctx_kv = self.context_kv(context)
        elif cache.context_kv is not None:
            ctx_kv = cache.context_kv
        else:
            raise ForcelabError("CausalDiT: the cache has no prompt; call model.set_prompt(cache, context)")
        q_frames = list(range(start, start + f))
        used = cache.used_slots
        # keys are the cache slots [0, used) then the frames of this pass; stored frames at or
        # after `start` are not visible (a re-commit replaces them)
        k_frames = cache.layout_frames(start)
        layout = AttentionLayout.cached(q_frames, k_frames + q_frames, cache.tokens_per_frame,
                                        cache.chunk_frames, cache.window_frames, cache.sink_frames)
        # Stored keys are rotated at their own positions and RoPE scores depend only on
        # position differences: this pass rotates only its own frames (and a moving sink).
        q_pos = [fr + cache.rope_offset for fr in q_frames]
        cos_q, sin_q = rope_tables(self.config, q_pos, h, w, device)
        cos_k = sin_k = None
        if cache.moves_sink and used:
            sink_pos = cache.key_positions(q_pos)[:min(cache.sink_frames, used)]
            cos_k, sin_k = rope_tables(self.config, sink_pos, h, w, device)
        return layout, (cos_q, sin_q, cos_k, sin_k), ctx_kv

    # ------------------------------------------------------------------ weights
    @classmethod
    def from_pretrained(cls, path, config: DiTConfig | None = None, dtype: torch.dtype | None = None,
                        device=None, **config_overrides) -> "CausalDiT":
        """Load an original Wan2.1 or a diffusers WanTransformer3DModel directory.

        config: use this architecture instead of the one in config.json (a mismatch with the
        weights is an error listing the keys). config_overrides change non-architecture
        fields (chunk_frames, window_frames, attention_backend ...)."""
        path = Path(path).expanduser()
        file_config, fmt = read_config(path)
        config = (config or file_config).replace(**config_overrides)
        with torch.device("meta"):
            model = cls(config)
        load_state_into(model, path, fmt, dtype=dtype, device=device)
        return model.eval()

    def save_pretrained(self, path, format: str = "diffusers", max_shard_bytes: int | None = None,
                        overwrite: bool = True):
        """Write a checkpoint directory that diffusers (format="diffusers") or the original
        Wan code (format="wan") can read; returns its path. An earlier save at `path` is
        replaced atomically (overwrite=False: refused); a folder forcelab did not write never is."""
        return save_state(self, path, format, max_shard_bytes or DEFAULT_SHARD_BYTES, overwrite=overwrite)
