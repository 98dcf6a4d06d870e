"""Bad input to the DiT gets an error that names the problem."""

import pytest
import torch

from forcelab.errors import ConfigError, ForcelabError
from forcelab.models import CausalDiT, DiTConfig

C = DiTConfig.preset("toy").in_channels


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CausalDiT(DiTConfig.preset("toy", num_layers=1)).eval()


def test_wrong_shapes(model):
    ctx = torch.randn(1, 4, 32)
    with pytest.raises(ForcelabError, match=rf"x must be \[B, {C}, F, H, W\]"):
        model(torch.randn(1, C + 1, 2, 4, 4), torch.zeros(1), ctx)
    with pytest.raises(ForcelabError, match="multiples of the patch size"):
        model(torch.randn(1, C, 2, 5, 4), torch.zeros(1), ctx)
    with pytest.raises(ForcelabError, match="timestep must be"):
        model(torch.randn(1, C, 2, 4, 4), torch.zeros(1, 3), ctx)
    with pytest.raises(ForcelabError, match=r"context must be \[B, L, 32\]"):
        model(torch.randn(1, C, 2, 4, 4), torch.zeros(1), torch.randn(1, 4, 8))
    with pytest.raises(ForcelabError, match="more than text_len=16"):
        model(torch.randn(1, C, 2, 4, 4), torch.zeros(1), torch.randn(1, 17, 32))


def test_cache_misuse(model):
    with pytest.raises(ForcelabError, match="needs max_frames"):
        model.new_cache(1, 4, 4, window_frames=None)
    with pytest.raises(ForcelabError, match="at least chunk_frames"):
        model.new_cache(1, 4, 4, chunk_frames=4, window_frames=2)
    cache = model.new_cache(1, 4, 4, window_frames=4)
    with pytest.raises(ForcelabError, match="no prompt"):
        model(torch.randn(1, C, 2, 4, 4), torch.zeros(1), cache=cache)
    model.set_prompt(cache, torch.randn(1, 4, 32))
    with pytest.raises(ForcelabError, match="tokens per frame"):
        model(torch.randn(1, C, 2, 8, 8), torch.zeros(1), cache=cache)
    full = model.new_cache(1, 4, 4, window_frames=None, max_frames=4)
    model.set_prompt(full, torch.randn(1, 4, 32))
    with torch.no_grad():
        model(torch.randn(1, C, 4, 4, 4), torch.zeros(1), cache=full, commit=True)
        with pytest.raises(ForcelabError, match="full at frame 4"):
            model(torch.randn(1, C, 2, 4, 4), torch.zeros(1), cache=full, commit=True)


def test_bad_config():
    with pytest.raises(ConfigError, match="unknown DiT preset"):
        DiTConfig.preset("wan2.2")
    with pytest.raises(ConfigError, match="divisible by num_heads"):
        DiTConfig(dim=100, num_heads=3)
    with pytest.raises(ConfigError, match="sink_rope"):
        DiTConfig(sink_rope="sideways")
