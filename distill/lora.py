"""LoRA adapters (peft) on a CausalDiT's attention and FFN linears (LongLive: every nn.Linear
of the blocks - self-attention, cross-attention, FFN - rank = alpha = 256, dropout 0).

    params = add_lora(module, rank=8, alpha=8, seed=s)   # only the adapters stay trainable

A module with adapters still SAVES as a plain CausalDiT: its state_dict merges each adapter
into its base weight (W + alpha / rank * B A), so checkpoints' role folders, `forcelab
export`, `forcelab generate` and the next stage's init all read ordinary DiT weights, and
no later run can pick up adapters (or their optimizer state) by accident: the next stage
starts its own adapters from zero. A resumed run needs the unmerged pieces instead: the
frozen base weights come again from the role's init source (`load_base`), the adapters
from the recipe state (`adapter_state` / `load_adapter_state`).

peft is an optional dependency: `pip install 'forcelab[lora]'`.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..seeds import stream_seed

# the nn.Linear layers of every block: self-attention, cross-attention and the FFN
TARGETS = r"blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o)|blocks\.\d+\.ffn\.(0|2)"
ADAPTER = "default"
BASE = ".base_layer"


def lora_layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """name -> peft LoRA layer (a wrapped nn.Linear) of a module with adapters."""
    return {n: m for n, m in module.named_modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")}


def add_lora(module: torch.nn.Module, rank: int, alpha: float, seed: int, name: str = "") -> list:
    """Wrap the block linears of `module` in place with rank-`rank` adapters (B = 0, so the
    function is unchanged; A drawn from `seed`, independent of the global RNG). Freezes
    everything else and returns the adapter parameters."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError("algo.lora_rank > 0 needs peft; install it with pip install 'forcelab[lora]' "
                          "or set algo.lora_rank=0") from None
    if rank < 1 or alpha <= 0:
        raise ConfigError(f"algo.lora_rank must be >= 1 and lora_alpha > 0, got {rank} and {alpha}")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=TARGETS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, f"lora/{name}"))
        inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    if not lora_layers(module):
        raise ConfigError("LoRA: no attention or FFN linear found in the model")
    params = []
    for n, p in module.named_parameters():
        p.requires_grad_(".lora_" in n)
        if p.requires_grad:
            params.append(p)
    module._register_state_dict_hook(_merge_hook)
    return params


def _merge_hook(module, state: dict, prefix: str, local_metadata) -> None:
    """state_dict of a module with adapters -> the plain module's keys, adapters merged."""
    for name, layer in lora_layers(module).items():
        key = f"{prefix}{name}."
        weight = state.pop(f"{key}{BASE[1:]}.weight")
        for part in ("lora_A", "lora_B"):
            state.pop(f"{key}{part}.{ADAPTER}.weight")
        state[f"{key}weight"] = (weight + layer.get_delta_weight(ADAPTER).to(weight.dtype)).detach()
        bias = state.pop(f"{key}{BASE[1:]}.bias", None)
        if bias is not None:
            state[f"{key}bias"] = bias


def adapter_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights (CPU copies), by parameter name."""
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if ".lora_" in n}


def load_adapter_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = {n: p for n, p in module.named_parameters() if ".lora_" in n}
    if set(params) != set(state) or any(params[n].shape != state[n].shape for n in params):
        raise ConfigError("LoRA: the saved adapters do not match this run's (algo.lora_rank or the model "
                          "changed since the checkpoint); resume with the same settings")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])


@torch.no_grad()
def load_base(module: torch.nn.Module, plain: torch.nn.Module) -> None:
    """Copy a plain CausalDiT's weights into the (frozen) base weights of a module with
    adapters (the adapters are left as they are)."""
    layers = lora_layers(module)
    own = {**dict(module.named_buffers()), **dict(module.named_parameters())}
    for name, tensor in plain.state_dict().items():
        owner, _, attr = name.rpartition(".")
        target = f"{owner}{BASE}.{attr}" if owner in layers else name
        own[target].copy_(tensor)
