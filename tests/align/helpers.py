"""Small pieces the alignment tests share: the tiny model and the arithmetic tokenizer."""
import torch

from lmforge.align.tasks import arithmetic_tasks
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer.train import train_tokenizer


def arithmetic_tokenizer():
    texts = [f"{t.prompt} {t.answer}" for t in arithmetic_tasks(400, 0)]
    return train_tokenizer(texts, vocab_size=300, min_frequency=1)


def tiny(tok, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=48, n_layers=2, n_heads=4, n_kv_heads=2,
                                   hidden_dim=96, max_seq_len=64)).to(dtype)
