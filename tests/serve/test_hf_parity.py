"""Our engine's greedy output on SmolLM2-135M-Instruct (GGUF) equals transformers' greedy output.

transformers loads the same GGUF file with `gguf_file=`; both sides dequantise to float32 and
get the same prompt token ids, so any difference would come from the model, loader or engine."""
import pytest
import torch

from lmforge.serve import EngineConfig, LLMEngine, SamplingParams

transformers = pytest.importorskip("transformers")

QUESTIONS = ["Write a short story about a robot.", "List five tips for staying healthy.",
             "Explain how a rainbow forms."]
NEW_TOKENS = 32


@pytest.mark.slow
def test_greedy_matches_transformers(smollm_path, smollm, smollm_tokenizer):
    tok = smollm_tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS]
    prompts.append(tok.encode("def fibonacci(n):\n"))
    engine = LLMEngine(smollm, tok, EngineConfig(kv_cache_mb=64))
    ours = engine.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0))

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name,
                                                           dtype=torch.float32).eval()
    for prompt, result in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(prompt):].tolist()
        assert len(ref) == NEW_TOKENS and result["token_ids"] == ref, tok.decode(prompt)
        assert result["text"] == tok.decode(ref, skip_special=True)
