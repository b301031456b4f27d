"""Llama-family model: config and presets, the transformer, KV cache, load/save, model + tokenizer."""
from lmforge.model.config import PRESETS, ModelConfig, preset
from lmforge.model.io import load, save, save_hf
from lmforge.model.kv_cache import KVCache
from lmforge.model.logprobs import token_logprobs
from lmforge.model.packing import doc_ids_from_lengths
from lmforge.model.pretrained import Pretrained, load_pretrained
from lmforge.model.transformer import Transformer, lm_loss

__all__ = ["PRESETS", "ModelConfig", "preset", "load", "save", "save_hf", "KVCache", "Transformer", "lm_loss",
           "Pretrained", "load_pretrained", "token_logprobs", "doc_ids_from_lengths"]
