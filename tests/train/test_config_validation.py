"""Every recipe field with a value that cannot be honoured is refused with an LmforgeError naming
the field; in-range values (including the boundaries) load."""
import pytest

from lmforge.config import load_recipe
from lmforge.data.config import PipelineConfig
from lmforge.errors import LmforgeError
from lmforge.train.config import TrainRecipe

BAD_TRAIN = [
    ("train.grad_clip=-1", "train.grad_clip"),
    ("train.grad_clip=0", "train.grad_clip"),
    ("train.lr=-0.001", "train.lr"),
    ("train.min_lr_ratio=1.5", "train.min_lr_ratio"),
    ("train.min_lr_ratio=-0.1", "train.min_lr_ratio"),
    ("train.warmup=-0.1", "train.warmup"),
    ("train.warmup=1.0", "train.warmup"),
    ("train.decay=1.2", "train.decay"),
    ("train.weight_decay=-0.1", "train.weight_decay"),
    ("train.beta1=1.0", "train.beta1"),
    ("train.beta2=-0.5", "train.beta2"),
    ("train.micro_batch=0", "train.micro_batch"),
    ("train.global_batch_tokens=-256", "train.global_batch_tokens"),
    ("train.eval_tokens=0", "train.eval_tokens"),
    ("train.keep_last=0", "train.keep_last"),
    ("train.seed=-1", "train.seed"),
    ("train.peak_flops=-1", "train.peak_flops"),
    ("train.dtype=float16", "train.dtype"),
    ("train.dtype=fp32", "train.dtype"),
    ("train.device=gpu", "train.device"),
    ("train.schedule=linear", "train.schedule"),
    (["train.seq_len=512", "train.micro_batch=32"], "train.seq_len=512 exceeds model max_seq_len"),
    ("model.dimm=64", "dimm"),
    ("model.dim=wide", "model.dim"),
    ("model.n_layers=0", "n_layers"),
    ("model.rope_theta=-1", "rope_theta"),
    ("model.norm_eps=0", "norm_eps"),
    ("model.init_std=0", "init_std"),
    ("model.moe_aux_loss_coef=-1", "moe_aux_loss_coef"),
    ("model.rope_scaling={type: yarn, factor: 4}", "rope_scaling type 'yarn'"),
    ("model.rope_scaling={type: linear, factor: -2}", "rope_scaling.factor"),
    ("model.rope_scaling={rope_type: llama3, factor: 8, low_freq_factor: 4, high_freq_factor: 1}",
     "low_freq_factor"),
    ("model.preset=huge", "preset"),
]

GOOD_TRAIN = ["train.grad_clip=0.5", "train.lr=0", "train.min_lr_ratio=0", "train.min_lr_ratio=1", "train.warmup=0",
              "train.beta1=0", "train.weight_decay=0", "train.dtype=float32", "train.dtype=bfloat16",
              "train.device=cpu", "train.device=cuda:1", "train.seed=0", "model.rope_theta=500000",
              "model.rope_scaling={type: linear, factor: 2}",
              "model.rope_scaling={rope_type: llama3, factor: 8, original_max_position_embeddings: 128}"]

