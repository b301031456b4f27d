"""Tokenizer training (byte-level BPE, BPE, Unigram), loading, chat templates."""
from lmforge.tokenizer.tokenizer import Tokenizer, load_tokenizer
from lmforge.tokenizer.train import compression_report, train_tokenizer

__all__ = ["Tokenizer", "load_tokenizer", "train_tokenizer", "compression_report"]
