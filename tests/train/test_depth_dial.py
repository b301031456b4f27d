"""The depth dial: one number sets the model's shape, the learning rate and the token budget;
anything the user writes beside it still wins."""
import pytest

from lmforge.config import load_recipe
from lmforge.errors import LmforgeError
from lmforge.model.config import PRESETS, preset
from lmforge.speedrun import SpeedrunRecipe
from lmforge.train.config import TrainRecipe

SHAPE = ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim")


def test_depth_4_is_the_tiny_preset():
    cfg = load_recipe(TrainRecipe, None, ["model.depth=4"]).model_config()
    assert {k: getattr(cfg, k) for k in SHAPE} == {k: PRESETS["tiny"][k] for k in SHAPE}


@pytest.mark.parametrize("depth", [2, 5, 6, 12])
def test_depth_sets_width_heads_and_kv_heads(depth):
    cfg = load_recipe(TrainRecipe, None, [f"model.depth={depth}"]).model_config()
    assert (cfg.n_layers, cfg.dim, cfg.head_dim, cfg.n_heads // cfg.n_kv_heads) == (depth, 64 * depth, 64,
                                                                                      1 if depth % 2 else 2)


def test_depth_derives_lr_and_token_budget_unless_given():
    deep = load_recipe(TrainRecipe, None, ["model.depth=16", "train.global_batch_tokens=16384"])
    params = deep.model_config().num_params()
    assert deep.train.max_steps == round(20 * params / 16384)
    assert deep.train.lr == pytest.approx(3e-3 / 2)  # width 1024 = 4 x 256 -> lr / sqrt(4)
    assert load_recipe(TrainRecipe, None, ["model.depth=4"]).train.lr == pytest.approx(3e-3)
    given = load_recipe(TrainRecipe, None, ["model.depth=16", "train.lr=0.01", "train.max_steps=7"])
    assert (given.train.lr, given.train.max_steps) == (0.01, 7)
    # beside the dial, an explicit shape field wins, and the preset keeps the rest
    wide = load_recipe(TrainRecipe, None, ["model.depth=8", "model.dim=768"]).model_config()
    assert (wide.n_layers, wide.dim, wide.head_dim, wide.vocab_size) == (8, 768, 96, preset("tiny").vocab_size)


def test_speedrun_recipe_has_the_dial_too():
    run = load_recipe(SpeedrunRecipe, None, ["model.depth=6", "train.max_steps=10"])
    assert run.train.lr == pytest.approx(3e-3 * (256 / 384) ** 0.5) and run.train.max_steps == 10


def test_bad_depth_is_refused():
    with pytest.raises(LmforgeError, match="model.depth"):
        load_recipe(TrainRecipe, None, ["model.depth=0"])
