"""Timestep draws against exact enumeration and hand-computed probabilities."""

import itertools
import math

import pytest
import torch

from forcelab.errors import ForcelabError
from forcelab.models.schedule import training_sigmas
from forcelab.train.timesteps import (
    ScoreTimesteps, choose_levels, fopp_sample, nondecreasing_log_counts, sample_flow_timesteps, sample_timesteps,
    snap_to_table, uniform_nondecreasing_sample)

FRAMES, LEVELS, SAMPLES = 4, 5, 200_000     # 70 non-decreasing sequences
# Expected TV of an empirical distribution over K = 70 outcomes from N draws is about
# 0.5 * sum_k sqrt(2 p_k / (pi N)) ~ 0.005; measured 0.0064 (FoPP) and 0.0065 (uniform).
TV_BOUND = 0.015


def nondecreasing(frames, levels):
    return [s for s in itertools.product(range(levels), repeat=frames) if all(a <= b for a, b in zip(s, s[1:]))]


def exact_fopp(frames, levels) -> dict:
    """Brute force: f*, t* uniform, then uniform among the sequences through (f*, t*)."""
    seqs = nondecreasing(frames, levels)
    p = dict.fromkeys(seqs, 0.0)
    for f in range(frames):
        for t in range(levels):
            through = [s for s in seqs if s[f] == t]
            for s in through:
                p[s] += 1.0 / (frames * levels * len(through))
    return p


def empirical(samples: torch.Tensor, seqs, levels) -> torch.Tensor:
    """Frequencies of each sequence in `seqs` (order kept); sequences outside count nowhere."""
    weights = levels ** torch.arange(samples.shape[1])
    lut = torch.full((levels ** samples.shape[1],), -1, dtype=torch.long)
    for i, s in enumerate(seqs):
        lut[int((torch.tensor(s) * weights).sum())] = i
    codes = lut[(samples * weights).sum(1)]
    assert (codes >= 0).all()
    return torch.bincount(codes, minlength=len(seqs)).double() / samples.shape[0]


@pytest.fixture(scope="module")
def fopp_draws():
    return fopp_sample(SAMPLES, FRAMES, LEVELS, generator=torch.Generator().manual_seed(0))


def test_fopp_matches_enumeration(fopp_draws):
    exact = exact_fopp(FRAMES, LEVELS)
    seqs = list(exact)
    p = torch.tensor([exact[s] for s in seqs], dtype=torch.float64)
    tv = 0.5 * (empirical(fopp_draws, seqs, LEVELS) - p).abs().sum().item()
    assert tv < TV_BOUND, tv
    # the bound separates FoPP from the uniform distribution (exact TV between them: 0.19)
    assert 0.5 * (p - 1 / len(seqs)).abs().sum().item() > 10 * TV_BOUND


def test_fopp_per_frame_marginals(fopp_draws):
    exact = exact_fopp(FRAMES, LEVELS)
    for f in range(FRAMES):
        want = torch.zeros(LEVELS, dtype=torch.float64)
        for s, p in exact.items():
            want[s[f]] += p
        got = torch.bincount(fopp_draws[:, f], minlength=LEVELS).double() / SAMPLES
        assert (got - want).abs().max().item() < 0.005, (f, got, want)   # ~5 standard errors


def test_forward_only_sampler_is_uniform():
    seqs = nondecreasing(FRAMES, LEVELS)
    assert len(seqs) == math.comb(LEVELS + FRAMES - 1, FRAMES)
    draws = uniform_nondecreasing_sample(SAMPLES, FRAMES, LEVELS, generator=torch.Generator().manual_seed(1))
    tv = 0.5 * (empirical(draws, seqs, LEVELS) - 1 / len(seqs)).abs().sum().item()
    assert tv < TV_BOUND, tv


@pytest.mark.parametrize("sampler", [fopp_sample, uniform_nondecreasing_sample])
def test_wan_scale_draw_is_nondecreasing_and_in_range(sampler):
    g = torch.Generator().manual_seed(2)
    x = torch.cat([sampler(16, 21, 1000, generator=g) for _ in range(8)])
    assert x.dtype == torch.long and x.shape == (128, 21)
    assert (x >= 0).all() and (x < 1000).all() and (x.diff(dim=1) >= 0).all()
    assert x.float().std() > 100                    # spread over the levels, not stuck at an end


