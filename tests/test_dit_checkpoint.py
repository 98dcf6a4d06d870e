"""Saving and loading DiT checkpoints in both formats; parameter counts of the presets."""

import json

import pytest
import torch

from forcelab.errors import CheckpointError
from forcelab.models import CausalDiT, DiTConfig
from forcelab.models.checkpoint import diffusers_to_wan, wan_to_diffusers


TOY = DiTConfig.preset("toy")


def toy(seed=0, **kw):
    torch.manual_seed(seed)
    return CausalDiT(DiTConfig.preset("toy", **kw)).eval()


def outputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, TOY.in_channels, 3, 4, 6, generator=g)
    with torch.no_grad():
        return model(x, torch.rand(1, 3, generator=g) * 1000, torch.randn(1, 5, 32, generator=g), chunk_frames=2)


@pytest.mark.parametrize("fmt", ["wan", "diffusers"])
def test_round_trip_is_exact(tmp_path, fmt):
    model = toy(window_frames=6, sink_frames=2)
    model.save_pretrained(tmp_path / "ckpt", format=fmt)
    again = CausalDiT.from_pretrained(tmp_path / "ckpt")
    assert again.config == model.config          # forcelab fields ride along in config.json
    assert torch.equal(outputs(again), outputs(model))
    # and through the other format
    again.save_pretrained(tmp_path / "other", format="diffusers" if fmt == "wan" else "wan")
    assert torch.equal(outputs(CausalDiT.from_pretrained(tmp_path / "other")), outputs(model))


