"""GGUF export: Q8_0/Q4_0 blocks byte-identical to gguf-py's reference quantiser, Q4_K blocks that
gguf-py's dequantiser reads back as encoded (with less error than Q4_0/Q4_1 at the same size), a
file that gguf.GGUFReader reads back with the tokenizer and chat template, and greedy output that
matches the original model in lmforge and in transformers' GGUF loader."""
import numpy as np
import pytest
import torch

from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as reference_dequantize
from gguf.quants import quantize as reference_quantize

from lmforge.cli import run
from lmforge.gguf_file import gguf_field
from lmforge.model import load, save
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.quant import gguf_blocks
from lmforge.quant.gguf_blocks import q4_k_fields, quantize_q4_0, quantize_q4_k, quantize_q8_0
from lmforge.quant.gguf_export import export_gguf
from tests.serve.helpers import tiny_model


def awkward_matrix(seed=0):
    """Random rows plus blocks that stress the rounding rules: zeros, exact halves, ties for the max."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((64, 256)) * rng.lognormal(0, 2, (64, 1))).astype(np.float32)
    x[0, :32] = 0                                         # d = 0
    x[1, :32] = np.arange(32, dtype=np.float32) - 16      # max magnitude at both ends
    x[2, :32] = 0.5 * np.arange(-16, 16)                  # halves
    x[3, :32] = 1e-30                                     # tiny
    x[4, 32:64] = -x[4, 32:64]
    x[5, :32] = np.r_[127.0, np.arange(31) - 15.5]        # d = 1: exact halves, rounded away from zero
    return x


@pytest.mark.parametrize("ours,qtype", [(quantize_q8_0, GGMLQuantizationType.Q8_0),
                                         (quantize_q4_0, GGMLQuantizationType.Q4_0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_blocks_are_byte_identical_to_gguf_py(ours, qtype, seed):
    x = awkward_matrix(seed)
    expected = reference_quantize(x, qtype)
    got = ours(x)
    assert got.dtype == np.uint8 and got.shape == expected.shape
    assert got.tobytes() == expected.tobytes()


@pytest.mark.parametrize("seed", [0, 1])
def test_q4_k_blocks_read_back_as_encoded(seed):
    x = awkward_matrix(seed)
    blocks = quantize_q4_k(x)
    assert blocks.dtype == np.uint8 and blocks.shape == (64, 144)
    f = q4_k_fields(x)
    assert int(f["q"].max()) <= 15 and int(f["sc"].max()) <= 63 and int(f["m"].max()) <= 63
    meant = (f["d"][:, None, None] * f["sc"][..., None].float() * f["q"].float()
             - f["dmin"][:, None, None] * f["m"][..., None].float()).reshape(x.shape).numpy()
    back = reference_dequantize(blocks, GGMLQuantizationType.Q4_K).reshape(x.shape)
    assert np.array_equal(back, meant)
    assert np.array_equal(back[0, :32], np.zeros(32, np.float32))     # an all-zero sub-block stays zero


def test_q4_k_has_less_error_than_q4_0_and_q4_1_and_its_search_pays(monkeypatch):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((64, 512)) * rng.lognormal(0, 1, (64, 1))).astype(np.float32)
    err = lambda w: float(np.sqrt(((w.reshape(x.shape) - x) ** 2).mean() / (x ** 2).mean()))  # noqa: E731
    q4_k = err(reference_dequantize(quantize_q4_k(x), GGMLQuantizationType.Q4_K))
    q4_0 = err(reference_dequantize(quantize_q4_0(x), GGMLQuantizationType.Q4_0))
    q4_1 = err(reference_dequantize(reference_quantize(x, GGMLQuantizationType.Q4_1), GGMLQuantizationType.Q4_1))
    monkeypatch.setattr(gguf_blocks, "_FIT_STEPS", -1)   # the min-max grid alone, no search
    min_max = err(reference_dequantize(quantize_q4_k(x), GGMLQuantizationType.Q4_K))
    assert q4_k < 0.95 * min_max and q4_k < 0.95 * q4_1 and q4_k < 0.9 * q4_0, (q4_k, min_max, q4_1, q4_0)


@pytest.fixture(scope="module")
def small_tok():
    """A 400-token byte-level BPE (SmolLM2's 49k-token table takes a minute to parse in gguf-py and
    transformers on a loaded 2-core machine; the export code path is the same)."""
    from lmforge.tokenizer import train_tokenizer
    text = "def add(a, b):\n    return a + b  # 1234\nHello there, general Kenobi!\n" * 50
    return train_tokenizer([text], vocab_size=400, min_frequency=1)


def small_model(vocab, seed=11, f16_exact=False):
    model = tiny_model(vocab, seed=seed, max_seq_len=128)
    if f16_exact:   # weights that are float16 values: an F16 export is then lossless
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.half().float())
    return model


def greedy(model, tok, ids, n=12):
    from lmforge.serve import EngineConfig, LLMEngine, SamplingParams
    out = LLMEngine(model, tok, EngineConfig(num_blocks=16)).generate([ids], SamplingParams(max_tokens=n, temperature=0))
    return out[0]["token_ids"]


def test_export_reads_back_in_gguf_reader_lmforge_and_transformers(tmp_path, small_tok):
    model = small_model(small_tok.vocab_size, f16_exact=True)
    path = export_gguf(model, small_tok, tmp_path / "tiny.gguf", "f16")
    reader = GGUFReader(str(path))
    assert gguf_field(reader, "general.architecture") == "llama"
    assert gguf_field(reader, "tokenizer.chat_template") == small_tok.chat_template
    assert len(gguf_field(reader, "tokenizer.ggml.tokens")) == small_tok.vocab_size
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_up.weight"] == GGMLQuantizationType.F16
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32

    back = load(path)
    tokens = torch.randint(0, small_tok.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(back(tokens), model(tokens), rtol=0, atol=0)
    from lmforge.tokenizer import load_tokenizer
    tok = load_tokenizer(path)
    text = "def add(a, b):\n    return a + b  # 1234 unseen words"
    assert tok.encode(text) == small_tok.encode(text)
    chat = [{"role": "user", "content": "Hello there"}]
    ids = small_tok.encode_chat(chat)
    assert tok.encode_chat(chat) == ids
    ours = greedy(model, small_tok, ids)
    assert greedy(back, tok, ids) == ours

    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert hf_tok(text)["input_ids"] == small_tok.encode(text)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert out[0, len(ids):].tolist() == ours


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_quantised_export_holds_our_blocks_and_loads(tmp_path, small_tok, kind):
    model = small_model(small_tok.vocab_size, seed=12)
    save(model, tmp_path / "m", tokenizer=small_tok)
    assert run(["export", "gguf", str(tmp_path / "m"), "--type", kind, "-o", str(tmp_path / "m.gguf")]) == 0
    reader = GGUFReader(str(tmp_path / "m.gguf"))
    qtype = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}[kind]
    tensor = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    assert tensor.tensor_type == qtype
    original = model.layers[1].mlp.down_proj.weight.detach()
    expected = reference_quantize(original.numpy(), qtype)
    assert np.asarray(tensor.data).tobytes() == expected.tobytes()
    w = load(tmp_path / "m.gguf").layers[1].mlp.down_proj.weight.detach()
    assert torch.equal(w, torch.from_numpy(reference_dequantize(expected, qtype)))
    # Q8_0: half a step (+ float16 rounding of d); Q4_0: a whole step where the clamp at 15 cuts
    # the side opposite the largest value (its grid is -8..7 steps of max/8)
    step = {"q8_0": 0.6 / 127, "q4_0": 1.05 / 8}[kind]
    blocks_max = original.abs().view(original.shape[0], -1, 32).amax(-1, keepdim=True)
    assert ((w - original).abs().view(blocks_max.shape[:2] + (32,)) <= step * blocks_max).all()


def test_export_refuses_bad_requests(tmp_path, small_tok):
    save(small_model(small_tok.vocab_size), tmp_path / "m", tokenizer=small_tok)
    assert run(["export", "gguf", str(tmp_path / "m"), "--type", "q5_k", "-o", str(tmp_path / "x.gguf")]) == 2
    assert run(["export", "gguf", str(tmp_path / "m"), "-o", str(tmp_path / "x.bin")]) == 2
    assert run(["export", "gguf", str(tmp_path / "m"), "-o", str(tmp_path / "no" / "x.gguf")]) == 2
    assert not list(tmp_path.glob("*.gguf"))


def test_q4_k_export_loads_in_lmforge_and_transformers(tmp_path, small_tok):
    torch.manual_seed(5)   # every matrix a whole number of 256-value super-blocks per row
    cfg = ModelConfig(vocab_size=small_tok.vocab_size, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=512,
                      max_seq_len=128, tie_embeddings=True)
    model = Transformer(cfg).eval()
    save(model, tmp_path / "m", tokenizer=small_tok)
    assert run(["export", "gguf", str(tmp_path / "m"), "--type", "q4_k", "-o", str(tmp_path / "m.gguf")]) == 0
    reader = GGUFReader(str(tmp_path / "m.gguf"))
    matrices = {t.name: t for t in reader.tensors if len(t.shape) == 2}
    assert {t.tensor_type for t in matrices.values()} == {GGMLQuantizationType.Q4_K}
    down = matrices["blk.1.ffn_down.weight"]
    original = model.layers[1].mlp.down_proj.weight.detach()
    assert np.asarray(down.data).tobytes() == quantize_q4_k(original.numpy()).tobytes()
    back = load(tmp_path / "m.gguf")
    torch.testing.assert_close(back.layers[1].mlp.down_proj.weight.detach(), torch.from_numpy(
        reference_dequantize(np.asarray(down.data), GGMLQuantizationType.Q4_K).reshape(original.shape)), rtol=0, atol=0)
    ids = small_tok.encode_chat([{"role": "user", "content": "Hello there"}])
    ours = greedy(back, small_tok, ids)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert out[0, len(ids):].tolist() == ours
