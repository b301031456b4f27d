"""The serving tests' fixtures (SmolLM2 GGUF, its tokenizer, one torch thread), shared here."""
from tests.serve.conftest import one_torch_thread, smollm, smollm_path, smollm_tokenizer  # noqa: F401
