"""GGUF loading: a file written the way llama.cpp writes it (permuted q/k, quantised tensors)
loads back to the same logits; the real SmolLM2 file's config and tokenizer match transformers'."""
import numpy as np
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig, Transformer, load
from lmforge.model.gguf import unpermute_rope_rows
from lmforge.tokenizer import load_tokenizer
from lmforge.tokenizer.tokenizer import BYTE_TO_CHAR

gguf = pytest.importorskip("gguf")


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (interleaved rotary pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_gguf(model: Transformer, path, quant=None):
    cfg = model.cfg
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    # A byte-level vocabulary: the 256 byte symbols, one merge, and two control tokens.
    tokens = [BYTE_TO_CHAR[b] for b in range(256)] + ["he", "<|im_start|>", "<|im_end|>"]
    tokens += [f"<unused{i}>" for i in range(cfg.vocab_size - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(["h e"])
    w.add_token_types([1] * 257 + [3, 3] + [1] * (cfg.vocab_size - 259))
    w.add_eos_token_id(258)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        arr = p.detach().float().numpy()
        if name == "embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            _, i, rest = name.split(".", 2)
            gname = f"blk.{i}.{GGUF_NAMES[rest.removesuffix('.weight')]}.weight"
            if rest.startswith("self_attn.q_proj"):
                arr = llama_cpp_permute(arr, cfg.n_heads)
            elif rest.startswith("self_attn.k_proj"):
                arr = llama_cpp_permute(arr, cfg.n_kv_heads)
        if quant is not None and arr.ndim == 2:
            w.add_tensor(gname, gguf.quants.quantize(arr, quant), raw_dtype=quant)
        else:
            w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tie", [True, False])
def test_gguf_roundtrip_logits(tmp_path, tie):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=288, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
                      max_seq_len=64, rope_theta=5000.0, tie_embeddings=tie)
    ours = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    write_gguf(ours, tmp_path / "m.gguf")
    loaded = load(tmp_path / "m.gguf")
    assert loaded.cfg.tie_embeddings == tie and loaded.cfg.n_kv_heads == 2 and loaded.cfg.rope_theta == 5000.0
    tokens = torch.randint(0, 288, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), ours(tokens), atol=1e-5, rtol=0)


def test_gguf_quantised_tensors_dequantise(tmp_path):
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=288, dim=64, n_layers=1, n_heads=4, n_kv_heads=4, hidden_dim=128,
                      max_seq_len=64, tie_embeddings=True)
    ours = Transformer(cfg).eval()
    write_gguf(ours, tmp_path / "q8.gguf", quant=gguf.GGMLQuantizationType.Q8_0)
    loaded = load(tmp_path / "q8.gguf")
    for name, p in ours.state_dict().items():
        q = loaded.state_dict()[name]
        assert q.shape == p.shape
        # Q8_0: 8-bit blocks of 32 with one scale each -> error below half a step of the block max.
        assert (q - p).abs().max() <= p.abs().max() / 127 + 1e-6, name


def test_gguf_tokenizer_from_metadata(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=288, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_seq_len=32, tie_embeddings=True)
    write_gguf(Transformer(cfg), tmp_path / "t.gguf")
    tok = load_tokenizer(tmp_path / "t.gguf")
    ids = tok.encode("hello<|im_end|>")
    assert ids[0] == 256 and ids[-1] == 258     # the merge "h e" applies; the control token stays whole
    assert tok.decode(ids, skip_special=True) == "hello"
    assert tok.eos_id == 258 and 258 in tok.stop_ids()
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>x<|im_end|>"


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(8 * 6 * 3, dtype=np.float32).reshape(8 * 6, 3)
    np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(w, 6), 6), w)


def test_bad_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(LmforgeError):
        load(bad)
    with pytest.raises(LmforgeError):
        load_tokenizer(tmp_path / "missing.gguf")


def test_smollm2_config_and_tokenizer_match_transformers(smollm_path, smollm_tokenizer):
    transformers = pytest.importorskip("transformers")
    from lmforge.gguf_file import open_gguf
    from lmforge.model.gguf import gguf_config
    cfg = gguf_config(open_gguf(smollm_path))
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim) == (30, 576, 9, 3, 1536)
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0 and cfg.vocab_size == 49152
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)
    texts = ["Hello world, how are you?", "def f(x):\n    return x ** 2  # square\n",
             "The year 2024 had 366 days.", "naïve café 東京 🚀", "<|im_start|>user\nhi<|im_end|>\n"]
    for text in texts:
        assert smollm_tokenizer.encode(text) == hf_tok.encode(text, add_special_tokens=False), text
        assert smollm_tokenizer.decode(smollm_tokenizer.encode(text)) == text
    assert smollm_tokenizer.eos_token == "<|im_end|>" and smollm_tokenizer.bos_token == "<|im_start|>"
    chat = smollm_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_gguf_int4_blocks_are_kept_as_stored(tmp_path, kind):
    # --gguf-int4: each Q4_0/Q4_1 matrix becomes an Int4Linear whose values are the file's, to float
    # rounding (the reference: gguf's own dequantisation, which the default load uses)
    from lmforge.model.quantized import Int4Linear
    torch.manual_seed(2)
    cfg = ModelConfig(vocab_size=288, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                      max_seq_len=64, tie_embeddings=True)
    ours = Transformer(cfg).eval()
    with torch.no_grad():   # a constant block: Q4_1 stores d = 0 and the value in m
        ours.layers[0].mlp.up_proj.weight[3, 32:64] = 0.25
    write_gguf(ours, tmp_path / "q4.gguf", quant=getattr(gguf.GGMLQuantizationType, kind))
    dense, native = load(tmp_path / "q4.gguf"), load(tmp_path / "q4.gguf", gguf_int4=True)
    linears = [n for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("layers.")]
    assert len(linears) == 14 and set(native.quantization["layers"]) == set(linears)
    for name in linears:
        layer, weight = native.get_submodule(name), dense.get_submodule(name).weight
        assert isinstance(layer, Int4Linear) and layer.group_size == 32
        torch.testing.assert_close(layer.dequantized(), weight, atol=1e-6 * float(weight.detach().abs().max()), rtol=0)
    if kind == "Q4_1":
        assert float(native.layers[0].mlp.up_proj.dequantized()[3, 40]) == pytest.approx(0.25, abs=1e-3)
    tokens = torch.randint(0, 288, (1, 12))
    with torch.no_grad():   # the int4 kernel takes bfloat16 activations
        torch.testing.assert_close(native(tokens), dense(tokens), atol=3e-2, rtol=0)
    with pytest.raises(LmforgeError, match="needs a .gguf file"):
        load(tmp_path, gguf_int4=True)


def test_smollm2_q4_1_blocks_kept_as_stored(smollm_path, smollm):
    # The bundled file's 210 Q4_1 matrices (SmolLM2's whole decoder) as int4 layers, values as stored
    native = load(smollm_path, gguf_int4=True)
    layers = native.quantization["layers"]
    assert len(layers) == 210
    for name in layers:
        weight = smollm.get_submodule(name).weight.detach()
        torch.testing.assert_close(native.get_submodule(name).dequantized(), weight,
                                   atol=1e-6 * float(weight.abs().max()), rtol=0)
