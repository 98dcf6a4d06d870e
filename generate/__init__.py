"""Generation: prompts -> videos with any sampling plan, each with a JSON sidecar.

    from forcelab.generate import generate
    from forcelab.models.plans import Chunkwise, default_timesteps

    videos = generate("runs/sf", ["a red ball bouncing"], plan=Chunkwise(default_timesteps(4, 5.0)),
                      frames=81, output="out/videos")
    for v in videos:
        print(v.path, v.sidecar["seed"])

api.py is the library function; cli.py turns `forcelab generate` flags into a call of it;
prompts.py reads prompt files, vbench_suite.py selects the bundled VBench prompts; prefix.py is
image-to-video / video extension; writer.py writes the mp4s and sidecars (atomically, never
over a file forcelab did not write). The function is imported on first use, so the prompt
suite can be read without loading torch.
"""

__all__ = ["generate", "GeneratedVideo"]


def __getattr__(name: str):
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
