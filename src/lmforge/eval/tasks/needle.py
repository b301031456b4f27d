"""Needle in a haystack: a random number hidden at a given depth of a long filler text; the model
is asked for it. Swept over context length x depth; the result is a heatmap PNG.

The haystack is a user text file or, by default, deterministic synthetic prose (no download).
Context lengths are in tokens of the evaluated model (approximate for endpoints: 4 chars/token).
`max_length=auto` sweeps up to the longest context that fits a memory budget (eval.context_fit)
and reports the length chosen and why.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.eval.backend import GenerationRequest
from lmforge.eval.context_fit import fit_context
from lmforge.eval.stats import mean_and_stderr
from lmforge.eval.tasks.base import Task

QUESTION = "\n\nQuestion: What is the special magic number mentioned in the text above?\nAnswer: The special magic number is"
NEEDLE = " The special magic number is {value}. "
MIN_ROOM = 64  # tokens besides the answer: the question and needle (48) and at least 16 of haystack
WORDS = {
    "adj": "quiet green distant old bright narrow heavy gentle busy patient sudden wooden".split(),
    "noun": "river lantern harbour garden teacher engine valley window market letter mountain bridge".split(),
    "verb": "follows watches carries remembers crosses paints repairs visits describes ignores".split(),
    "place": "the station|the old mill|the northern road|a small village|the lighthouse|the library".split("|"),
}


def synthetic_haystack(n_chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    parts, total = [], 0
    while total < n_chars:
        w = {k: rng.choice(v) for k, v in WORDS.items()}
        s = f"The {w['adj']} {w['noun']} {w['verb']} the {rng.choice(WORDS['noun'])} near {w['place']}. "
        parts.append(s)
        total += len(s)
    return "".join(parts)


def insert_needle(haystack: str, needle: str, depth: float) -> str:
    """Insert at the sentence boundary nearest to depth (0 = start, 1 = end)."""
    target = int(depth * len(haystack))
    cut = haystack.rfind(". ", 0, target)
    cut = 0 if depth <= 0 or cut < 0 else cut + 2
    if depth >= 1:
        cut = len(haystack)
    return haystack[:cut] + needle.strip() + " " + haystack[cut:]


@dataclass
class NeedleConfig:
    context_lengths: list[int] = field(default_factory=list)  # default: powers of two up to the model's max
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 2
    haystack_path: str | None = None
    max_new_tokens: int = 12
    chat: bool = False
    seed: int = 0
    max_length: str = ""  # "auto": the longest context that fits memory_gb, swept with the ladder below it
    memory_gb: float = 0.0  # the budget for max_length=auto (0: from the memory available now)


class NeedleTask(Task):
    name = "needle"
    config_class = NeedleConfig
    chunk_size = 8

    def __init__(self, config):
        super().__init__(config)
        if config.max_length not in ("", "auto"):
            raise LmforgeError(f"needle.max_length is 'auto' or unset, got {config.max_length!r}")
        if config.max_length and config.context_lengths:
            raise LmforgeError("needle.max_length=auto chooses the lengths: drop needle.context_lengths")
        self.backend = None  # set by the runner before items(): lengths depend on the model
        self.fit = None  # the ContextFit of max_length=auto, found once

    def lengths(self) -> list[int]:
        if self.config.context_lengths:
            return sorted(self.config.context_lengths)
        if self.config.max_length == "auto":
            if self.fit is None:
                self.fit = fit_context(self.backend, self.config.memory_gb, minimum=MIN_ROOM + self.config.max_new_tokens)
            top = self.fit.length
        else:
            top = getattr(self.backend, "max_length", None) or 4096
        out, n = [], 256
        while n <= top:
            out.append(n)
            n *= 2
        if self.fit is not None and out and out[-1] != top:
            out.append(top)  # the sweep ends at the longest length that fits
        return out or [top]

    def chars_per_token(self, sample: str) -> float:
        tok = getattr(self.backend, "tok", None)
        return len(sample) / max(1, len(tok.encode(sample))) if tok is not None else 4.0

    def fit_prompt(self, hay: str, needle: str, depth: float, limit: int, cpt: float) -> str:
        """The prompt with the haystack cut until it is at most `limit` tokens of the model (when
        its tokenizer is known), so the engine never truncates it (which could drop the needle)."""
        tok = getattr(self.backend, "tok", None)
        prompt = insert_needle(hay, needle, depth) + QUESTION
        while tok is not None and (count := len(tok.encode(prompt))) > limit:
            hay = hay[: len(hay) - int((count - limit) * cpt) - 1]
            if len(hay) < 16:
                raise LmforgeError(f"task needle: the question and needle alone exceed {limit} tokens")
            prompt = insert_needle(hay, needle, depth) + QUESTION
        return prompt

    def items(self) -> list[dict]:
        cfg = self.config
        if cfg.haystack_path:
            if not Path(cfg.haystack_path).exists():
                raise LmforgeError(f"task needle: haystack {cfg.haystack_path} not found")
            base = Path(cfg.haystack_path).read_text(encoding="utf-8", errors="replace")
        else:
            base = synthetic_haystack(4 * max(self.lengths()) * 6, cfg.seed)
        cpt = self.chars_per_token(base[:4000])
        items = []
        for length in self.lengths():
            room = length - 48 - cfg.max_new_tokens  # question, needle and answer must fit too
            if room < MIN_ROOM - 48:
                raise LmforgeError(f"task needle: context length {length} is too short")
            n_chars = int(room * cpt)
            if n_chars > len(base):
                raise LmforgeError(f"task needle: the haystack has {len(base)} chars, {n_chars} needed for {length}")
            for depth in cfg.depths:
                for trial in range(cfg.trials):
                    value = str(random.Random(f"{cfg.seed}:{length}:{depth}:{trial}").randrange(10000, 100000))
                    prompt = self.fit_prompt(base[:n_chars], NEEDLE.format(value=value), depth,
                                             length - cfg.max_new_tokens, cpt)
                    items.append({"key": f"{length}:{depth}:{trial}:{value}", "length": length, "depth": depth,
                                  "value": value, "prompt": prompt})
        return items

    def evaluate(self, backend, items: list[dict]) -> list[dict]:
        requests = [GenerationRequest(it["prompt"], self.config.max_new_tokens, 0.0, stop=("\n",), chat=self.config.chat)
                    for it in items]
        return [{"answer": a, "found": it["value"] in a} for it, a in zip(items, backend.generate(requests))]

    def aggregate(self, items, results, out_dir) -> dict:
        lengths = sorted({it["length"] for it in items})
        depths = sorted({it["depth"] for it in items})
        grid = np.zeros((len(depths), len(lengths)))
        counts = np.zeros_like(grid)
        for it, r in zip(items, results):
            d, l = depths.index(it["depth"]), lengths.index(it["length"])
            grid[d, l] += r["found"]
            counts[d, l] += 1
        grid = grid / np.maximum(counts, 1)
        acc, se = mean_and_stderr([float(r["found"]) for r in results])
        out = {"metrics": {"accuracy": acc}, "stderr": {"accuracy": se},
               "details": {"context_lengths": lengths, "depths": depths, "accuracy_grid": grid.tolist()}}
        if self.fit is not None:
            out["details"]["max_length"] = self.fit.as_dict()
        if out_dir is not None:
            out["artifacts"] = [str(plot_heatmap(grid, lengths, depths, Path(out_dir) / "needle_heatmap.png"))]
        return out


def plot_heatmap(grid: np.ndarray, lengths: list[int], depths: list[float], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(lengths), 1.0 + 0.6 * len(depths)))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="retrieval accuracy")
    ax.set_title("needle in a haystack")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