def test_wan_format_key_names(tmp_path):
    toy().save_pretrained(tmp_path / "wan", format="wan")
    cfg = json.loads((tmp_path / "wan" / "config.json").read_text())
    assert cfg["_class_name"] == "WanModel" and cfg["dim"] == TOY.dim and cfg["in_dim"] == TOY.in_channels
    from safetensors import safe_open
    with safe_open(str(tmp_path / "wan" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for key in ["patch_embedding.weight", "text_embedding.0.weight", "time_projection.1.bias",
                "head.modulation", "head.head.weight", "blocks.1.modulation", "blocks.0.self_attn.norm_q.weight",
                "blocks.0.norm3.weight", "blocks.0.cross_attn.o.bias", "blocks.1.ffn.2.weight"]:
        assert key in keys


def test_key_mapping_hand_checked():
    pairs = {
        "blocks.3.self_attn.o.weight": "blocks.3.attn1.to_out.0.weight",
        "blocks.0.cross_attn.norm_k.weight": "blocks.0.attn2.norm_k.weight",
        "blocks.12.norm3.bias": "blocks.12.norm2.bias",
        "blocks.2.ffn.0.bias": "blocks.2.ffn.net.0.proj.bias",
        "blocks.2.modulation": "blocks.2.scale_shift_table",
        "head.modulation": "scale_shift_table",
        "head.head.weight": "proj_out.weight",
        "time_projection.1.weight": "condition_embedder.time_proj.weight",
        "text_embedding.2.bias": "condition_embedder.text_embedder.linear_2.bias",
        "patch_embedding.weight": "patch_embedding.weight",
    }
    for wan, diff in pairs.items():
        assert wan_to_diffusers(wan) == diff
        assert diffusers_to_wan(diff) == wan


def test_sharded_checkpoint_loads(tmp_path):
    model = toy()
    model.save_pretrained(tmp_path / "sharded", max_shard_bytes=200_000)
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(files) > 1 and (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert torch.equal(outputs(CausalDiT.from_pretrained(tmp_path / "sharded")), outputs(model))


def test_loads_in_target_dtype_and_runs(tmp_path):
    ref = toy()
    ref.save_pretrained(tmp_path / "ckpt")
    model = CausalDiT.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert not any(p.is_meta for p in model.parameters())
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    # the timestep path and the modulation tables stay fp32 (as diffusers keeps them)
    assert dtypes["time_embedding.0.weight"] == dtypes["blocks.0.modulation"] == torch.float32
    assert dtypes["head.modulation"] == dtypes["time_projection.1.bias"] == torch.float32
    assert dtypes["blocks.0.self_attn.q.weight"] == dtypes["blocks.1.norm3.weight"] == torch.bfloat16
    expect = outputs(ref)
    got = outputs(model)
    assert got.dtype == torch.float32  # output follows the input's dtype
    assert ((got - expect).abs().max() / expect.abs().max()).item() < 5e-2
    # streaming in bf16: the cache takes the model's dtype
    cache = model.new_cache(1, 4, 6, chunk_frames=2, window_frames=4)
    model.set_prompt(cache, torch.randn(1, 5, 32))
    with torch.no_grad():
        out = model(torch.randn(1, TOY.in_channels, 2, 4, 6), torch.zeros(1), cache=cache, commit=True)
    assert cache.k[0].dtype == torch.bfloat16 and torch.isfinite(out).all()
    # set_dtype follows the same rule for a model built in memory
    cast = toy().set_dtype(torch.float16)
    assert cast.blocks[0].modulation.dtype == torch.float32 and cast.dtype == torch.float16


def test_preset_parameter_counts():
    with torch.device("meta"):
        small = CausalDiT(DiTConfig.preset("wan2.1-t2v-1.3b"))
        big = CausalDiT(DiTConfig.preset("wan2.1-t2v-14b"))
    assert sum(p.numel() for p in small.parameters()) == 1_418_996_800
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
            out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads")
    ours = {wan_to_diffusers(k): tuple(v.shape) for k, v in big.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours == theirs
    assert sum(p.numel() for p in big.parameters()) == sum(p.numel() for p in ref.parameters())


def test_checkpoint_of_another_size_names_the_keys(tmp_path):
    toy().save_pretrained(tmp_path / "ckpt")
    other = DiTConfig.preset("toy", dim=32, num_heads=1)
    with pytest.raises(CheckpointError, match=rf"shape conflicts .*to_q.weight: checkpoint \({TOY.dim}, {TOY.dim}\) "
                                              r"vs model \(32, 32\)"):
        CausalDiT.from_pretrained(tmp_path / "ckpt", config=other)
    more = DiTConfig.preset("toy", num_layers=TOY.num_layers + 1)
    with pytest.raises(CheckpointError, match=rf"missing keys .*blocks\.{TOY.num_layers}\."):
        CausalDiT.from_pretrained(tmp_path / "ckpt", config=more)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        CausalDiT.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        CausalDiT.from_pretrained(tmp_path / "empty")
    toy().save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        CausalDiT.from_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        CausalDiT.from_pretrained(tmp_path / "ckpt")


def test_save_replaces_atomically(tmp_path):
    a, b = toy(seed=0), toy(seed=1)
    a.save_pretrained(tmp_path / "ckpt")
    b.save_pretrained(tmp_path / "ckpt")
    assert torch.equal(outputs(CausalDiT.from_pretrained(tmp_path / "ckpt")), outputs(b))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dirs left behind


def test_loading_builds_on_meta_without_torch_symbolic_machinery(toy_dit):
    """from_pretrained builds the model on the meta device; drawing random numbers there runs
    torch's Python references, which import sympy and the compiler (seconds at every start).
    In a fresh process: load, and check neither was imported."""
    import subprocess
    import sys
    code = ("import sys; from forcelab.models import CausalDiT; CausalDiT.from_pretrained(sys.argv[1]); "
            "print(sorted(m for m in ('sympy', 'torch._dynamo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(toy_dit)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_modulation_init_is_randn_over_root_dim():
    """The tables are drawn as randn / sqrt(dim), what earlier versions drew, bit for bit (seeded
    models, and the runs trained from them, stay as they were); nothing is drawn on meta."""
    from forcelab.models.dit import init_modulation
    dim = DiTConfig.preset("toy").dim
    torch.manual_seed(0)
    got = init_modulation(6, dim)
    torch.manual_seed(0)
    assert torch.equal(got, torch.randn(1, 6, dim) / dim ** 0.5)
    with torch.device("meta"):
        assert init_modulation(6, dim).is_meta
