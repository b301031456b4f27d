"""Preference data for DPO and reward models: (prompt, chosen, rejected) text triples, either the
default pairs generated from the stdlib (a function's signature + docstring -> its real body vs a
corrupted body) or a user's JSONL, tokenised with the prompt/completion boundary kept exact.

The prompt and each completion are tokenised separately and concatenated, so no BPE merge crosses
the boundary: the prompt tokens are the same for the chosen and the rejected sequence and are
exactly what the model sees before it writes a completion. Each completion ends with EOS (when the
tokenizer has one), which is part of what is scored.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.align.data import PROMPT, function_pairs, tokenize_chat
from lmforge.corpus.stdlib import stdlib_documents
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from lmforge.train.epoch_loader import EpochLoader, jsonl_rows
from lmforge.train.examples import IGNORE


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class PairExample:
    """Token ids of the prompt and of each completion (EOS included)."""
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


# --- default data: real vs corrupted stdlib bodies ------------------------------------------------
OPERATOR_SWAPS = [("==", "!="), ("!=", "=="), ("<=", ">"), (">=", "<"), (" < ", " >= "), (" > ", " <= "),
                  (" + ", " - "), (" - ", " + "), (" and ", " or "), (" or ", " and "), ("True", "False"),
                  ("False", "True"), (" is not ", " is "), (" not in ", " in ")]


def _change_operator(lines: list[str], rng: random.Random) -> list[str] | None:
    spots = [(i, a, b) for i, line in enumerate(lines) for a, b in OPERATOR_SWAPS if a in line]
    if not spots:
        return None
    i, a, b = rng.choice(spots)
    return lines[:i] + [lines[i].replace(a, b, 1)] + lines[i + 1:]


def _delete_statement(lines: list[str], rng: random.Random) -> list[str] | None:
    # a single-line statement that does not open a block (deleting it keeps the indentation valid-looking)
    spots = [i for i, line in enumerate(lines) if line.strip() and not line.rstrip().endswith((":", "(", "[", "{", ","))]
    if len(spots) < 2:
        return None
    i = rng.choice(spots)
    return lines[:i] + lines[i + 1:]


def _swap_statements(lines: list[str], rng: random.Random) -> list[str] | None:
    def indent(s):
        return len(s) - len(s.lstrip())
    spots = [i for i in range(len(lines) - 1) if lines[i].strip() and lines[i + 1].strip()
             and indent(lines[i]) == indent(lines[i + 1]) and lines[i].strip() != lines[i + 1].strip()]
    if not spots:
        return None
    i = rng.choice(spots)
    return lines[:i] + [lines[i + 1], lines[i]] + lines[i + 2:]


CORRUPTIONS = (_change_operator, _delete_statement, _swap_statements)


def corrupt_body(body: str, rng: random.Random) -> str | None:
    """A plausible wrong body: an operator changed, a statement deleted, or two statements swapped
    (tried in a random order); None when none applies."""
    lines = body.split("\n")
    for corruption in rng.sample(CORRUPTIONS, len(CORRUPTIONS)):
        changed = corruption(lines, rng)
        if changed is not None and "\n".join(changed) != body:
            return "\n".join(changed)
    return None


def stdlib_pairs(split: str, seed: int = 0) -> Iterator[PreferencePair]:
    """The default preference data: `function_pairs_of` the stdlib files of the corpus's split."""
    return function_pairs_of(stdlib_documents(split), seed)


def function_pairs_of(documents, seed: int = 0) -> Iterator[PreferencePair]:
    """Per function in the documents: prompt = the SFT prompt + signature + docstring, chosen = the
    real body, rejected = a corrupted body. The same seed gives the same pairs (each function's
    corruption is seeded by the seed and its position)."""
    n = 0
    for doc in documents:
        for header, body in function_pairs(doc.text):
            rejected = corrupt_body(body, random.Random(f"{seed}:{n}"))
            n += 1
            if rejected is not None:
                yield PreferencePair(PROMPT + header + "\n", body, rejected)


# --- users' JSONL ------------------------------------------------------------------------------------
def read_preference_jsonl(path: str | Path) -> list[PreferencePair]:
    """Pairs from a JSONL file, one {"prompt", "chosen", "rejected"} (strings) per line."""
    pairs = []
    for n, row in jsonl_rows(path, "preference data"):
        if not isinstance(row, dict):
            raise LmforgeError(f"{path}:{n}: each line must be an object with prompt, chosen and rejected")
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(row.get(key), str):
                raise LmforgeError(f"{path}:{n}: `{key}` must be a string")
        if not row["chosen"] or not row["rejected"]:
            raise LmforgeError(f"{path}:{n}: `chosen` and `rejected` must be non-empty")
        pairs.append(PreferencePair(row["prompt"], row["chosen"], row["rejected"]))
    if not pairs:
        raise LmforgeError(f"{path}: no preference pairs")
    return pairs