BAD_DATA = [
    ("engine.workers=-2", "engine.workers"),
    ("engine.engine=spark", "engine.engine"),
    ("engine.start_method=thread", "engine.start_method"),
    ("engine.batch_docs=0", "engine.batch_docs"),
    ("engine.zstd_level=40", "engine.zstd_level"),
    ("tokens.val_fraction=1.5", "tokens.val_fraction"),
    ("tokens.val_fraction=-0.1", "tokens.val_fraction"),
    ("tokens.shard_tokens=0", "tokens.shard_tokens"),
    ("read.on_bad_utf8=ignore", "read.on_bad_utf8"),
    ("read.max_file_bytes=0", "read.max_file_bytes"),
    ("normalize.max_blank_lines=-1", "normalize.max_blank_lines"),
    ("near.threshold=1.5", "near.threshold"),
    ("near.threshold=0", "near.threshold"),
    ("near.num_perm=0", "near.num_perm"),
    ("near.shingle_size=0", "near.shingle_size"),
    ("near.bands=-1", "near.bands"),
    ("near.bands=4", "near.bands and near.rows"),
    (["near.bands=64", "near.rows=4"], "near.bands * near.rows"),
    ("near.fp_weight=-1", "near.fp_weight"),
    ("near.backend=faiss", "near.backend"),
    ("quality.text.max_bullet_line_fraction=1.5", "quality.text.max_bullet_line_fraction"),
    ("quality.text.min_alpha_word_fraction=-0.2", "quality.text.min_alpha_word_fraction"),
    ("quality.text.max_symbol_word_ratio=2", "quality.text.max_symbol_word_ratio"),
    ("quality.text.max_top_ngram_char_fraction={2: 1.5}", "quality.text.max_top_ngram_char_fraction"),
    ("quality.text.min_words=-5", "quality.text.min_words"),
    (["quality.text.min_words=500", "quality.text.max_words=100"], "quality.text.min_words"),
    ("quality.code.min_alnum_fraction=3", "quality.code.min_alnum_fraction"),
    ("quality.code.max_line_length=-1", "quality.code.max_line_length"),
    ("pii.types=[email, ssn]", "pii.types"),
    ("pii.secret_min_entropy=-1", "pii.secret_min_entropy"),
    ("toxicity.threshold=2", "toxicity.threshold"),
    ("toxicity.batch_size=0", "toxicity.batch_size"),
    ("decontam.ngram=0", "decontam.ngram"),
    ("mixing.domain=language", "mixing.domain"),
    ("mixing.weights={web: -1}", "mixing.weights.web"),
    ("mixing.default_weight=-0.5", "mixing.default_weight"),
    ("mixing.clusters=0", "mixing.clusters"),
]

GOOD_DATA = ["engine.workers=0", "engine.workers=3", "tokens.val_fraction=0", "near.threshold=0.5",
             ["near.bands=16", "near.rows=8"], "quality.text.max_bullet_line_fraction=1",
             "quality.text.max_top_ngram_char_fraction={2: 0.3}", "pii.types=[email]", "toxicity.threshold=0",
             "mixing.domain=meta:lang", "mixing.weights={web: 0, code: 2.5}", "engine.zstd_level=19"]


def as_list(overrides):
    return [overrides] if isinstance(overrides, str) else overrides


@pytest.mark.parametrize("override, field", BAD_TRAIN)
def test_bad_train_recipe_values_are_refused_naming_the_field(override, field):
    with pytest.raises(LmforgeError) as err:
        load_recipe(TrainRecipe, None, as_list(override))
    assert field in str(err.value), str(err.value)


@pytest.mark.parametrize("override", GOOD_TRAIN)
def test_good_train_recipe_values_load(override):
    recipe = load_recipe(TrainRecipe, None, [override])
    key, value = override.split("=", 1)
    section, name = key.split(".")
    assert getattr(getattr(recipe, section), name) is not None
    recipe.model_config()


@pytest.mark.parametrize("overrides, field", BAD_DATA)
def test_bad_data_recipe_values_are_refused_naming_the_field(overrides, field):
    with pytest.raises(LmforgeError) as err:
        load_recipe(PipelineConfig, None, as_list(overrides))
    assert field in str(err.value), str(err.value)


@pytest.mark.parametrize("overrides", GOOD_DATA)
def test_good_data_recipe_values_load(overrides):
    load_recipe(PipelineConfig, None, as_list(overrides))


def test_unknown_model_key_lists_the_valid_ones():
    with pytest.raises(LmforgeError, match=r"unknown key\(s\) \['dimm'\] in model; valid keys: .*n_layers"):
        load_recipe(TrainRecipe, None, ["model.dimm=64"])


def test_model_section_overrides_keep_the_preset():
    cfg = load_recipe(TrainRecipe, None, ["model.dim=64", "model.n_heads=4"]).model_config()
    assert (cfg.dim, cfg.n_heads, cfg.n_layers, cfg.vocab_size) == (64, 4, 4, 4096)  # rest from `tiny`


def test_non_utf8_recipe_is_a_clear_error(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes("train:\n  out: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(LmforgeError, match="not UTF-8"):
        load_recipe(TrainRecipe, path)
