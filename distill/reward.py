"""Video rewards for Re-DMD (Reward Forcing): what a reward is, how a config names one, and how
rewards become the per-sample weights of the DMD generator loss.

A reward scores decoded videos against their prompts, without gradient:

    reward(videos [B, F, C, H, W] float in [0, 1], captions list[str] of B) -> rewards [B]

(a tensor or a sequence of B numbers; higher is better). A config names a LOADER, so that a
reward model is read from disk once, when the run starts:

    algo.reward.callable: "package.module:function"     # function(path: str | None) -> reward
    algo.reward.path: /local/model/dir                   # handed to the loader (None: not set)

The module is imported with importlib when the config loads (no eval), and a name that does
not import, or is not a callable there, is one line naming algo.reward.callable. forcelab ships
loaders in forcelab.eval.rewards: ToyBench's adherence / physics on the toy world, and a
model-free motion measure (mean absolute frame difference).

Weights (Re-DMD): with rewards r_1 .. r_N of the samples the generator loss sees at one
micro-step (the samples of every process, gathered), and a temperature T,

    w_i = N * softmax(r / T)_i = N exp(r_i / T) / sum_j exp(r_j / T)

so the weights average to 1: equal rewards give the plain DMD loss, and T scales how strongly a
better sample counts (T -> infinity: plain DMD; T -> 0: only the best sample). The DMD
gradient of sample i is multiplied by w_i (distill/dmd.py: dmd_loss(weights=...)); the
critic's loss is not weighted (it must keep modelling the generator's actual distribution),
and the reward is not differentiated (it only weights).

Why this normalisation: Reward Forcing's abstract says Re-DMD biases the student's output
distribution toward high-reward regions by prioritising samples a video reward model (VideoAlign,
rating dynamics) scores higher. Read as a reward-tilted target, p_real(x) exp(r(x) / beta) (as
reward-weighted regression does), a sample's DMD gradient is weighted by exp(r / beta); over a
batch, those weights normalised to mean 1 are the self-normalised estimate written above
(T = beta). Neither the paper's equations nor its public code (model/re_dmd.py) could be read
when this was written, so where they differ from this - the form of the weight, whether it is
normalised over the local batch, the gathered batch or not at all, and beta - is not known and
not reproduced: T is algo.reward.temperature, and the normalisation runs over the gathered
micro-batch (gradient accumulation steps are normalised separately: their graphs are gone by
the time the next one is scored).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch

from ..errors import ConfigError
from ..validate import positive_float, setting

TOY_REWARD = "forcelab.eval.rewards:adherence_and_physics"   # ToyBench on the toy world's decoded frames


class Reward(Protocol):
    def __call__(self, videos: torch.Tensor, captions: list[str]) -> torch.Tensor | Sequence[float]: ...


RewardLoader = Callable[[str | None], Reward]


def import_loader(spec, key: str = "algo.reward.callable") -> RewardLoader:
    """The loader "package.module:function" names, imported (no eval); one line naming `key`
    when it cannot be."""
    text = str(spec)
    module_name, sep, attr = text.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{key}: {text!r} is not 'package.module:function' (e.g. {TOY_REWARD!r})")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:          # any failure inside the user's module is reported the same way
        raise ConfigError(f"{key}: cannot import {module_name!r} ({type(e).__name__}: {e}); install it or "
                          f"put its folder on PYTHONPATH") from None
    loader = module
    for part in attr.split("."):
        loader = getattr(loader, part, None)
    if not callable(loader):
        raise ConfigError(f"{key}: {module_name!r} has no callable {attr!r}; name a function "
                          f"function(path) -> reward(videos, captions) -> rewards")
    return loader


def reward_callable(value, key: str) -> str:
    """Config rule of algo.reward.callable: it imports and names a callable."""
    import_loader(value, key)
    return value


def existing_path(value, key: str):
    """Config rule of algo.reward.path: None or an existing file or folder."""
    if value is not None and not Path(str(value)).expanduser().exists():
        raise ConfigError(f"{key}: {value} does not exist; point it at the reward model's local folder "
                          f"(or leave it unset when the reward needs none)")
    return value


@dataclass
class RewardOptions:
    callable: str = setting(TOY_REWARD, reward_callable)   # "package.module:function": the reward's loader
    path: str | None = setting(None, existing_path)        # handed to the loader (a reward model's folder)
    temperature: float = setting(1.0, positive_float)      # T of w = N softmax(r / T): lower favours the best more


def load_reward(options: RewardOptions) -> Reward:
    """The reward the options name, loaded once (the loader gets options.path)."""
    path = None if options.path is None else str(Path(options.path).expanduser())
    return import_loader(options.callable)(path)


def score(reward: Reward, videos: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """rewards [B] float64 of decoded videos [B, F, C, H, W] in [0, 1]; one line when the reward
    returns another count or a non-finite value."""
    out = torch.as_tensor(reward(videos, list(captions)), dtype=torch.float64).reshape(-1).cpu()
    if out.numel() != videos.shape[0]:
        raise ConfigError(f"algo.reward.callable: the reward returned {out.numel()} values for "
                          f"{videos.shape[0]} videos; it must return one per video")
    if not torch.isfinite(out).all():
        raise ConfigError(f"algo.reward.callable: the reward returned a non-finite value {out.tolist()}; "
                          f"it must return finite numbers")
    return out


def reward_weights(rewards: torch.Tensor, temperature: float) -> torch.Tensor:
    """w = N * softmax(rewards / temperature) over the N rewards [N]: mean 1 (float64)."""
    r = rewards.double()
    return r.numel() * torch.softmax(r / temperature, dim=0)


def decoded_videos(codec, x0: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, F, H, W] -> the codec's pixels as a reward sees them: [B, F', 3, H', W']
    in [0, 1] (the codec decodes to [-1, 1]). Run it under no_grad (the recipe does)."""
    pixels = codec.decode(x0).float().clamp(-1, 1)
    return ((pixels + 1) / 2).transpose(1, 2)


def gathered(rewards: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, slice]:
    """(the rewards of every process at this micro-step, concatenated by rank; this process's
    slice of them). One process: the rewards themselves. Processes hold equal batches."""
    if world <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rewards, slice(0, rewards.numel())
    nccl = torch.distributed.get_backend() == "nccl"      # NCCL gathers device tensors only
    local = rewards.to(torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu", torch.float64)
    parts = [torch.empty_like(local) for _ in range(world)]
    torch.distributed.all_gather(parts, local)
    n = rewards.numel()
    return torch.cat(parts).cpu(), slice(rank * n, (rank + 1) * n)
