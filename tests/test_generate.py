"""`forcelab generate` end to end on a tiny random checkpoint with the toy encoders."""

import json

import av
import pytest

from forcelab.cli import main
from forcelab.models import CausalDiT


SIDECAR_KEYS = {"video", "prompt", "prompt_text", "sample", "seed", "model", "model_format", "model_config",
                "vae", "text_encoder", "plan", "frames", "latent_frames", "height", "width", "fps", "batch",
                "negative_prompt", "switches", "device", "dtype", "vbench", "forcelab", "seconds_per_batch"}


@pytest.fixture
def ckpt(toy_dit):
    return toy_dit                   # a one-layer toy DiT (tests/conftest.py)


def generate(ckpt, out, *extra):
    return main(["generate", str(ckpt), "--vae", "toy", "--text-encoder", "toy", "--output", str(out),
                 "--quiet", *map(str, extra)])


def frames_of(path):
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return len(frames), frames[0].shape


def test_writes_decodable_videos_with_sidecars(ckpt, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("two green balls\n\nthree yellow balls\n")
    rc = generate(ckpt, tmp_path / "out", "--prompt", "a red ball", "--prompts", prompts, "--samples", 2,
                  "--batch", 4, "--frames", 6, "--switch", "4:a blue ball", "--seed", 7)
    assert rc == 0
    videos = sorted((tmp_path / "out").glob("*.mp4"))
    assert len(videos) == 6                                  # 3 prompts x 2 samples, batches of 4 and 2
    for video in videos:
        assert frames_of(video) == (6, (32, 32, 3))
        side = json.loads(video.with_suffix(".json").read_text())
        assert SIDECAR_KEYS <= set(side) and side["video"] == video.name
        assert side["frames"] == 6 and side["plan"]["plan"] == "chunkwise"
        assert side["switches"] == [dict(frame=4, latent_frame=4, prompt="a blue ball", mode="recache",
                                         recache_frames=None, rope_jump=0)]
        assert side["seed"] == 7 + side["sample"]
    first = json.loads((tmp_path / "out" / "0000-a_red_ball-1.json").read_text())
    assert first["prompt"] == "a red ball" and first["plan"]["timesteps"] == pytest.approx([1000, 937.5, 2500 / 3, 625])


def test_vbench_names_and_other_plans(ckpt, tmp_path):
    assert generate(ckpt, tmp_path, "--prompt", "a red ball", "--samples", 2, "--vbench", "--frames", 4,
                    "--plan", "rolling", "--window", 4, "--sink", 2) == 0
    assert sorted(p.name for p in tmp_path.glob("*.mp4")) == ["a red ball-0.mp4", "a red ball-1.mp4"]
    assert generate(ckpt, tmp_path / "t", "--prompt", "a ball", "--plan", "teacher", "--steps", 2,
                    "--solver", "euler", "--frames", 3, "--negative-prompt", "blurry") == 0
    side = json.loads(next((tmp_path / "t").glob("*.json")).read_text())
    assert side["plan"]["guidance"] == 5.0 and side["negative_prompt"] == "blurry"
    assert frames_of(next((tmp_path / "t").glob("*.mp4")))[0] == 3
    assert generate(ckpt, tmp_path / "s", "--prompt", "a ball", "--plan", "step_matrix", "--ar-step", 2,
                    "--steps", "1000,500", "--frames", 4) == 0


def test_a_cache_policy_reaches_the_cache_and_the_sidecar(ckpt, tmp_path):
    assert generate(ckpt, tmp_path, "--prompt", "a red ball", "--frames", 12, "--window", 4, "--sink", 2,
                    "--cache-policy", "temporal_merge") == 0
    side = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert side["plan"]["cache_policy"] == "temporal_merge"


@pytest.mark.parametrize("args,message", [
    (["--prompt", "a", "--frames", 6, "--switch", "6:b"], "chunk boundaries"),
    (["--prompt", "a", "--frames", 6, "--switch", "9:b"], "chunk boundaries"),
    (["--prompt", "a", "--switch", "b"], "FRAME:PROMPT"),
    (["--prompt", "a", "--frames", 5], "whole number"),
    (["--prompt", "a", "--guidance", 3], "teacher plan only"),
    (["--prompt", "a", "--sink", 2], "needs a window"),
    (["--prompt", "a", "--plan", "teacher", "--switch", "2:b"], "causal plan"),
    (["--frames", 4], "no prompt"),
    (["--prompt", "a", "--cache-policy", "lru"], "unknown policy 'lru'"),
    (["--prompt", "a", "--cache-policy", "deep_forcing:keep=1"], "not an option of deep_forcing"),
    (["--prompt", "a", "--cache-policy", "temporal_merge", "--window", 0], "set a window"),
    (["--prompt", "a", "--plan", "teacher", "--cache-policy", "temporal_merge"], "does not apply to the teacher"),
])
def test_bad_input_fails_before_any_work(ckpt, tmp_path, monkeypatch, capsys, args, message):
    def no_work(*a, **k):
        raise AssertionError("the DiT was loaded before the input was checked")
    monkeypatch.setattr(CausalDiT, "from_pretrained", no_work)
    assert generate(ckpt, tmp_path, *args) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("*.mp4"))


def test_missing_model_or_encoders(ckpt, tmp_path, capsys):
    assert main(["generate", str(ckpt), "--prompt", "a", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no vae/ folder" in err and "--vae toy" in err
    weights = next(ckpt.glob("*.safetensors"))
    assert main(["generate", str(weights), "--prompt", "a", "--vae", "toy", "--text-encoder", "toy"]) == 2
    assert "training checkpoints" in capsys.readouterr().err.lower()
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "a"]) == 2
    capsys.readouterr()
    # argparse: unknown plan -> exit status 2 and one line
    assert main(["generate", str(ckpt), "--prompt", "a", "--plan", "magic"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and len(err.strip().splitlines()) == 1
