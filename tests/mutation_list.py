"""The semantic mutations of tests/mutations.py: each is ONE exact text replacement in one file of
the package that breaks a rule a recipe states (its module docstring, after the paper and the
public code) the way a plausible bug would, with the test files that should notice it.

    M(name, recipe(s), rule, file, old snippet, new snippet, *test groups)

The old snippet must occur exactly once in its file (`python tests/mutations.py --list` checks).
"""

from __future__ import annotations

from dataclasses import dataclass


# ---------------------------------------------------------------------- test groups
# Globs, resolved in the copy when the run starts: test files added since the list was written
# are picked up. Files run in the order given: the recipe's independent reference and the rule
# tests first (cheap and pointed), then its own tests, and every reference test last.
REFERENCE = ("tests/test_reference_*.py",)
RULES = ("tests/test_recipe_rules.py",)
REF_SF = ("tests/test_reference_self_forcing*.py",) + RULES
REF_ROLLING = ("tests/test_reference_rolling*.py",) + RULES
REF_SFPP = ("tests/test_reference_sfpp*.py", "tests/test_reference_self_forcing_pp*.py") + RULES
REF_LONG = ("tests/test_reference_streaming*.py", "tests/test_reference_longlive*.py") + RULES
REF_CAUSVID = ("tests/test_reference_causvid*.py",) + RULES
REF_ODE = ("tests/test_reference_ode*.py",) + RULES
REF_DF = ("tests/test_reference_pretraining*.py", "tests/test_reference_diffusion_forcing*.py",
          "tests/test_reference_teacher_forcing*.py", "tests/test_reference_ar_diffusion*.py") + RULES
REF_RF = ("tests/test_reference_reward_forcing*.py",)
REF_CAUSAL = ("tests/test_reference_causal*.py",) + RULES
DMD = ("tests/test_dmd.py",)
SF = REF_SF + ("tests/test_distill_self_forcing.py", "tests/test_reencode.py")
CAUSVID = REF_CAUSVID + ("tests/test_distill_causvid.py",)
ROLLING = REF_ROLLING + ("tests/test_distill_rolling.py",)
SFPP = REF_SFPP + ("tests/test_distill_sfpp.py",)
LONG = REF_LONG + ("tests/test_distill_streaming_long.py",)
ODE = REF_ODE + ("tests/test_distill_ode_init.py",)
RECIPES = REF_DF + ("tests/test_train_recipes.py",)
TIMESTEPS = RULES + ("tests/test_timesteps.py",)
TRAINER = RULES + ("tests/test_train_trainer.py",)
ENGINE = ("tests/test_rollout_plans.py", "tests/test_rollout_engine.py", "tests/test_dit_streaming.py",
          "tests/test_cache_recompute.py", "tests/test_generate_prefix.py")
CACHE_POLICY = ("tests/test_cache_policies.py", "tests/test_cache_recompute.py")
KERNELS = ("tests/test_kernels_grouped.py", "tests/test_kernels_attention.py")
DISTILL = SF + CAUSVID + ROLLING + SFPP + LONG
EVERY_DMD = DMD + DISTILL
# Left out of the per-mutation runs (not --full): multi-process launches, kill -9 and CLI round trips
# test the infrastructure, take the longest and are the flakiest on a loaded machine.
INFRASTRUCTURE = "not two_processes and not sigkill and not through_the_cli and not generate_and_export"


@dataclass(frozen=True)
class Mutation:
    name: str
    recipe: str             # which recipe(s) the rule belongs to
    rule: str               # the rule the mutation breaks
    path: str               # file, relative to the package root
    old: str                # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # test files (globs) to run, before REFERENCE


def M(name, recipe, rule, path, old, new, *tests):
    return Mutation(name, recipe, rule, path, old, new, tuple(t for group in tests for t in group))


