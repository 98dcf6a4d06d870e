"""The Python API of generation: the same videos and sidecars as `forcelab generate`, and one
clear line for a bad argument, before any weights are loaded."""

import json

import pytest

from forcelab.cli import main
from forcelab.data.video import read_video
from forcelab.errors import ForcelabError
from forcelab.generate import GeneratedVideo, generate
from forcelab.models import CausalDiT
from forcelab.models.plans import Chunkwise, Teacher, default_timesteps


@pytest.fixture
def ckpt(toy_dit):
    return toy_dit                   # a one-layer toy DiT (tests/conftest.py)


SAME_VIDEO_LEVELS = 0.5    # mean |difference| in 8-bit levels below which two decoded videos are the same video


def timeless(side: dict) -> dict:
    return {k: v for k, v in side.items() if k != "seconds_per_batch"}


def test_the_api_writes_what_the_cli_writes(ckpt, tmp_path):
    assert main(["generate", str(ckpt), "--vae", "toy", "--text-encoder", "toy", "--output", str(tmp_path / "cli"),
                 "--quiet", "--prompt", "a red ball", "--prompt", "two green balls", "--samples", "2", "--seed", "3",
                 "--frames", "6", "--window", "4", "--sink", "2", "--switch", "4:a blue ball"]) == 0
    videos = generate(ckpt, ["a red ball", "two green balls"], vae="toy", text_encoder="toy",
                      output=tmp_path / "api", samples=2, seed=3, frames=6, switches=[(4, "a blue ball")],
                      plan=Chunkwise(timesteps=default_timesteps(4, 5.0), window_frames=4, sink_frames=2),
                      progress=False)
    assert [v.path.name for v in videos] == ["0000-a_red_ball-0.mp4", "0000-a_red_ball-1.mp4",
                                             "0001-two_green_balls-0.mp4", "0001-two_green_balls-1.mp4"]
    for v in videos:
        assert isinstance(v, GeneratedVideo) and v.path.parent == tmp_path / "api"
        cli = tmp_path / "cli" / v.path.name
        # the same frames: not the same bytes, because float kernels may differ in the last bit between
        # two calls (vectorised paths depend on memory alignment), which can move a pixel by one level
        # and the encoder's choices with it
        api_frames, cli_frames = read_video(v.path).float(), read_video(cli).float()
        assert api_frames.shape == cli_frames.shape
        assert (api_frames - cli_frames).abs().mean() < SAME_VIDEO_LEVELS
        on_disk = json.loads(v.sidecar_path.read_text())
        assert timeless(on_disk) == timeless(json.loads(cli.with_suffix(".json").read_text()))
        assert on_disk == json.loads(json.dumps(v.sidecar, default=str))


def test_names_pair_with_the_conditioning_prompts(ckpt, tmp_path):
    videos = generate(ckpt, ["a long extended prompt about a ball"], names=["a ball"], vbench=True,
                      vae="toy", text_encoder="toy", output=tmp_path, frames=2, progress=False)
    assert videos[0].path.name == "a ball-0.mp4"
    assert videos[0].sidecar["prompt"] == "a ball"
    assert videos[0].sidecar["prompt_text"] == "a long extended prompt about a ball"


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompts=[]), "no prompt"),
    (dict(prompts=["a", ""]), "every prompt must be a non-empty string"),
    (dict(names=["x", "y"]), "2 names for 1 prompts"),
    (dict(plan="chunkwise"), "plan: a plan of models/plans.py"),
    (dict(samples=0), "--samples"),
    (dict(frames=-1), "--frames"),
    (dict(fps=float("nan")), "--fps"),
    (dict(switch_mode="reset"), "--switch-mode 'reset'"),
    (dict(dtype="fp8"), "--dtype 'fp8'"),
    (dict(switches=["4:b"]), "not a (video frame, prompt) pair"),
    (dict(switches=[(4, "b")], plan=Teacher(steps=2)), "--switch needs a causal plan"),
    (dict(image="missing.png"), "--image missing.png: file not found"),
])
def test_a_bad_argument_is_one_line_before_the_model_loads(ckpt, tmp_path, monkeypatch, kwargs, message):
    def no_work(*a, **k):
        raise AssertionError("the DiT was loaded before the arguments were checked")
    monkeypatch.setattr(CausalDiT, "from_pretrained", no_work)
    monkeypatch.chdir(tmp_path)
    call = dict(prompts=["a red ball"], vae="toy", text_encoder="toy", output=tmp_path / "o", frames=2) | kwargs
    with pytest.raises(ForcelabError) as e:
        generate(ckpt, call.pop("prompts"), **call)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()
