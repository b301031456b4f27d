"""A small regular-expression compiler: pattern -> byte-level DFA.

Supported syntax: literals, escapes (\\d \\w \\s and their negations, \\n \\t \\r \\f \\v \\xHH
\\uHHHH, escaped punctuation), classes `[...]` with ranges and `^` negation, `.`, groups `(...)`
and `(?:...)`, alternation, and the quantifiers * + ? {n} {n,} {n,m} (lazy forms accepted; the
language is the same). Lookarounds, backreferences and anchors inside a pattern are refused.

Characters are Unicode code points; each character set is turned into the UTF-8 byte sequences
of its code points (the classic range-splitting construction), so the automaton runs over the
bytes that tokenizer tokens are made of. DFA states that cannot reach acceptance are removed, so
every state the matcher can be in can still finish.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmforge.errors import LmforgeError

MAX_CODE = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)
MAX_REPEAT = 1000
MAX_DFA_STATES = 20_000


class RegexError(LmforgeError):
    """A pattern this compiler does not support or cannot parse."""


# --- character sets (sorted, disjoint, inclusive code point ranges) --------------------------------
def _normalise(ranges) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def negate(ranges) -> tuple[tuple[int, int], ...]:
    out, start = [], 0
    for lo, hi in _normalise(ranges):
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    if start <= MAX_CODE:
        out.append((start, MAX_CODE))
    return subtract(out, [SURROGATES])


def subtract(ranges, removed) -> tuple[tuple[int, int], ...]:
    out = list(_normalise(ranges))
    for rlo, rhi in removed:
        nxt = []
        for lo, hi in out:
            if hi < rlo or lo > rhi:
                nxt.append((lo, hi))
                continue
            if lo < rlo:
                nxt.append((lo, rlo - 1))
            if hi > rhi:
                nxt.append((rhi + 1, hi))
        out = nxt
    return _normalise(out)


def intersect(a, b) -> tuple[tuple[int, int], ...]:
    return subtract(a, negate(b) + ((SURROGATES),))


DIGIT = ((48, 57),)
WORD = ((48, 57), (65, 90), (95, 95), (97, 122))
SPACE = ((9, 13), (32, 32))
ANY = negate([(10, 10)])  # `.`: anything but a newline


# --- AST --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Chars:
    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Cat:
    items: tuple


@dataclass(frozen=True)
class Alt:
    items: tuple


@dataclass(frozen=True)
class Repeat:
    item: object
    lo: int
    hi: int | None


EMPTY = Cat(())


def literal(text: str) -> Cat:
    return Cat(tuple(Chars(((ord(c), ord(c)),)) for c in text))


class _Parser:
    def __init__(self, pattern: str, restrict=None):
        self.p, self.i = pattern, 0
        self.restrict = restrict  # every character set is cut down to these ranges (e.g. JSON-safe)

    def error(self, message: str) -> RegexError:
        return RegexError(f"regex {self.p!r}: {message} (at position {self.i})")

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def take(self) -> str:
        c = self.p[self.i]
        self.i += 1
        return c

    def parse(self):
        node = self.alternation()
        if self.i != len(self.p):
            raise self.error("unbalanced ')'")
        return node

    def alternation(self):
        items = [self.sequence()]
        while self.peek() == "|":
            self.take()
            items.append(self.sequence())
        return items[0] if len(items) == 1 else Alt(tuple(items))

    def sequence(self):
        items = []
        while self.peek() not in (None, "|", ")"):
            items.append(self.quantified())
        return items[0] if len(items) == 1 else Cat(tuple(items))

    def quantified(self):
        node = self.atom()
        while self.peek() in ("*", "+", "?", "{"):
            c = self.peek()
            if c == "{":
                bounds = self.braces()
                if bounds is None:
                    break
                lo, hi = bounds
            else:
                self.take()
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
            if self.peek() == "?":  # lazy: same language
                self.take()
            if max(lo, hi or 0) > MAX_REPEAT:
                raise self.error(f"repetition counts above {MAX_REPEAT} are not supported")
            node = Repeat(node, lo, hi)
        return node

    def braces(self):
        j = self.p.find("}", self.i)
        body = self.p[self.i + 1:j] if j > 0 else ""
        lo, _, hi = body.partition(",")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            return None  # a literal '{'
        self.i = j + 1
        lo_n = int(lo)
        hi_n = int(hi) if hi else (None if "," in body else lo_n)
        if hi_n is not None and hi_n < lo_n:
            raise self.error("repetition {m,n} with n < m")
        return lo_n, hi_n

    def chars(self, ranges):
        if self.restrict is not None:
            ranges = intersect(ranges, self.restrict)
            if not ranges:
                raise self.error("it needs characters that must be escaped in a JSON string")
        return Chars(_normalise(ranges))

    def atom(self):
        c = self.take()
        if c == "(":
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.peek() == "?":
                raise self.error("lookarounds and named groups are not supported")
            node = self.alternation()
            if self.peek() != ")":
                raise self.error("missing ')'")
            self.take()
            return node
        if c == "[":
            return self.chars(self.char_class())
        if c == ".":
            return self.chars(ANY)
        if c == "\\":
            return self.chars(self.escape(in_class=False))
        if c in "^$":
            raise self.error("anchors are only supported at the very start and end")
        if c in "*+?":
            raise self.error("nothing to repeat")
        if c == ")":
            raise self.error("unbalanced ')'")
        return self.chars(((ord(c), ord(c)),))

    def escape(self, in_class: bool):
        if self.peek() is None:
            raise self.error("trailing backslash")
        c = self.take()
        classes = {"d": DIGIT, "w": WORD, "s": SPACE}
        if c in classes:
            return classes[c]
        if c.lower() in classes:
            return negate(classes[c.lower()])
        simple = {"n": 10, "t": 9, "r": 13, "f": 12, "v": 11, "0": 0}
        if c in simple:
            return ((simple[c], simple[c]),)
        if c in "xu":
            n = 2 if c == "x" else 4
            digits = self.p[self.i:self.i + n]
            if len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.error(f"bad \\{c} escape")
            self.i += n
            v = int(digits, 16)
            return ((v, v),)
        if c.isalnum():
            raise self.error(f"unsupported escape \\{c} (backreferences and \\b are not supported)")
        return ((ord(c), ord(c)),)

    def char_class(self):
        negated = self.peek() == "^"
        if negated:
            self.take()
        ranges, first = [], True
        while True:
            c = self.peek()
            if c is None:
                raise self.error("missing ']'")
            if c == "]" and not first:
                self.take()
                break
            first = False
            lo = self.class_atom()
            if self.peek() == "-" and self.p[self.i + 1:self.i + 2] not in ("]", ""):
                self.take()
                hi = self.class_atom()
                if len(lo) != 1 or len(hi) != 1 or lo[0][0] != lo[0][1] or hi[0][0] != hi[0][1] or hi[0][0] < lo[0][0]:
                    raise self.error("bad range in a character class")
                ranges.append((lo[0][0], hi[0][0]))
            else:
                ranges += list(lo)
        return negate(ranges) if negated else _normalise(ranges)

    def class_atom(self):
        c = self.take()
        if c == "\\":
            if self.peek() == "b":
                self.take()
                return ((8, 8),)
            return self.escape(in_class=True)
        return ((ord(c), ord(c)),)


def parse(pattern: str, restrict=None):
    """pattern -> AST; with `restrict`, every character set is cut down to those code points."""
    return _Parser(pattern, restrict).parse()


# --- code point ranges -> UTF-8 byte ranges ------------------------------------------------------
def _utf8_sequences(lo: int, hi: int) -> list[list[tuple[int, int]]]:
    """Byte-range sequences matching exactly the UTF-8 encodings of code points lo..hi."""
    for edge in (0x7F, 0x7FF, 0xFFFF):
        if lo <= edge < hi:
            return _utf8_sequences(lo, edge) + _utf8_sequences(edge + 1, hi)
    if hi <= 0x7F:
        return [[(lo, hi)]]
    n = len(chr(lo).encode("utf-8", "surrogatepass"))
    for i in range(1, n):
        m = (1 << (6 * i)) - 1
        if lo & ~m != hi & ~m:
            if lo & m:
                return _utf8_sequences(lo, lo | m) + _utf8_sequences((lo | m) + 1, hi)
            if hi & m != m:
                return _utf8_sequences(lo, (hi & ~m) - 1) + _utf8_sequences(hi & ~m, hi)
    a, b = chr(lo).encode("utf-8", "surrogatepass"), chr(hi).encode("utf-8", "surrogatepass")
    return [list(zip(a, b))]


# --- AST -> NFA (Thompson) ---------------------------------------------------------------------------
class _NFA:
    def __init__(self):
        self.eps: list[list[int]] = []
        self.edges: list[list[tuple[int, int]]] = []   # (byte mask as a 256-bit int, target)

    def state(self) -> int:
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1

    def build(self, node, start: int, end: int) -> None:
        if isinstance(node, Chars):
            for lo, hi in node.ranges:
                for seq in _utf8_sequences(lo, hi):
                    cur = start
                    for k, (a, b) in enumerate(seq):
                        nxt = end if k == len(seq) - 1 else self.state()
                        self.edges[cur].append((((1 << (b + 1)) - 1) ^ ((1 << a) - 1), nxt))
                        cur = nxt
        elif isinstance(node, Cat):
            cur = start
            for k, item in enumerate(node.items):
                nxt = end if k == len(node.items) - 1 else self.state()
                self.build(item, cur, nxt)
                cur = nxt
            if not node.items:
                self.eps[start].append(end)
        elif isinstance(node, Alt):
            for item in node.items:
                self.build(item, start, end)
        elif isinstance(node, Repeat):
            cur = start
            for _ in range(node.lo):
                nxt = self.state()
                self.build(node.item, cur, nxt)
                cur = nxt
            if node.hi is None:
                loop = self.state()
                self.eps[cur].append(loop)
                body_end = self.state()
                self.build(node.item, loop, body_end)
                self.eps[body_end].append(loop)
                self.eps[loop].append(end)
            else:
                for _ in range(node.hi - node.lo):
                    nxt = self.state()
                    self.eps[cur].append(end)
                    self.build(node.item, cur, nxt)
                    cur = nxt
                self.eps[cur].append(end)
        else:
            raise TypeError(node)


@dataclass
class DFA:
    """transitions [S, 256] int32 (-1 = dead); accepting [S] bool; state 0 is the start."""
    transitions: np.ndarray
    accepting: np.ndarray

    @property
    def num_states(self) -> int:
        return len(self.accepting)

    def walk(self, state: int, data: bytes) -> int:
        for b in data:
            if state < 0:
                return -1
            state = int(self.transitions[state, b])
        return state

    def matches(self, data: bytes) -> bool:
        s = self.walk(0, data)
        return s >= 0 and bool(self.accepting[s])


def compile_ast(node) -> DFA:
    nfa = _NFA()
    start, end = nfa.state(), nfa.state()
    nfa.build(node, start, end)

    def closure(states) -> frozenset:
        seen, stack = set(states), list(states)
        while stack:
            for t in nfa.eps[stack.pop()]:
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        return frozenset(seen)

    # Bytes no edge tells apart share one class: transitions are computed per class.
    masks = {m for edges in nfa.edges for m, _ in edges}
    signature = [tuple(bool(m >> b & 1) for m in masks) for b in range(256)]
    classes: dict[tuple, list[int]] = {}
    for b in range(256):
        classes.setdefault(signature[b], []).append(b)
    class_bytes = list(classes.values())

    first = closure([start])
    index = {first: 0}
    order = [first]
    rows: list[list[int]] = []
    while len(rows) < len(order):
        current = order[len(rows)]
        row = [-1] * 256
        for members in class_bytes:
            bit = 1 << members[0]
            targets = [t for s in current for m, t in nfa.edges[s] if m & bit]
            if not targets:
                continue
            nxt = closure(targets)
            if nxt not in index:
                if len(order) >= MAX_DFA_STATES:
                    raise RegexError(f"the grammar needs more than {MAX_DFA_STATES} automaton states; simplify it")
                index[nxt] = len(order)
                order.append(nxt)
            for b in members:
                row[b] = index[nxt]
        rows.append(row)
    trans = np.array(rows, dtype=np.int32)
    accepting = np.array([end in s for s in order], dtype=bool)
    return _prune(trans, accepting)


def _prune(trans: np.ndarray, accepting: np.ndarray) -> DFA:
    """Drop states from which no accepting state can be reached (a matcher must never enter one)."""
    live = accepting.copy()
    while True:
        safe = np.where(trans >= 0, trans, 0)
        reach = live | ((trans >= 0) & live[safe]).any(axis=1)
        if (reach == live).all():
            break
        live = reach
    if not live[0]:
        raise RegexError("the pattern matches nothing")
    keep = np.flatnonzero(live)
    renumber = np.full(len(live) + 1, -1, dtype=np.int32)
    renumber[keep] = np.arange(len(keep), dtype=np.int32)
    new = renumber[np.where(trans[keep] >= 0, trans[keep], len(live))]
    return DFA(new, accepting[keep])


def compile_regex(pattern: str) -> DFA:
    """A full-match DFA for `pattern` over UTF-8 bytes."""
    return compile_ast(parse(pattern))