# --- tokenisation and batches ----------------------------------------------------------------------
def tokenize_pair(tok: Tokenizer, pair: PreferencePair) -> PairExample:
    """Prompt and completions tokenised separately (untrusted text: special-token strings stay
    text); each completion gets EOS."""
    eos = [tok.eos_id] if tok.eos_id is not None else []
    return PairExample(tok.encode_text(pair.prompt), tok.encode_text(pair.chosen) + eos,
                       tok.encode_text(pair.rejected) + eos)


def tokenize_chat_pair(tok: Tokenizer, pair: PreferencePair) -> PairExample:
    """The pair as a chat: the prompt is the user's turn, tokenised exactly as the model sees it at
    inference (`encode_chat(..., add_generation_prompt=True)`), and each completion is the assistant's
    reply with its end-of-turn token: the tokens SFT trains (`tokenize_chat`'s assistant mask)."""
    parts = []
    for completion in (pair.chosen, pair.rejected):
        ids, trained = tokenize_chat(tok, [{"role": "user", "content": pair.prompt},
                                           {"role": "assistant", "content": completion}])
        first, end = trained.index(True), len(trained) - trained[::-1].index(True)
        parts.append((ids[:first], ids[first:end]))
    (prompt, chosen), (_, rejected) = parts
    return PairExample(prompt, chosen, rejected)


def build_pair_examples(tok: Tokenizer, pairs, max_len: int, limit: int,
                        chat: bool = False) -> tuple[list[PairExample], int]:
    """The first `limit` pairs whose both sequences fit max_len tokens; -> (examples, n too long).
    chat=True formats them with the tokenizer's chat template (`tokenize_chat_pair`)."""
    kept, too_long = [], 0
    for pair in pairs:
        ex = tokenize_chat_pair(tok, pair) if chat else tokenize_pair(tok, pair)
        if len(ex.prompt) + max(len(ex.chosen), len(ex.rejected)) > max_len or not ex.chosen or not ex.rejected:
            too_long += 1
            continue
        kept.append(ex)
        if len(kept) >= limit:
            break
    return kept, too_long


def sequences(examples: list[PairExample]) -> list[tuple[list[int], int]]:
    """(prompt + completion ids, prompt length) per row: all the chosen rows, then all the rejected."""
    return ([(e.prompt + e.chosen, len(e.prompt)) for e in examples]
            + [(e.prompt + e.rejected, len(e.prompt)) for e in examples])


def collate_pairs(examples: list[PairExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows 0..B-1 the chosen sequences, B..2B-1 the rejected, right-padded:
    tokens [2B, T] (each sequence but its last token), targets [2B, T] (the next token where it
    belongs to the completion, else -100), attention_mask [2B, T], and also full [2B, T+1] with
    lengths [2B] (the whole sequences, for a reward head on the last real token)."""
    rows = sequences(examples)
    width = max(len(ids) for ids, _ in rows)
    full = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width - 1), IGNORE, dtype=torch.long)
    lengths = torch.tensor([len(ids) for ids, _ in rows])
    for r, (ids, n_prompt) in enumerate(rows):
        full[r, :len(ids)] = torch.tensor(ids)
        first = max(n_prompt, 1)  # with an empty prompt the first token has nothing to be predicted from
        targets[r, first - 1:len(ids) - 1] = torch.tensor(ids[first:])
    positions = torch.arange(width)
    full_mask = (positions[None, :] < lengths[:, None]).long()
    return {"tokens": full[:, :-1], "targets": targets, "attention_mask": full_mask[:, :-1],
            "full": full, "full_mask": full_mask, "lengths": lengths}


class PairLoader(EpochLoader):
    """Micro-batches of pairs (see `collate_pairs`). Each batch carries `index` [B], the pairs'
    positions in the example list (to look up cached reference log-probs)."""

    what = "preference pairs"

    def next_batch(self) -> dict[str, torch.Tensor]:
        index = self.next_indices()
        batch = collate_pairs([self.examples[i] for i in index], self.pad_id)
        batch["index"] = torch.tensor(index)
        return batch


def completion_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probs of each row's completion [2B] via the model's chunked token_logprobs."""
    logp = model.token_logprobs(batch["tokens"], batch["targets"], attention_mask=batch["attention_mask"])
    return logp.sum(-1)