# Left out as equivalent to the code they would mutate (no test can tell them apart):
# - CausVid's clean chunks taken from the student's prediction instead of the data: at t = 0
#   x0 = x_t - 0 * v is x_t exactly, and those chunks are masked (no gradient either way).
# - the critic's sample detach in dmd.critic_loss: the critic's rollout already runs under no_grad.
MUTATIONS: list[Mutation] = [
    # ------------------------------------------------------------------ DMD family: the call site
    M("dmd_real_fake_swapped", "every DMD recipe", "sign: grad = (fake - real) / normaliser (real and fake at the "
      "call site)", "distill/dmd_recipe.py",
      "dmd_loss(out.x0, real, fake, timestep=t", "dmd_loss(out.x0, fake, real, timestep=t", EVERY_DMD),
    M("real_score_without_cfg", "every DMD recipe", "guidance: the real score is uncond + g (cond - uncond)",
      "distill/dmd_recipe.py",
      "t.negative.expand(context.shape[0], -1, -1),\n                            self.opt.guidance)",
      "t.negative.expand(context.shape[0], -1, -1),\n                            1.0)", EVERY_DMD),
    M("real_score_uncond_not_negative_prompt", "every DMD recipe", "guidance: uncond = the negative prompt",
      "distill/dmd_recipe.py",
      "x0_predictor(t.model(\"teacher\"), context, t.negative.expand(context.shape[0], -1, -1),",
      "x0_predictor(t.model(\"teacher\"), context, torch.zeros_like(t.negative).expand(context.shape[0], -1, -1),",
      EVERY_DMD),
    M("critic_score_guided", "every DMD recipe", "guidance: the fake score has no guidance", "distill/dmd_recipe.py",
      "return real, x0_predictor(t.model(\"critic\"), context)",
      "return real, x0_predictor(t.model(\"critic\"), context, t.negative.expand(context.shape[0], -1, -1), "
      "self.opt.guidance)", EVERY_DMD),
    M("warped_list_ignored", "Self-Forcing, Rolling, LongLive, SF++", "timestep law: the denoising list is warped "
      "through the shifted table", "distill/dmd_recipe.py",
      "return warp_timesteps(self.steps, self.warp_shift) if self.warp_shift else",
      "return [float(t) for t in self.steps] if self.warp_shift else", SF + ROLLING + SFPP + LONG),
    M("score_timestep_without_shift_and_clamp", "every DMD recipe", "timestep law: DMD / critic t shifted "
      "(shift 5) and clamped to [20, 980]", "distill/dmd_recipe.py",
      "shift=o.score_shift, t_min=o.t_min, t_max=o.t_max,", "shift=1.0, t_min=0.0, t_max=1000.0,", EVERY_DMD),
    M("critic_timestep_fixed", "every DMD recipe", "timestep law: the critic's t is drawn like the DMD t "
      "(one per sample, shifted, clamped)", "distill/dmd_recipe.py",
      "t, noise = self._draw(ctx, out.x0, \"critic\")",
      "t, noise = self._draw(ctx, out.x0, \"critic\")\n            t = torch.full_like(t, 500.0)", EVERY_DMD),
    M("context_noise_option_ignored", "Self-Forcing, LongLive, CausVid sampling", "context noise: the commit pass "
      "runs at algo.context_noise", "distill/dmd_recipe.py",
      "return Chunkwise(timesteps=timesteps, context_noise=self.context_noise, **kw)",
      "return Chunkwise(timesteps=timesteps, **kw)", SF + LONG),
    M("critic_loss_mask_ignored", "every DMD recipe", "masks: the critic's loss covers only the frames in the "
      "mask (LongLive's new frames, CausVid's noisy chunks)", "distill/dmd_recipe.py",
      "critic_loss(out.x0, fake, timestep=t, noise=noise, mask=out.mask)",
      "critic_loss(out.x0, fake, timestep=t, noise=noise, mask=None)", CAUSVID + LONG + SF + DMD),
    M("sid_alpha_option_ignored", "Self-Forcing (SiD)", "loss weight: SiD's alpha comes from algo.sid_alpha",
      "distill/dmd_recipe.py", "alpha=self.opt.sid_alpha,", "alpha=1.0,", SF + DMD),
    # ------------------------------------------------------------------ DMD family: the losses
    M("dmd_normaliser_dropped", "every DMD recipe", "normaliser: grad / mean|x0 - real| per sample",
      "distill/dmd.py", "grad = _zero_nonfinite((fake - real) / normaliser)", "grad = _zero_nonfinite(fake - real)",
      DMD + SF),
    M("dmd_nonfinite_kept", "every DMD recipe", "nan_to_num: a non-finite DMD gradient entry becomes 0",
      "distill/dmd.py", "grad = _zero_nonfinite((fake - real) / normaliser)", "grad = (fake - real) / normaliser",
      DMD + SF),
    M("dmd_normaliser_over_the_batch", "every DMD recipe", "normaliser: one mean|x0 - real| per SAMPLE",
      "distill/dmd.py", "return (x0 - real).abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True)",
      "return (x0 - real).abs().mean()", DMD + SF),
    M("dmd_loss_weight_doubled", "every DMD recipe", "loss weight: 0.5 * mse(x0, (x0 - grad).detach())",
      "distill/dmd.py", "loss = 0.5 * masked_mean(per_element, mask)",
      "loss = masked_mean(per_element, mask)", DMD + SF),
    M("dmd_loss_mask_ignored", "every DMD recipe", "masks: frames outside the mask (re-encoded chunk, overlap, "
      "clean chunks) get no DMD gradient", "distill/dmd.py",
      "loss = 0.5 * masked_mean(per_element, mask)",
      "loss = 0.5 * masked_mean(per_element, None)", DMD + SF + CAUSVID + LONG),
    M("masked_mean_over_all_frames", "every DMD recipe", "normaliser: the loss is a mean over the masked frames",
      "train/flow_matching.py", "return kept.sum() / w.sum().clamp_min(1)", "return kept.sum() / values.numel()",
      DMD + CAUSVID + SF),
    M("critic_target_reversed", "every DMD recipe", "critic target: v = noise - x0", "distill/dmd.py",
      "loss = flow_matching_loss(v, x0, noise, mask)", "loss = flow_matching_loss(v, noise, x0, mask)", DMD + SF),
    M("sid_alpha_ignored", "Self-Forcing (SiD)", "loss: (real - fake) * ((real - x0) - alpha (real - fake))",
      "distill/dmd.py", "((real - x) - alpha * (real - fake))", "((real - x) - (real - fake))", DMD + SF),
    M("sid_normaliser_dropped", "Self-Forcing (SiD)", "normaliser: SiD shares DMD's per-sample normaliser",
      "distill/dmd.py", "alpha * (real - fake)) / normaliser)", "alpha * (real - fake)))", DMD + SF),
    M("sid_scores_detached", "Self-Forcing (SiD)", "which pass carries gradient: SiD's gradient flows through "
      "both score networks", "distill/dmd.py",
      "real = real_score(x_t, sigma).double()\n    fake = fake_score(x_t, sigma).double()\n    x = x0.double()",
      "real = real_score(x_t, sigma).double().detach()\n    fake = fake_score(x_t, sigma).double().detach()\n"
      "    x = x0.double()", DMD + SF),
    M("sid_masked_frames_not_detached", "Self-Forcing (SiD)", "what is detached: masked frames enter x_t "
      "detached", "distill/dmd.py",
      "x_in = x0 if w is None else torch.where(w.bool(), x0, x0.detach())", "x_in = x0", DMD + SF),
    # ------------------------------------------------------------------ Self-Forcing
    M("chunk_does_not_stop_at_exit", "Self-Forcing", "a chunk stops at its exit step (its x0 is output and "
      "cached context)", "models/plans.py",
      "name = \"chunkwise\"\n    finish_at_exit = True", "name = \"chunkwise\"\n    finish_at_exit = False",
      SF + ENGINE),
    M("exit_step_never_last", "Self-Forcing, Rolling", "sampler: exit step uniform in [0, steps)",
      "distill/self_forcing.py", "ctx.stream(\"exit_step\").shared_int(len(self.timesteps))",
      "ctx.stream(\"exit_step\").shared_int(len(self.timesteps) - 1)", SF + ROLLING),
    M("chunk_count_always_max", "Self-Forcing, Rolling", "sampler: chunk count uniform in [min_chunks, max_chunks]",
      "distill/self_forcing.py",
      "chunks = self.min_chunks + ctx.stream(\"chunk_count\").shared_int(self.max_chunks - self.min_chunks + 1)",
      "chunks = self.max_chunks", SF + ROLLING),
    M("chunk_count_never_max", "Self-Forcing, Rolling", "sampler: chunk count uniform in [min_chunks, max_chunks] "
      "(max included)", "distill/self_forcing.py",
      "chunks = self.min_chunks + ctx.stream(\"chunk_count\").shared_int(self.max_chunks - self.min_chunks + 1)",
      "chunks = self.min_chunks + ctx.stream(\"chunk_count\").shared_int(max(1, self.max_chunks - self.min_chunks))",
      SF + ROLLING),
    M("gradients_before_the_dmd_window", "Self-Forcing, Rolling", "which pass carries gradient: only chunks in "
      "the last `frames` frames", "distill/self_forcing.py",
      "Training(exit_step, grad_from_frame=total - window, commit_last=False)",
      "Training(exit_step, grad_from_frame=0, commit_last=False)", SF + ROLLING),
    M("critic_rollout_runs_to_the_end", "Self-Forcing, Rolling", "the critic's own rollout stops at the same exit "
      "as the generator's (the same distribution of samples)", "distill/self_forcing.py",
      "training = Training(exit_step, grad_from_frame=total - window, commit_last=False)",
      "training = Training(exit_step, grad_from_frame=total - window, commit_last=False) if grad else None",
      SF + ROLLING),
    M("reencoded_chunk_not_masked", "Self-Forcing, Rolling", "masks: the re-encoded first chunk is left out of the "
      "generator's loss", "distill/dmd_recipe.py", "mask[:self.chunk] = False", "mask[:1] = False",
      SF + ROLLING),
    M("first_frame_not_reencoded", "Self-Forcing, Rolling", "first-frame re-encode of a window that does not start "
      "the video", "distill/dmd_recipe.py",
      "return torch.cat([first, x0[:, :, 1:]], dim=2)", "return x0", SF + ROLLING),
    M("reencode_decodes_the_latent_alone", "Self-Forcing, Rolling, LongLive, SF++", "first-frame re-encode: "
      "decode the context up to the window's first latent, encode the LAST pixel frame", "distill/dmd_recipe.py",
      "pixels = codec.decode(context)[:, :, -1:]", "pixels = codec.decode(context[:, :, -1:])[:, :, :1]",
      SF + ROLLING + LONG + SFPP),
    M("prefix_not_committed", "Self-Forcing (first-frame conditioning)", "masks / context: prefix frames are "
      "committed to the cache before the rollout", "distill/self_forcing.py",
      "prefix=prefix, plan=self.rollout_plan(ctx))",
      "prefix=None, plan=self.rollout_plan(ctx))", SF + ENGINE),
    M("dmd_window_is_the_first_frames", "Self-Forcing, Rolling", "window: DMD judges the LAST `frames` frames "
      "of the rollout", "distill/self_forcing.py", "x0 = video[:, :, total - window:]", "x0 = video[:, :, :window]",
      SF + ROLLING),
    M("critic_trains_on_prefix_frames", "Self-Forcing (first-frame conditioning)", "masks: real prefix frames are "
      "not generated: out of the critic's loss", "distill/self_forcing.py",
      "frame_mask = (carries_grad if grad else generated)", "frame_mask = (carries_grad if grad else generated | True)",
      SF),
    # ------------------------------------------------------------------ Reward Forcing (Re-DMD)
    M("reward_differentiated", "Reward Forcing", "the reward is not differentiated: it only weights the DMD "
      "loss", "distill/reward_forcing.py", "with torch.no_grad():       # the reward is not differentiated",
      "with torch.enable_grad():   # the reward is not differentiated", REF_RF),
    M("reward_weights_not_normalised", "Reward Forcing", "weights: w = N softmax(r / T) over the batch (mean 1)",
      "distill/reward.py", "return r.numel() * torch.softmax(r / temperature, dim=0)",
      "return torch.exp(r / temperature)", REF_RF),
    M("reward_temperature_ignored", "Reward Forcing", "weights: the temperature T comes from "
      "algo.reward.temperature", "distill/reward_forcing.py",
      "reward_weights(everyone, self.opt.reward.temperature)", "reward_weights(everyone, 1.0)", REF_RF),
    M("reward_of_another_sample", "Reward Forcing", "weights: sample i's weight is its OWN video's reward",
      "distill/reward_forcing.py", "rewards = score(self.reward, videos, batch[\"caption\"])",
      "rewards = score(self.reward, videos.roll(1, 0), batch[\"caption\"])", REF_RF),
    M("reward_weights_on_the_critic", "Reward Forcing", "weights: the generator's DMD loss is weighted, the "
      "critic's loss is not", "distill/dmd_recipe.py",
      "                weights, weight_logs = self.sample_weights(out, batch)\n"
      "                loss, logs = dmd_loss(out.x0, real, fake, timestep=t, noise=noise, mask=out.mask, weights=weights)\n"
      "                logs.update(weight_logs)\n"
      "        elif role == \"critic\":\n"
      "            with torch.no_grad():\n"
      "                out = self.generate(batch, ctx, grad=False)\n"
      "            _, fake = self._scores(context)\n"
      "            t, noise = self._draw(ctx, out.x0, \"critic\")\n"
      "            loss, logs = critic_loss(out.x0, fake, timestep=t, noise=noise, mask=out.mask)",
      "                loss, logs = dmd_loss(out.x0, real, fake, timestep=t, noise=noise, mask=out.mask)\n"
      "        elif role == \"critic\":\n"
      "            with torch.no_grad():\n"
      "                out = self.generate(batch, ctx, grad=False)\n"
      "            _, fake = self._scores(context)\n"
      "            t, noise = self._draw(ctx, out.x0, \"critic\")\n"
      "            weights, _ = self.sample_weights(out, batch)\n"
      "            if weights is None:\n"
      "                loss, logs = critic_loss(out.x0, fake, timestep=t, noise=noise, mask=out.mask)\n"
      "            else:\n"
      "                parts = [critic_loss(out.x0[i:i + 1], x0_predictor(self.run.model(\"critic\"), context[i:i + 1]),\n"
      "                                     timestep=t[i:i + 1], noise=noise[i:i + 1],\n"
      "                                     mask=None if out.mask is None else out.mask[i:i + 1])\n"
      "                         for i in range(len(weights))]\n"
      "                loss = sum(w * p[0] for w, p in zip(weights, parts)) / len(parts)\n"
      "                logs = parts[0][1]", REF_RF),
    # ------------------------------------------------------------------ the engine (every rollout recipe)
    M("renoise_reuses_start_noise", "Self-Forcing, Rolling, LongLive, SF++", "re-noising: each re-noise draws "
      "fresh noise", "models/rollout.py",
      "return add_noise(x0.detach(), noise(start, x.shape[2], level + 1), sigmas[level + 1])",
      "return add_noise(x0.detach(), noise(start, x.shape[2], INITIAL), sigmas[level + 1])", SF + ENGINE),
    M("renoise_to_the_same_level", "Self-Forcing, Rolling, LongLive, SF++", "re-noising: to the NEXT level",
      "models/rollout.py",
      "return add_noise(x0.detach(), noise(start, x.shape[2], level + 1), sigmas[level + 1])",
      "return add_noise(x0.detach(), noise(start, x.shape[2], level + 1), sigmas[level])", SF + ENGINE),
    M("context_noise_not_added", "Self-Forcing, Rolling, LongLive, SF++", "context noise: the commit pass sees "
      "the clean output noised to context_noise", "models/rollout.py",
      "if plan.context_noise > 0:\n        x = add_noise(", "if plan.context_noise < 0:\n        x = add_noise(",
      SF + ENGINE),
    M("commit_pass_not_clean_timestep", "Self-Forcing, Rolling, LongLive, SF++", "commit pass at t = "
      "context_noise (0: clean)", "models/rollout.py", "commit_frames(model, cache, x, plan.context_noise, start_frame)",
      "commit_frames(model, cache, x, plan.context_noise + 250.0, start_frame)", SF + ENGINE),
    M("cfg_in_the_cond_form", "every recipe with guidance", "guidance convention: uncond + g (cond - uncond)",
      "models/rollout.py",
      ".chunk(2)\n        v = v_u + guidance * (v_c - v_u)", ".chunk(2)\n        v = v_c + guidance * (v_c - v_u)",
      DMD + ENGINE + ODE),
    M("rolling_grad_only_oldest_chunk", "Rolling Forcing", "gradient windows: every chunk of a window with "
      "index % S == exit carries gradient", "models/rollout.py",
      "keeps = [grad_pass and grad_allowed and f >= training.grad_from_frame for f in starts]",
      "keeps = [grad_pass and grad_allowed and f >= training.grad_from_frame and f == starts[0] for f in starts]",
      ROLLING + ENGINE),
    M("rolling_window_two_levels_apart", "Rolling Forcing", "the rolling window: S chunks in flight, one level "
      "apart", "models/plans.py",
      "name = \"rolling\"\n\n    @property\n    def ar_step(self) -> int:\n        return 1",
      "name = \"rolling\"\n\n    @property\n    def ar_step(self) -> int:\n        return 2", ROLLING + ENGINE),
    # ------------------------------------------------------------------ masks, windows, sink
    M("block_causal_is_frame_causal", "every causal recipe", "masks: block-causal (a frame sees its whole chunk)",
      "kernels/layout.py", "causal = kc <= qc", "causal = kf <= qf", CAUSVID + RECIPES + KERNELS + ENGINE),
    M("window_counts_from_the_query_frame", "every windowed recipe", "window: counts back from the END of the "
      "query's chunk", "kernels/layout.py", "in_window = kf >= (qc + 1) * c - self.window_frames",
      "in_window = kf > qf - self.window_frames", KERNELS + ENGINE + ROLLING),
    M("sink_not_visible", "Rolling, LongLive", "sink: the first sink_frames frames stay visible",
      "kernels/layout.py", "visible = visible | (sink & causal)", "visible = visible",
      ROLLING + LONG + KERNELS + ENGINE),
    M("teacher_forcing_sees_own_clean_chunk", "teacher forcing", "[clean | noisy] layout: a noisy chunk sees "
      "clean copies of strictly EARLIER chunks", "kernels/layout.py",
      "torch.where(qn, kc < qc, kc <= qc)", "torch.where(qn, kc <= qc, kc <= qc)", RECIPES + KERNELS),
    M("teacher_forcing_rope_not_shared", "teacher forcing", "[clean | noisy] layout: both halves at the same "
      "RoPE positions", "models/dit.py", "positions = list(range(f // 2)) * 2", "positions = range(f)",
      RECIPES + KERNELS),
    M("grouped_key_gradients_overwrite", "every causal recipe", "grouped attention: a key seen by several "
      "query groups gets the SUM of their gradients", "kernels/grouped.py",
      "dx[:, :, start:end] += grad[:, :, offset:offset + end - start]",
      "dx[:, :, start:end] = grad[:, :, offset:offset + end - start]", KERNELS + RECIPES),
    M("grouped_groups_merge_other_rows", "every causal recipe", "grouped attention: a group holds query frames "
      "that see exactly the same keys", "kernels/grouped.py",
      "if f < len(rows) and rows[f] == rows[first]:", "if f < len(rows) and rows[f][:1] == rows[first][:1]:",
      KERNELS + RECIPES),
    M("grouped_blind_queries_not_zero", "every causal recipe", "attention: a query that sees no key returns 0",
      "kernels/grouped.py", "outs.append(q_group.new_zeros(q_group.shape[:-1] + v.shape[-1:]))",
      "outs.append(q_group.clone())", KERNELS),
    M("ring_evicts_the_newest_frame", "every windowed recipe", "window: the ring overwrites its OLDEST frame",
      "models/kv_cache.py", "oldest = min(ring, key=lambda s: self.slot_frame[s])",
      "oldest = max(ring, key=lambda s: self.slot_frame[s])", ENGINE + ROLLING + LONG),
    M("sink_frames_go_to_the_ring", "Rolling, LongLive", "sink: sink frames are kept forever",
      "models/kv_cache.py", "if frame < self.sink_frames:\n            return frame",
      "if frame < 0:\n            return frame", ENGINE + ROLLING + LONG),
    M("recompute_reads_overwritten_cache", "every windowed recipe with gradient checkpointing", "a pass "
      "recomputed in backward sees the keys and values its forward saw (copy before the ring overwrites)",
      "models/kv_cache.py", "            past.before_write(lo, hi, kinds)\n", "            pass\n",
      ("tests/test_cache_recompute.py",) + ENGINE),
    M("adjacent_sink_not_rerotated", "Rolling Forcing", "sink: re-rotated to sit just before the working cache",
      "models/kv_cache.py", "pos[i] = first - self.sink_frames + i", "pos[i] = self.slot_position[i]",
      ENGINE + ROLLING),
    # ------------------------------------------------------------------ cache policies (models/cache_policy.py)
    M("policy_ring_not_ranked", "every cache policy", "layout: a policy's ring entries are listed by recency "
      "rank, so every kept entry is visible", "models/kv_cache.py", "frames[i] = start - 1 - rank", "pass",
      CACHE_POLICY),
    M("merge_weights_swapped", "temporal_merge, similar_merge", "merge: each slot weighted by the frames IT holds",
      "models/kv_cache.py", "buf[:, m.dst].mul_(m.w_dst).add_(buf[:, m.src], alpha=m.w_src)",
      "buf[:, m.dst].mul_(m.w_src).add_(buf[:, m.src], alpha=m.w_dst)", CACHE_POLICY),
    M("merge_unnormalised_weights", "temporal_merge, similar_merge", "merge: the count-weighted MEAN of two slots",
      "models/cache_policy.py", "return Merge(a, b, ca / (ca + cb), cb / (ca + cb))", "return Merge(a, b, ca, cb)",
      CACHE_POLICY),
    M("temporal_merge_newest_pair", "temporal_merge", "merge the pair holding the fewest frames, the OLDEST on ties",
      "models/cache_policy.py", "key=lambda j: (counts[j] + counts[j + 1], j))",
      "key=lambda j: (counts[j] + counts[j + 1], -j))", CACHE_POLICY),
    M("similar_merge_least_alike", "similar_merge", "merge the MOST alike adjacent pair", "models/cache_policy.py",
      "j = max(range(len(pairs)), key=lambda i: (sim[i], -i))", "j = min(range(len(pairs)), key=lambda i: (sim[i], -i))",
      CACHE_POLICY),
    M("deep_forcing_evicts_most_attended", "deep_forcing", "participative compression: evict the LEAST attended",
      "models/cache_policy.py", "return min(candidates, key=lambda s: (score[s], cache.slot_frame[s])), None",
      "return max(candidates, key=lambda s: (score[s], cache.slot_frame[s])), None", CACHE_POLICY),
    M("deep_forcing_evicts_newest_on_ties", "deep_forcing", "without statistics the OLDEST frame goes",
      "models/cache_policy.py", "return min(candidates, key=lambda s: (score[s], cache.slot_frame[s])), None",
      "return min(candidates, key=lambda s: (score[s], -cache.slot_frame[s])), None", CACHE_POLICY),
    M("dummy_heads_least_local", "dummy_heads", "the short heads are the MOST local ones",
      "models/cache_policy.py", "key=lambda h: (-float(local[h]), h))", "key=lambda h: (float(local[h]), h))",
      CACHE_POLICY),
    M("dummy_heads_hide_the_newest", "dummy_heads", "short heads keep the NEWEST `short` frames",
      "models/cache_policy.py", "hidden = [i for _, i in ring[:max(len(ring) - self.short, 0)]]",
      "hidden = [i for _, i in ring[min(self.short, len(ring)):]]", CACHE_POLICY),
    # ------------------------------------------------------------------ Rolling Forcing
    M("rolling_prob_ignored", "Rolling Forcing", "sampler: a rollout is rolling with probability rolling_prob",
      "distill/rolling_forcing.py", "< round(self.opt.rolling_prob * _PROB_RESOLUTION)", "< _PROB_RESOLUTION // 2",
      ROLLING),
    M("rolling_sink_option_ignored", "Rolling Forcing", "sink: algo.sink_frames sets the rollout's sink",
      "distill/rolling_forcing.py", "window_frames=self.window_frames,\n                    sink_frames=self.sink_frames,",
      "window_frames=self.window_frames,\n                    sink_frames=0,", ROLLING),
    # ------------------------------------------------------------------ LongLive streaming long tuning
    M("recache_skipped", "LongLive", "recache: after a switch the recent frames are re-run with the new prompt",
      "distill/streaming_long.py", "seq.recache = self.recache_frames > 0", "seq.recache = False", LONG + ENGINE),
    M("sink_wiped_at_switch", "LongLive", "sink: kept through a switch (keep_sink: true)",
      "distill/streaming_long.py", "seq.cache.reset(keep_sink=self.opt.keep_sink)", "seq.cache.reset(keep_sink=False)",
      LONG),
    M("sink_kept_when_asked_to_wipe", "LongLive", "sink: keep_sink: false wipes it (the public training code)",
      "distill/streaming_long.py", "seq.cache.reset(keep_sink=self.opt.keep_sink)", "seq.cache.reset(keep_sink=True)",
      LONG),
    M("prompt_never_switches", "LongLive", "switch: the new prompt conditions the frames after the switch",
      "distill/streaming_long.py", "seq.prompt = self._read_prompts(ctx)\n        seq.cache.reset(",
      "seq.prompt = seq.prompt\n        seq.cache.reset(", LONG),
    M("switch_point_always_first", "LongLive", "sampler: the switch frame is uniform over the candidates",
      "distill/streaming_long.py",
      "self.switch_candidates[ctx.stream(\"switch_frame\").shared_int(len(self.switch_candidates))]",
      "self.switch_candidates[0]", LONG),
    M("recache_only_the_last_chunk", "LongLive", "recache: the last recache_frames frames are re-run",
      "distill/streaming_long.py", "lo = max(seq.cache.sink_frames, start - self.recache_frames)",
      "lo = max(seq.cache.sink_frames, start - self.chunk)", LONG),
    M("overlap_frames_in_the_loss", "LongLive", "masks: only the new frames enter the DMD and the critic loss",
      "distill/streaming_long.py", "mask = torch.cat([torch.zeros(ov, dtype=torch.bool), new])",
      "mask = torch.cat([torch.ones(ov, dtype=torch.bool), new])", LONG),
    M("teacher_window_without_overlap", "LongLive", "window: the teacher sees the overlap + the new frames",
      "distill/streaming_long.py", "ov = min(self.overlap, start)", "ov = 0", LONG),
    M("sequence_restarts_every_step", "LongLive", "the sequence state persists across optimizer steps",
      "distill/streaming_long.py", "if seq is None or seq.end >= self.length:", "if True:", LONG),
    M("critic_steps_do_not_advance", "LongLive", "critic steps advance the sequence too",
      "distill/streaming_long.py", "seq.end = start + n", "seq.end = start + n if grad else start", LONG),
    M("lora_alpha_not_the_rank", "LongLive (LoRA)", "LoRA: alpha = rank by default (scale 1)",
      "distill/streaming_long.py", "alpha = o.lora_rank if o.lora_alpha is None else o.lora_alpha",
      "alpha = 1.0 if o.lora_alpha is None else o.lora_alpha", LONG),
    M("lora_skips_the_ffn", "LongLive (LoRA)", "LoRA on every linear of the blocks: self-attention, "
      "cross-attention AND the FFN", "distill/lora.py",
      'TARGETS = r"blocks\\.\\d+\\.(self_attn|cross_attn)\\.(q|k|v|o)|blocks\\.\\d+\\.ffn\\.(0|2)"',
      'TARGETS = r"blocks\\.\\d+\\.(self_attn|cross_attn)\\.(q|k|v|o)"', LONG),
    M("sequence_runs_past_max_frames", "LongLive", "at the sequence length a new sequence (new prompts) starts",
      "distill/streaming_long.py", "if seq is None or seq.end >= self.length:",
      "if seq is None or seq.end >= self.length + self.opt.new_frames:", LONG),
    M("streaming_exit_always_last", "LongLive", "sampler: the exit step is redrawn per step, uniform",
      "distill/streaming_long.py", "exit_step = ctx.stream(\"exit_step\").shared_int(len(self.timesteps))",
      "exit_step = len(self.timesteps) - 1", LONG),
    # ------------------------------------------------------------------ Self-Forcing++
    M("backward_noise_is_pure_noise", "Self-Forcing++", "backward-noise init: the window enters from the "
      "student's own frames re-noised", "distill/self_forcing_pp.py",
      "return add_noise(self.clean[:, :, i:i + n], self.fresh(start, n, INITIAL), self.sigma).to(self.dtype)",
      "return self.fresh(start, n, INITIAL).to(self.dtype)", SFPP),
    M("backward_noise_reuses_rollout_noise", "Self-Forcing++", "backward-noise init: fresh eps",
      "distill/self_forcing_pp.py", "self.fresh(start, n, INITIAL), self.sigma)",
      "self.base(start, n, INITIAL), self.sigma)",
      SFPP),
    M("backward_noise_at_full_noise", "Self-Forcing++", "backward-noise init: re-noised to the entry level",
      "distill/self_forcing_pp.py", "timestep_to_sigma(self.timesteps[entry])", "timestep_to_sigma(self.timesteps[0])",
      SFPP),
    M("window_regenerated_over_the_whole_list", "Self-Forcing++", "the window is re-generated over the tail "
      "timesteps[entry:]", "distill/self_forcing_pp.py", "self.plan(self.timesteps[entry:])", "self.plan()", SFPP),
    M("last_window_start_never_drawn", "Self-Forcing++", "sampler: window start uniform in {0, c, ..., L - T}",
      "distill/self_forcing_pp.py", "starts = (self.rollout_frames - self.opt.frames) // self.chunk + 1",
      "starts = max(1, (self.rollout_frames - self.opt.frames) // self.chunk)", SFPP),
    M("window_context_cache_overwritten", "Self-Forcing++", "the window is re-generated from the cache C_s "
      "(the estimate x_hat runs on a copy)", "distill/self_forcing_pp.py", "cache=copy.deepcopy(cache)).x0",
      "cache=cache).x0", SFPP),
    M("sfpp_reencoded_chunk_not_masked", "Self-Forcing++", "masks: the re-encoded first chunk of a later window "
      "is out of the generator's loss", "distill/self_forcing_pp.py", "context_latents, mask if grad else None)",
      "context_latents, None)", SFPP),
    # ------------------------------------------------------------------ CausVid
    M("causvid_levels_without_clean", "CausVid", "levels: each chunk picks from the list + 0", "distill/causvid.py",
      "levels = self.timesteps + [0.0] if self.opt.levels is None",
      "levels = self.timesteps if self.opt.levels is None",
      CAUSVID),
    M("causvid_one_level_per_clip", "CausVid", "levels: one level per CHUNK", "distill/causvid.py",
      "choose_levels(\n            self.levels, n, frames, self.chunk, generator=generator)",
      "choose_levels(\n            self.levels, n, frames, frames, generator=generator)", CAUSVID),
    M("causvid_clean_chunks_in_the_loss", "CausVid", "masks: chunks drawn at t = 0 are out of the loss",
      "distill/causvid.py", "return Generated(out, ~clean)", "return Generated(out, None)", CAUSVID),
    M("causvid_bidirectional_student", "CausVid", "masks: one block-causal forward over the clip",
      "distill/causvid.py", "context, chunk_frames=self.chunk)", "context)", CAUSVID),
    # ------------------------------------------------------------------ ODE init
    M("ode_target_not_the_clean_latent", "ODE init", "target: the stored clean latent (the last state)",
      "distill/ode_init.py", "(x0.float() - ode[:, -1].float()) ** 2", "(x0.float() - ode[:, -2].float()) ** 2", ODE),
    M("ode_clean_chunks_in_the_loss", "ODE init", "masks: chunks at t = 0 are context only", "distill/ode_init.py",
      "mask = t > 0\n", "mask = t >= 0\n", ODE),
    M("ode_one_state_per_clip", "ODE init", "levels: one stored state per CHUNK", "distill/ode_init.py",
      "choose_levels(states, b, F, self.chunk, generator)", "choose_levels(states, b, F, F, generator)", ODE),
    M("ode_bidirectional_student", "ODE init", "masks: block-causal student forward", "distill/ode_init.py",
      "v = model(x_t, t, context, chunk_frames=self.chunk, window_frames=cfg.window_frames,",
      "v = model(x_t, t, context, chunk_frames=None, window_frames=cfg.window_frames,", ODE),
    M("ode_stored_levels_mislabelled", "ODE init", "stored steps: each stored latent carries its own level",
      "distill/ode_pair_stage.py", "return [states[k] for k in indices]",
      "return [states[k] for k in range(len(indices) - 1)] + [0.0]", ODE),
    M("ode_teacher_shift_ignored", "ODE init", "timestep law: the teacher samples with its own shift (8)",
      "distill/ode_init.py", "return Teacher(steps=self.teacher_steps, shift=self.teacher_shift,",
      "return Teacher(steps=self.teacher_steps, shift=5.0,", ODE),
    M("ode_teacher_without_cfg", "ODE init", "guidance: the teacher samples with CFG (6)", "distill/ode_init.py",
      "guidance=self.teacher_guidance, sigma_max=self.teacher_sigma_max)",
      "guidance=1.0, sigma_max=self.teacher_sigma_max)",
      ODE),
    # ------------------------------------------------------------------ Causal Forcing
    M("causal_pairs_bidirectional_teacher", "Causal Forcing (causal ODE pairs)", "the pairs come from the AR "
      "teacher chunk by chunk with its KV cache, not from one bidirectional solve", "distill/ode_init.py",
      "if self.teacher_kind == \"causal\":\n                return Chunkwise(",
      "if False:\n                return Chunkwise(", REF_CAUSAL + ODE),
    M("causal_pairs_context_noised", "Causal Forcing (causal ODE pairs)", "context: each finished chunk is "
      "committed clean (t = 0), as the teacher was trained", "distill/ode_init.py",
      "CLEAN_CONTEXT = 0.0 ", "CLEAN_CONTEXT = 500.0 ", REF_CAUSAL + ODE),
    M("commit_noisy_latents", "every causal plan (Causal Forcing's pairs, every student)", "context: a finished "
      "unit commits its clean output, not its last noisy input", "models/rollout.py",
      "            commit(clean, c0)\n        yield _committed_chunk",
      "            commit(x[:, :, -clean.shape[2]:], c0)\n        yield _committed_chunk", REF_CAUSAL + ENGINE),
    M("causal_cd_target_wrong_step", "Causal Forcing (causal CD)", "target: the target student at t' (the "
      "teacher's next level)", "distill/causal_cd.py",
      "x0, x_next, t_next, context)", "x0, x_next, t, context)", REF_CAUSAL),
    M("causal_cd_target_not_detached", "Causal Forcing (causal CD)", "stop-gradient: the target runs without "
      "gradient", "distill/causal_cd.py", "with torch.no_grad():\n            target = self.student_x0",
      "with torch.enable_grad():\n            target = self.student_x0", REF_CAUSAL),
    M("causal_cd_student_noisy_context", "Causal Forcing (causal CD)", "context: the student's chunks see the "
      "CLEAN earlier chunks (teacher forcing)", "distill/causal_cd.py",
      "student = self.student_x0(self.run.model(role), x0, x_t, t, context)",
      "student = self.student_x0(self.run.model(role), x_t, x_t, t, context)", REF_CAUSAL),
    M("causal_cd_teacher_noisy_context", "Causal Forcing (causal CD)", "context: the teacher's step sees the "
      "CLEAN earlier chunks (teacher forcing)", "distill/causal_cd.py",
      "v_teacher = self.teacher_flow(x0, x_t, t, context)", "v_teacher = self.teacher_flow(x_t, x_t, t, context)",
      REF_CAUSAL),
    M("causal_cd_teacher_without_cfg", "Causal Forcing (causal CD)", "guidance: the teacher's step is "
      "uncond + g (cond - uncond)", "distill/causal_cd.py",
      "return v_u + self.opt.guidance * (v - v_u)", "return v", REF_CAUSAL),
    M("causal_cd_last_level_never_drawn", "Causal Forcing (causal CD)", "sampler: n ~ U{0 .. N - 2}",
      "distill/causal_cd.py", "torch.randint(0, self.opt.cd_steps - 1,", "torch.randint(0, self.opt.cd_steps - 2,",
      REF_CAUSAL),
    # ------------------------------------------------------------------ diffusion / teacher forcing
    M("df_one_level_per_frame", "diffusion forcing", "levels: one level per chunk", "train/diffusion_forcing.py",
      "sample_flow_timesteps, frames, chunk_frames=self.chunk,", "sample_flow_timesteps, frames, chunk_frames=1,",
      RECIPES + TRAINER),
    M("df_caption_dropout_ignored", "diffusion / teacher forcing", "caption dropout (uncond_prob) for CFG",
      "train/diffusion_forcing.py", "context = self.drop_captions(context, ctx, self.opt.uncond_prob)", "",
      RECIPES + TRAINER),
    M("tf_clean_half_labelled_noisy", "teacher forcing", "[clean | noisy] layout: the clean copies at t = 0",
      "train/diffusion_forcing.py", "both = torch.cat([torch.zeros_like(t), t], dim=1)",
      "both = torch.cat([t, t], dim=1)", RECIPES + TRAINER),
    M("tf_loss_on_the_clean_half", "teacher forcing", "[clean | noisy] layout: the loss is on the noisy half",
      "train/diffusion_forcing.py", "teacher_forcing=True, **kw)[:, :, F:]", "teacher_forcing=True, **kw)[:, :, :F]",
      RECIPES + TRAINER),
    M("df_flow_target_reversed", "diffusion / teacher forcing", "loss: flow matching to v = noise - x0",
      "train/diffusion_forcing.py", "return flow_matching_loss(v, x0, noise)",
      "return flow_matching_loss(v, noise, x0)", RECIPES + TRAINER),
    M("flow_matching_target_reversed", "teacher, diffusion / teacher forcing, AR-Diffusion, every DMD critic",
      "loss: flow matching to v = noise - x0", "train/flow_matching.py",
      "target = flow_target(x0.float(), noise.float())", "target = flow_target(noise.float(), x0.float())",
      RECIPES + TRAINER + DMD),
    # ------------------------------------------------------------------ AR-Diffusion / FoPP
    M("fopp_backward_walk_with_suffix_counts", "AR-Diffusion", "FoPP: the backward walk weights by prefix counts "
      "(mat_e)", "train/timesteps.py", "t = _draw_between(log_prefix[:, f], zero, out[:, f + 1], generator)",
      "t = _draw_between(log_suffix[:, f], zero, out[:, f + 1], generator)", TIMESTEPS + RECIPES),
    M("fopp_start_frame_always_first", "AR-Diffusion", "FoPP: f* ~ U{0..F-1}", "train/timesteps.py",
      "f_star = torch.randint(0, frames, (batch,), generator=generator, device=dev)",
      "f_star = torch.randint(0, 1, (batch,), generator=generator, device=dev)", TIMESTEPS + RECIPES),
    M("forward_sampler_first_level_uniform", "AR-Diffusion", "sampler: t_0 weighted by its completions (uniform "
      "over all sequences)", "train/timesteps.py", "t0 = _draw_between(log_suffix[:, 0], zero,",
      "t0 = _draw_between(log_suffix[:, 0] * 0, zero,", TIMESTEPS + RECIPES),
    M("ar_levels_off_by_one", "AR-Diffusion", "level law: level l is sigma (l + 1) / T", "train/timesteps.py",
      "return shift_sigma((levels.double() + 1) / num_levels, shift).float()",
      "return shift_sigma(levels.double() / num_levels, shift).float()", TIMESTEPS + RECIPES),
    M("ar_levels_reversed", "AR-Diffusion", "levels non-decreasing along time (earlier frames cleaner)",
      "train/ar_diffusion.py", "return levels.repeat_interleave(self.opt.chunk_frames, dim=1)[:, :frames]",
      "return levels.flip(1).repeat_interleave(self.opt.chunk_frames, dim=1)[:, :frames]", RECIPES + TRAINER),
    M("ar_bidirectional", "AR-Diffusion", "masks: temporal-causal attention", "train/ar_diffusion.py",
      "context, chunk_frames=self.opt.chunk_frames)", "context)", RECIPES + TRAINER),
    # ------------------------------------------------------------------ samplers shared by recipes
    M("score_draw_not_clamped", "every DMD recipe", "timestep law: clamped to [t_min, t_max]", "train/timesteps.py",
      "shift_sigma(k.double() / NUM_TRAIN_TIMESTEPS, shift)).clamp(t_min, t_max)",
      "shift_sigma(k.double() / NUM_TRAIN_TIMESTEPS, shift))", TIMESTEPS + DMD),
    M("choose_levels_skips_the_last", "CausVid, ODE init", "sampler: each chunk's level uniform over the list",
      "train/timesteps.py", "idx = torch.randint(0, len(levels), (batch,",
      "idx = torch.randint(0, max(1, len(levels) - 1), (batch,",
      TIMESTEPS + CAUSVID + ODE),
    # ------------------------------------------------------------------ trainer: update ratios, EMA, clip
    M("update_ratio_ignored", "every DMD recipe", "update ratio: the generator updates every Nth step",
      "train/trainer.py", "if role.trainable and self.step % role.cfg.update_every == 0:", "if role.trainable:",
      TRAINER + SF),
    M("critic_updates_before_generator", "every DMD recipe", "update order: generator first, then the critic",
      "train/trainer.py", "for name, role in self.roles.items():\n            if role.trainable and self.step",
      "for name, role in reversed(list(self.roles.items())):\n            if role.trainable and self.step",
      TRAINER + SF),
    M("ema_every_step", "every recipe with EMA", "EMA: updated after the role's own updates only",
      "train/trainer.py",
      "if role.trainable and f\"{role.name}/loss\" in metrics and f\"{role.name}/skipped\" not in metrics:",
      "if role.trainable:",
      TRAINER + SF),
    M("accumulation_not_averaged", "every recipe", "gradient accumulation: the mean over micro-batches (equals "
      "the larger batch)", "train/trainer.py", "self.parallel.backward(role, loss / A)",
      "self.parallel.backward(role, loss)", TRAINER),
    M("grad_clip_ignored", "every recipe", "grad clip (Self-Forcing: 10)", "train/trainer.py",
      "clip = role.cfg.grad_clip if role.cfg.grad_clip is not None else math.inf", "clip = math.inf", TRAINER + SF),
    M("ema_decay_inverted", "every recipe with EMA", "EMA: ema <- decay * ema + (1 - decay) * w",
      "train/roles.py", "e.lerp_(params[k].detach().float(), 1.0 - decay)",
      "e.lerp_(params[k].detach().float(), decay)",
      TRAINER + SF),
    M("ema_start_ignored", "every recipe with EMA", "EMA: starts at ema_start", "train/roles.py",
      "if decay is None or step < role.cfg.ema_start:", "if decay is None:", TRAINER + SF),
    M("ema_starts_from_zero", "every recipe with EMA", "EMA: initialised to the weights at ema_start",
      "train/roles.py", "role.ema = {k: p.detach().float().clone() for k, p in params.items()}",
      "role.ema = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}", TRAINER + SF),
    # the study's evaluation: ToyBench's background metric and the claims' paired differences
    M("background_frame_in_own_reference", "the study", "background: a first-bucket frame is not scored against "
      "a reference that holds it", "eval/toybench.py",
      "ref = _reference(np.delete(stack, t, 0)) if t < len(stack) and len(stack) > 1 else shared",
      "ref = shared", ("tests/test_eval_background.py",)),
    M("claims_difference_reversed", "the study", "claims: the paired difference is A - B", "study_claims.py",
      "d = np.array([_num(a[seed][k]) - _num(b[seed][k]) for k in keys])",
      "d = np.array([_num(b[seed][k]) - _num(a[seed][k]) for k in keys])", ("tests/test_study_claims.py",)),
    M("claims_verdict_on_the_wrong_tail", "the study", "claims: supported only when the whole interval is above 0",
      "study_claims.py", "    if lo > 0:\n        return \"supported\"", "    if hi > 0:\n        return \"supported\"",
      ("tests/test_study_claims.py",)),
    M("claims_unpaired_across_seeds", "the study", "claims: videos are paired within their seed", "study_claims.py",
      "keys = sorted(set(a[seed]) & set(b[seed]))", "keys = sorted(set(a[seed]) & set(b[seeds[0]]))",
      ("tests/test_study_claims.py",)),
]
