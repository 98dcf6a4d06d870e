"""The toy teacher learns: the committed toy teacher (configs/toy/teacher_checkpoint, trained by
configs/toy/teacher.yaml) draws the captioned number and colours of balls - checked with the
toy world's colour detector, not by eye - and the config still makes it: re-training reproduces
the recorded loss trajectory of the run that produced the checkpoint."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from forcelab.data.toyworld import ToyWorld, ToyWorldConfig, parse_caption
from forcelab.eval.toydetect import detect_frames
from forcelab.models.autoencoder import load_autoencoder
from forcelab.models.dit import CausalDiT
from forcelab.models.plans import Teacher
from forcelab.models.rollout import Noise, rollout
from forcelab.models.text_encoder import load_text_encoder
from forcelab.train.config import load_train_config
from forcelab.train.trainer import Trainer

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "toy"
CHECKPOINT = CONFIGS / "teacher_checkpoint"
REFERENCE = json.loads((CHECKPOINT / "reference.json").read_text())
HELD_OUT = 10 ** 6          # scenes no training run saw
PROMPTS = 16


def match_rate(model, prompts: list[str]) -> float:
    """Fraction of samples whose most common per-frame set of detected balls is exactly the
    caption's multiset of colours (count and colours)."""
    codec, te = load_autoencoder("toy"), load_text_encoder("toy")
    frames = REFERENCE["frames"]
    emb = te.encode(prompts)[0]
    negative = te.encode([""])[0].expand(len(prompts), -1, -1)
    plan = Teacher(steps=20, shift=3.0, solver="euler", guidance=3.0)
    noise = Noise(list(range(len(prompts))), model.config.in_channels, 8, 8)
    with torch.no_grad():
        video = codec.decode(rollout(model, plan, emb, noise, frames, negative=negative).x0)
    pixels = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()
    hits = 0
    for clip, caption in zip(pixels, prompts):
        want = Counter(parse_caption(caption)[0])
        seen = Counter(tuple(sorted(b.color for b in balls)) for balls in detect_frames(np.ascontiguousarray(clip)))
        hits += Counter(seen.most_common(1)[0][0]) == want
    return hits / len(prompts)


@pytest.fixture(scope="module")
def prompts():
    world = ToyWorld(ToyWorldConfig(frames=REFERENCE["frames"]))
    return [world.scene(HELD_OUT + i).caption for i in range(PROMPTS)]


def test_the_toy_teacher_draws_the_captioned_balls(prompts):
    trained = CausalDiT.from_pretrained(CHECKPOINT)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        untrained = CausalDiT(trained.config).eval()
    rate, baseline = match_rate(trained, prompts), match_rate(untrained, prompts)
    # the 3000-step teacher showed exactly the captioned balls in most frames for 45% of 64
    # held-out captions (62.5% of these 16); the committed 12000-step one scores ToyBench
    # adherence 0.82 against its 0.77 (bench/RESULTS.md); the untrained model 0%
    assert rate >= 0.25, rate
    assert baseline <= 0.1, baseline
    losses = REFERENCE["losses"]
    assert losses["1"] > 4 * losses[str(REFERENCE["steps"])]        # the loss fell during training


def test_the_committed_teacher_is_what_the_config_makes(tmp_path):
    weights = (CHECKPOINT / "diffusion_pytorch_model.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == REFERENCE["weights_sha256"]
    cfg = load_train_config([CONFIGS / "teacher.yaml"], [f"output_dir={tmp_path / 'run'}", "logging.wandb=disabled",
                                                         "logging.progress=false", "checkpoint.every=0", "threads=1"])
    assert cfg.max_steps == REFERENCE["steps"]
    prefix = REFERENCE["prefix_steps"]
    Trainer(cfg).run(stop_at=prefix)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    got = {r["step"]: r["generator/loss"] for r in rows}
    want = {int(k): v for k, v in REFERENCE["losses"].items() if int(k) <= prefix}
    # bit for bit on the machine that made it; other CPUs may round differently (stated tolerance)
    assert all(abs(got[s] - v) <= 1e-4 * abs(v) for s, v in want.items()), [(s, got[s], v) for s, v in want.items()]
