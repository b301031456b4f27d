"""Per-step token masks: which tokens keep a DFA over bytes alive, walked over every token's bytes.

The vocabulary's byte strings are held column by column, sorted longest first, so the mask of
a DFA state is computed for all tokens at once: step j advances the tokens longer than j (a prefix
of the sorted rows) by one byte through the transition table. Masks are cached per state, so a
state seen again (the common case: string bodies, digits, separators) costs one dictionary look-up.
Special tokens are never text: only the stop tokens are allowed, and only where the DFA accepts.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from lmforge.serve.grammar.regex import DFA

MASK_CACHE = 1024    # masks kept per grammar (one bool per vocabulary entry each)


class TokenTable:
    """A tokenizer's token byte strings as a matrix, longest first, plus its stop tokens."""

    def __init__(self, token_bytes: list[bytes], special_ids: set[int], stop_ids: set[int], vocab_size: int):
        self.vocab_size = vocab_size
        self.token_bytes = token_bytes
        self.stop_ids = sorted(i for i in stop_ids if i < vocab_size)
        lengths = np.array([0 if i in special_ids else len(b) for i, b in enumerate(token_bytes)], dtype=np.int64)
        self.order = np.argsort(-lengths, kind="stable")
        self.sorted_lengths = lengths[self.order]
        width = int(lengths.max(initial=1))
        # column-major: byte j of every token (longest first) is one contiguous row
        cols = np.zeros((width, len(token_bytes)), dtype=np.int64)
        for row, i in enumerate(self.order):
            if lengths[i]:
                cols[:len(token_bytes[i]), row] = np.frombuffer(token_bytes[i], dtype=np.uint8)
        self.columns = cols
        # how many tokens are longer than j, for each byte position j
        self.active = [int((self.sorted_lengths > j).sum()) for j in range(width)]
        self.num_text = int((self.sorted_lengths > 0).sum())

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int | None = None) -> TokenTable:
        cached = getattr(tokenizer, "_lmforge_token_table", None)
        vocab_size = vocab_size or tokenizer.vocab_size
        if cached is not None and cached.vocab_size == vocab_size:
            return cached
        specials = set(tokenizer.hf.get_added_tokens_decoder())
        table = tokenizer.token_bytes_table
        padded = list(table) + [b""] * max(0, vocab_size - len(table))  # model rows beyond the tokenizer
        out = cls(padded[:vocab_size], specials | set(range(len(table), vocab_size)), tokenizer.stop_ids(), vocab_size)
        tokenizer._lmforge_token_table = out
        return out


class TokenGrammar:
    """A compiled grammar for one tokenizer: DFA + token table + per-state mask cache."""

    def __init__(self, dfa: DFA, table: TokenTable):
        self.dfa, self.table = dfa, table
        self._dead = dfa.num_states                     # an absorbing dead row, so walks need no branches
        trans = np.where(dfa.transitions >= 0, dfa.transitions, self._dead)
        self._flat = np.vstack([trans, np.full((1, 256), self._dead, dtype=trans.dtype)]).astype(np.int64).ravel()
        self._live = np.append(np.ones(dfa.num_states, dtype=bool), False)
        self._masks: OrderedDict[int, torch.Tensor] = OrderedDict()

    def _compute(self, state: int) -> torch.Tensor:
        """Walk every token's bytes from `state` at once, dropping tokens as soon as they die
        (in most JSON states nearly all die on their first byte)."""
        t, dead = self.table, self._dead
        idx = np.arange(t.num_text)                    # rows of the sorted table still walking
        cur = np.full(t.num_text, state, dtype=np.int64)
        final = np.full(t.num_text, dead, dtype=np.int64)
        for j, n in enumerate(t.active):
            k = int(np.searchsorted(idx, n))           # rows >= n have no byte j: their walk is over
            final[idx[k:]] = cur[k:]
            idx, cur = idx[:k], cur[:k]
            if not k:
                break
            cur = self._flat[cur * 256 + t.columns[j, idx]]
            alive = cur != dead
            idx, cur = idx[alive], cur[alive]
        final[idx] = cur
        allowed = np.zeros(t.vocab_size, dtype=bool)
        allowed[t.order[:t.num_text]] = self._live[final]
        if self.dfa.accepting[state]:
            allowed[t.stop_ids] = True
        return torch.from_numpy(allowed)

    def mask(self, state: int) -> torch.Tensor:
        """Bool [vocab]: tokens allowed in DFA `state` (cached)."""
        m = self._masks.get(state)
        if m is None:
            m = self._masks[state] = self._compute(state)
            if len(self._masks) > MASK_CACHE:
                self._masks.popitem(last=False)
        else:
            self._masks.move_to_end(state)
        return m

    def matcher(self) -> Matcher:
        return Matcher(self)


class Matcher:
    """One sequence's position in its grammar, advanced by each chosen token."""

    def __init__(self, grammar: TokenGrammar):
        self.grammar = grammar
        self.state = 0
        self.finished = False       # a stop token was accepted

    def mask(self) -> torch.Tensor:
        return self.grammar.mask(self.state)

    def advance(self, token_id: int) -> None:
        g = self.grammar
        if token_id in g.table.stop_ids:
            if not g.dfa.accepting[self.state]:
                raise ValueError(f"stop token {token_id} where the grammar is not complete")
            self.finished = True
            return
        nxt = g.dfa.walk(self.state, g.table.token_bytes[token_id])
        if nxt < 0:
            raise ValueError(f"token {token_id} violates the grammar")
        self.state = nxt

    def accepts(self, token_ids: list[int]) -> bool:
        """Whether these tokens (from the current state) keep the grammar alive; the state is unchanged."""
        state = self.state
        try:
            for t in token_ids:
                self.advance(t)
            return True
        except ValueError:
            return False
        finally:
            self.state, self.finished = state, False
