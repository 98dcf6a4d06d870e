"""Two ranks (gloo, CPU): preprocess writes each rank's shards, the dataset gives ranks disjoint
samples that together cover the data set.

The test launches this file as a script on two ranks with torchrun;
each rank preprocesses, reads its split (with 2 DataLoader workers) and writes the keys it saw.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

VIDEOS = 6


def rank_main(videos: str, out: str) -> None:
    import torch.distributed as dist

    from forcelab import cli
    from forcelab.data.shards import ShardDataset, shard_loader

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    rc = cli.main(["preprocess", "--quiet", "--videos", videos, "--out", out, "--vae", "toy", "--text-encoder",
                   "toy", "--size", "32x32", "--frames", "5", "--fps", "8", "--shard-size", "1"])
    assert rc == 0, rc
    dist.barrier()
    loader = shard_loader(ShardDataset(out, shuffle=4, seed=0), batch_size=2, num_workers=2)
    keys = [k for batch in loader for k in batch["key"]]
    Path(out, f"keys-{rank}.json").write_text(json.dumps(keys))
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_read_disjoint_samples_covering_the_data(tmp_path):
    from forcelab.data.toyworld import ToyWorld
    from forcelab.data.video import write_video

    videos = tmp_path / "videos"
    videos.mkdir()
    world = ToyWorld()
    for i in range(VIDEOS):
        clip = world.clip(i, frames=6)
        write_video(videos / f"v{i}.mp4", clip.video.permute(0, 2, 3, 1), fps=8)
        (videos / f"v{i}.txt").write_text(clip.scene.caption)
    out = tmp_path / "shards"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           __file__, str(videos), str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    seen = [json.loads((out / f"keys-{r}.json").read_text()) for r in range(2)]
    a, b = set(seen[0]), set(seen[1])
    assert len(a) == len(seen[0]) and len(b) == len(seen[1])  # no repeats within a rank
    assert a and b and not a & b
    assert a | b == {f"{i:09d}" for i in range(VIDEOS)}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"inputs": VIDEOS, "written": VIDEOS, "skipped": 0, "shards": VIDEOS}
    # each rank wrote its own shards: shard k by rank k % 2
    assert [json.loads((out / f"shard-{k:06d}.json").read_text())["rank"] for k in range(VIDEOS)] == [0, 1] * 3


if __name__ == "__main__":
    rank_main(sys.argv[1], sys.argv[2])