def test_edge_sizes():
    g = torch.Generator().manual_seed(3)
    one_frame = fopp_sample(20_000, 1, 4, generator=g)
    assert one_frame.shape == (20_000, 1)
    assert (torch.bincount(one_frame[:, 0], minlength=4).double() / 20_000 - 0.25).abs().max() < 0.02
    assert (fopp_sample(5, 6, 1, generator=g) == 0).all()
    assert torch.equal(fopp_sample(3, 4, 9, generator=torch.Generator().manual_seed(4)),
                       fopp_sample(3, 4, 9, generator=torch.Generator().manual_seed(4)))
    with pytest.raises(ForcelabError):
        fopp_sample(4, 0, 10)


def test_log_counts_against_exact_integers():
    """The counts overflow int64 here (C(1019, 20) ~ 1e41); their logs match Python's exact ints."""
    log_suffix, log_prefix = nondecreasing_log_counts(21, 1000)
    for t, f in [(0, 0), (0, 20), (999, 0), (500, 7), (3, 19), (998, 1)]:
        suffix = math.comb(1000 - 1 - t + 20 - f, 20 - f)
        prefix = math.comb(t + f, f)
        assert log_suffix[t, f].item() == pytest.approx(math.log(suffix), rel=1e-12, abs=1e-10)
        assert log_prefix[t, f].item() == pytest.approx(math.log(prefix), rel=1e-12, abs=1e-10)
    # the recursion of AR-Diffusion's mat_s: s[t, f] = s[t + 1, f] + s[t, f + 1]
    s = nondecreasing_log_counts(5, 7)[0].exp()
    torch.testing.assert_close(s[:-1, :-1], s[1:, :-1] + s[:-1, 1:])


# ---------------------------------------------------------------------- DMD / critic draw
def test_score_draw_by_hand():
    """k ~ U{0..999}, t = 1000 shift5(k / 1000) clamped to [20, 980]:
    P(t < 500) = P(k / 1000 < 1 / 6) = 167 / 1000;  P(t = 20) = P(k <= 4) = 5 / 1000
    (shift5(u) <= 0.02 iff u <= 0.02 / 4.92)."""
    t = sample_timesteps(400_000, generator=torch.Generator().manual_seed(5))
    assert t.dtype == torch.float32 and t.min() == 20 and t.max() == 980
    assert (t < 500).double().mean().item() == pytest.approx(0.167, abs=0.003)
    assert (t == 20).double().mean().item() == pytest.approx(0.005, abs=0.0007)
    # 1000 shift5(k / 1000) >= 980 iff k >= 1000 * 0.98 / (5 - 4 * 0.98) = 907.4
    assert (t == 980).double().mean().item() == pytest.approx(92 / 1000, abs=0.003)


def test_snap_to_shifted_table():
    table = (1000 * training_sigmas(5.0)).float()
    t = ScoreTimesteps(snap_shift=5.0).sample(2000, generator=torch.Generator().manual_seed(6))
    assert torch.isin(t, table).all()
    raw = torch.tensor([20.0, 300.0, 977.3])
    snapped = snap_to_table(raw, 5.0)
    for r, s in zip(raw, snapped):
        assert s == table[(table - r).abs().argmin()]


def test_flow_draws():
    g = torch.Generator().manual_seed(7)
    t = sample_flow_timesteps(50_000, generator=g)
    assert t.shape == (50_000,) and 0 <= t.min() and t.max() <= 1000
    assert t.mean().item() == pytest.approx(500, abs=5)
    # shift 3: P(t < 500) = P(u < 1 / 4)
    shifted = sample_flow_timesteps(50_000, shift=3.0, generator=g)
    assert (shifted < 500).double().mean().item() == pytest.approx(0.25, abs=0.01)
    ln = sample_flow_timesteps(50_000, distribution="logit_normal", generator=g)
    assert ln.median().item() == pytest.approx(500, abs=10)
    chunked = sample_flow_timesteps(4, 7, chunk_frames=3, generator=g)      # 3 chunks, the last of 1 frame
    assert chunked.shape == (4, 7)
    assert (chunked[:, :3] == chunked[:, :1]).all() and (chunked[:, 3:6] == chunked[:, 3:4]).all()
    assert (chunked[:, 0] != chunked[:, 3]).all()
    with pytest.raises(ForcelabError):
        sample_flow_timesteps(4, distribution="beta")
    with pytest.raises(ForcelabError):
        sample_timesteps(4, t_min=900, t_max=100)


def test_choose_levels():
    levels = [1000.0, 757.0, 522.0, 0.0]
    t = choose_levels(levels, 500, 21, chunk_frames=3, generator=torch.Generator().manual_seed(8))
    assert t.shape == (500, 21) and torch.isin(t, torch.tensor(levels)).all()
    blocks = t.view(500, 7, 3)
    assert (blocks == blocks[..., :1]).all()
    freq = torch.stack([(t == v).double().mean() for v in levels])
    assert (freq - 0.25).abs().max() < 0.03
