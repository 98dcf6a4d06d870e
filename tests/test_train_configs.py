"""Every shipped recipe config loads against its recipe's strict schema."""

from pathlib import Path

import pytest

from forcelab.train.config import load_train_config
from forcelab.train.recipe import RECIPES

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
FILES = sorted(p for d in ("toy", "recipes") for p in (CONFIGS / d).glob("*.yaml"))


@pytest.mark.parametrize("path", FILES, ids=[f"{p.parent.name}/{p.name}" for p in FILES])
def test_config_loads(path):
    cfg = load_train_config([path])
    assert cfg.recipe in RECIPES
    if path.stem in RECIPES:
        assert cfg.recipe == path.stem        # a config named after a recipe runs that recipe


def test_every_recipe_has_a_toy_config():
    implemented = [name for name in RECIPES if (CONFIGS.parent / "train" / f"{name}.py").exists()
                   or (CONFIGS.parent / "distill" / f"{name}.py").exists()]
    missing = [n for n in implemented if not (CONFIGS / "toy" / f"{n}.yaml").exists()]
    assert not missing
