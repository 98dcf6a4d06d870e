"""Reward Forcing's Re-DMD: Self-Forcing whose DMD generator loss weights each sample by a
reward of its decoded video (distill/reward.py states the reward, its loader and the weights).

Per generator step: the student's rollout and its DMD window exactly as Self-Forcing
(distill/self_forcing.py); the window's latents are decoded by the run's codec, the reward
scores them against the prompts, the rewards of every process at this micro-step become
weights w = N softmax(r / T) (mean 1), and the DMD loss of sample i is multiplied by w_i. The
reward, the decode and the weights run without gradient (the reward only weights, as in the
paper); the critic's step is Self-Forcing's, unweighted. With equal rewards, or T very large,
this is Self-Forcing.

Left out: Reward Forcing's other half, EMA-Sink (the sink tokens updated by an exponential
moving average of the frames leaving the window) - the sink here is the plain frame sink of
the student's window + sink (model_overrides.window_frames / sink_frames).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from .dmd_recipe import Generated
from .reward import RewardOptions, decoded_videos, gathered, load_reward, reward_weights, score
from .self_forcing import SelfForcingOptions, SelfForcingRecipe


@dataclass
class RewardForcingOptions(SelfForcingOptions):
    reward: RewardOptions = field(default_factory=RewardOptions)   # the reward, its model and temperature

    def check(self, model=None) -> None:
        super().check(model)
        if self.loss != "dmd":
            raise ConfigError(f"algo.loss: Re-DMD weights the DMD loss; reward_forcing trains with loss dmd, "
                              f"not {self.loss!r}")


class RewardForcingRecipe(SelfForcingRecipe):
    name = "reward_forcing"
    Options = RewardForcingOptions

    def setup(self) -> None:
        super().setup()
        samples = self.cfg.data.batch_size * self.run.world
        if samples < 2:
            raise ConfigError(f"data.batch_size: Re-DMD normalises the rewards over the samples of a micro-step "
                              f"({self.cfg.data.batch_size} x {self.run.world} process(es) = 1: plain DMD); "
                              f"raise data.batch_size to 2 or more")
        self.reward = load_reward(self.opt.reward)

    def sample_weights(self, generated: Generated, batch) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():       # the reward is not differentiated: it only weights
            videos = decoded_videos(self.run.codec, generated.x0)
            rewards = score(self.reward, videos, batch["caption"])
            everyone, mine = gathered(rewards, self.run.rank, self.run.world)
            weights = reward_weights(everyone, self.opt.reward.temperature)[mine]
        return weights.to(generated.x0.device), {"reward_mean": rewards.mean(), "reward_weight_max": weights.max()}
