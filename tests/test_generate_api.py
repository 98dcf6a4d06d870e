"""The Python API of generation: the same videos and sidecars as `forcelab generate`, and one
clear line for a bad argument, before any weights are loaded."""

import json

import pytest

from forcelab.cli import main
from forcelab.data.video import read_video
from forcelab.errors import ForcelabError
from forcelab.generate import GeneratedVideo, generate
from forcelab.generate import api as api_module
from forcelab.models import CausalDiT
from forcelab.models.plans import Chunkwise, Teacher, default_timesteps


@pytest.fixture
def ckpt(toy_dit):
    return toy_dit                   # a one-layer toy DiT (tests/conftest.py)


SAME_PIXELS = 1e-4    # largest |difference| of two [-1, 1] frames that are the same frames (last-bit float noise)


def timeless(side: dict) -> dict:
    return {k: v for k, v in side.items() if k != "seconds_per_batch"}


def test_the_api_writes_what_the_cli_writes(ckpt, tmp_path, monkeypatch):
    written = {}                     # file name -> the pixels handed to the mp4 writer, per caller
    real_write = api_module.write_video_and_sidecar

    def capture(path, pixels, *args, **kwargs):
        written[(path.parent.name, path.name)] = pixels.detach().clone()
        return real_write(path, pixels, *args, **kwargs)
    monkeypatch.setattr(api_module, "write_video_and_sidecar", capture)
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
        # the same frames, compared before the lossy codec: two calls may differ in a float's last bit
        # (vectorised kernels depend on memory alignment), which can move a pixel by one 8-bit level
        # and, through the encoder's choices, a whole block of the decoded video
        api_pixels, cli_pixels = written[("api", v.path.name)], written[("cli", v.path.name)]
        assert (api_pixels - cli_pixels).abs().max() < SAME_PIXELS
        assert read_video(v.path).shape == read_video(cli).shape
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
