"""Reward Forcing's Re-DMD, one generator step written out plainly: Self-Forcing's rollout and
DMD window (plain_recipes/self_forcing.py), each sample's window decoded on its own and scored
by the reward, the weights written out from the rewards one by one, and the weighted DMD loss.

    w_i = N exp(r_i / T) / sum_j exp(r_j / T)       (N samples; mean 1)
    loss = 0.5 * mean over masked elements of w_b (x0 - (x0 - grad).detach())^2

The reward sees the decoded pixels in [0, 1] as [1, F, 3, H, W] per sample, without gradient.
The critic's step is Self-Forcing's (unweighted). Only the codec is forcelab's.
"""

from __future__ import annotations

import math

import torch

from . import self_forcing as sf

STUB_SCALE = 20.0     # the stub reward's spread: mean pixel differences of a few 1e-3 -> rewards a few 1e-2 apart


def stub_reward(videos: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """A reward for the gradient tests that follows the pixels (and keeps a graph when given
    one): STUB_SCALE x (mean red - mean blue) of each video [F, 3, H, W] in [0, 1]."""
    return STUB_SCALE * (videos[:, :, 0].flatten(1).mean(1) - videos[:, :, 2].flatten(1).mean(1))


def load_stub(path=None):
    """The loader a config names: plain_recipes.reward_forcing:load_stub."""
    return stub_reward


def rewards_of(trainer, x0: torch.Tensor, captions: list[str], reward) -> list[float]:
    """Each sample's reward of its own decoded window, one sample at a time."""
    out = []
    with torch.no_grad():
        for i in range(x0.shape[0]):
            pixels = trainer.codec.decode(x0[i:i + 1]).float().clamp(-1, 1)      # [1, 3, F, H, W]
            video = ((pixels + 1) / 2).permute(0, 2, 1, 3, 4)                   # [1, F, 3, H, W] in [0, 1]
            out.append(float(reward(video, [captions[i]])[0]))
    return out


def weights_of(rewards: list[float], temperature: float) -> list[float]:
    top = max(rewards)          # exp of the shifted rewards: the same ratios, no overflow
    e = [math.exp((r - top) / temperature) for r in rewards]
    return [len(e) * x / sum(e) for x in e]


def generator_loss(trainer, batch, ctx, s: sf.Settings, reward, temperature: float) -> torch.Tensor:
    x0, mask = sf.generated_window(trainer, batch, ctx, s, grad=True)
    weights = weights_of(rewards_of(trainer, x0, batch["caption"], reward), temperature)
    return sf.scored_generator_loss(trainer, x0, mask, batch["text_emb"], ctx, s, weights)


critic_loss = sf.critic_loss
