"""`lmforge speedrun`: every stage, end to end, on the embedded stdlib corpus, with a report card.

corpus -> clean (dedup, quality, PII, decontamination) -> tokenizer -> token shards -> pretrain ->
held-out bits-per-byte -> HumanEval pass@1 -> completions through the serving engine -> SFT -> DPO
-> red-team (with and without the guard) -> model card (the last four: speedrun_post.py).

Each stage reads the previous stage's files and writes its own under runs/NAME/. The stages that
cost time (clean, tokenizer, shards, pretrain) are reused, or resumed when interrupted, only when
their fingerprint matches: a hash of the recipe fields that shape the stage, the fingerprint of
the stage before it (so a change flows downstream) and the lmforge version; SFT and DPO count as
costly too (DPO's fingerprint holds SFT's, which holds the settings they share). The corpus stage
fingerprints the documents themselves. Fingerprints live in runs/NAME/fingerprints.json. When one
differs, the console says so and the stage reruns, and with it every later stage.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lmforge import __version__
from lmforge.config import load_recipe, to_dict
from lmforge.data.config import PipelineConfig
from lmforge.model.config import ModelSpec
from lmforge.outputs import atomic_write_json, claim_output_dir, remove_entries
from lmforge.speedrun_page import write_report_page
from lmforge.speedrun_post import ALIGN_DATA, AlignStageConfig, RedTeamStageConfig, post_rows
from lmforge.train.config import TrainConfig, TrainRecipe, depth_dial_defaults


@dataclass
class RunConfig:
    name: str = "speedrun"
    root: str = "runs"
    max_documents: int = 0        # 0: the whole stdlib; fewer for quick checks
    tokenizer_kind: str = "byte-bpe"
    vocab_size: int = 4096
    samples: int = 3
    sample_tokens: int = 48
    eval_tokens: int = 262144     # held-out tokens scored for bpb (0: the whole val split)
    humaneval_problems: int = 20  # greedy pass@1 on the first N problems (0: skip)
    humaneval_tokens: int = 96


@dataclass
class SandboxConfig:
    allow_weak: bool = False      # run HumanEval programs without kernel isolation (reported on the card)


@dataclass
class SpeedrunRecipe:
    run: RunConfig = field(default_factory=RunConfig)
    data: PipelineConfig = field(default_factory=PipelineConfig)
    model: ModelSpec = field(default_factory=lambda: ModelSpec(preset="tiny"))
    train: TrainConfig = field(default_factory=TrainConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    align: AlignStageConfig = field(default_factory=AlignStageConfig)
    redteam: RedTeamStageConfig = field(default_factory=RedTeamStageConfig)

    derived_defaults = staticmethod(depth_dial_defaults)


SAMPLE_PROMPTS = ["def fibonacci(n):\n", "import os\n\n\nclass ", "    for line in "]
RUN_FILES = ["report.json", "report.html", "fingerprints.json", "clean", "tokenizer", "data", "train", "eval",
             ALIGN_DATA, "sft", "dpo", "model_card.json", "model_card.md"]
SFT_FIELDS = ("seq_len", "sft_steps", "sft_lr", "sft_examples", "val_examples", "micro_batch", "seed")
FINGERPRINTS = "fingerprints.json"


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps([__version__, *parts], sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stages:
    def __init__(self, recipe: SpeedrunRecipe, console: Console):
        self.recipe, self.console = recipe, console
        self.dir = Path(recipe.run.root) / recipe.run.name
        self.report: dict = {"name": recipe.run.name, "recipe": to_dict(recipe), "stages": {}}
        self.fp: dict[str, str] = {}
        try:
            self.stored: dict = json.loads((self.dir / FINGERPRINTS).read_text())
        except (OSError, ValueError):
            self.stored = {}

    def fresh(self, stage: str, fp: str, has_output: bool) -> bool:
        """True when the stage's output on disk was made from the same inputs and recipe (reuse or
        resume it). Either way the new fingerprint is recorded before the stage runs."""
        self.fp[stage] = fp
        same = self.stored.get(stage) == fp
        if has_output and not same:
            why = "its recipe or inputs changed" if stage in self.stored else "it has no fingerprint"
            self.console.print(f"[yellow]{stage}: the output in {self.dir} is stale ({why}); rerunning "
                               "this stage and every later one[/]")
        self.stored[stage] = fp
        atomic_write_json(self.dir / FINGERPRINTS, self.stored)
        self.report["fingerprints"] = dict(self.fp)
        return same

    def timed(self, name: str, fn):
        self.console.rule(f"[bold]{name}")
        t = time.perf_counter()
        result = fn()
        result["seconds"] = round(time.perf_counter() - t, 2)
        self.report["stages"][name] = result
        (self.dir / "report.json").write_text(json.dumps(self.report, indent=2))
        return result

    # --- stages -------------------------------------------------------------------------------
    def corpus(self) -> dict:
        from lmforge.corpus.stdlib import stdlib_documents
        docs = list(stdlib_documents(limit=self.recipe.run.max_documents or None))
        self.docs = docs
        h = hashlib.blake2b(digest_size=16)
        for d in docs:
            h.update(f"{d.id}\0{d.meta['split']}\0{d.text}\0".encode("utf-8", "surrogatepass"))
        self.fp["corpus"] = fingerprint("corpus", h.hexdigest())
        train = [d for d in docs if d.meta["split"] == "train"]
        return {"documents": len(docs), "train_documents": len(train), "val_documents": len(docs) - len(train),
                "bytes": sum(len(d.text.encode()) for d in docs)}

    def clean(self) -> dict:
        from lmforge.data.pipeline import clean_corpus
        from lmforge.data.report import print_report
        # clean_corpus resumes only batches whose content and settings are unchanged; recorded for downstream
        self.fresh("clean", fingerprint("clean", self.fp["corpus"], self.recipe.data.fingerprint()), False)
        result = clean_corpus(self.docs, self.dir / "clean", self.recipe.data, progress=True, console=self.console)
        print_report(result.report, self.console)
        self.docs = list(result.documents())
        r = result.report
        removed = {stage: v.get("removed", {}) for stage, v in r["stages"].items() if v.get("removed")}
        return {"documents_in": r["documents_in"], "documents_out": r["documents_out"], "bytes_in": r["bytes_in"],
                "bytes_out": r["bytes_out"], "removed": removed, "pii": r["pii"], "duplicates": r["duplicates"]}

    def tokenizer(self) -> dict:
        from lmforge.tokenizer import compression_report, load_tokenizer, train_tokenizer
        out = self.dir / "tokenizer"
        run = self.recipe.run
        fp = fingerprint("tokenizer", self.fp["clean"], run.tokenizer_kind, run.vocab_size)
        if self.fresh("tokenizer", fp, (out / "tokenizer.json").exists()) and (out / "tokenizer.json").exists():
            self.tok = load_tokenizer(out)
        else:
            self.tok = train_tokenizer((d.text for d in self.docs if d.meta["split"] == "train"),
                                       kind=run.tokenizer_kind, vocab_size=run.vocab_size)
            self.tok.save(out)
        report = compression_report(self.tok, [d.text for d in self.docs if d.meta["split"] == "val"])
        return {"vocab_size": self.tok.vocab_size, **report}

    def shards(self) -> dict:
        from lmforge.data.shards import read_index
        from lmforge.data.token_shards import write_token_shards
        out = self.dir / "data"
        fp = fingerprint("shards", self.fp["tokenizer"], to_dict(self.recipe.data.mixing))
        fresh = self.fresh("shards", fp, (out / "index.json").exists())
        write_token_shards(self.docs, self.tok, out, mixing=self.recipe.data.mixing, progress=True,
                           console=self.console, input_id=fp, resume=fresh)
        index = read_index(out)
        return {split: sum(s["tokens"] for s in shards) for split, shards in index["splits"].items()}

    def pretrain(self) -> dict:
        from lmforge.train.trainer import TRAIN_FILES, train
        r = self.recipe
        out = self.dir / "train"
        r.train.data, r.train.out = str(self.dir / "data"), str(out)
        settings = {k: v for k, v in to_dict(r.train).items() if k not in ("data", "out")}
        fp = fingerprint("pretrain", self.fp["shards"], to_dict(r.model), settings)
        if not self.fresh("pretrain", fp, any((out / name).exists() for name in TRAIN_FILES)):
            remove_entries(out, TRAIN_FILES)  # what an earlier train run wrote there, nothing else
        summary = train(TrainRecipe(model=r.model, train=r.train), resume=True, console=self.console)
        self.model_dir = Path(summary["model_dir"])  # self-contained: train saves the shards' tokenizer
        return summary

    def evaluate(self) -> dict:
        from lmforge.data.shards import TokenShards
        from lmforge.eval.bpb import bits_per_byte, unigram_byte_bpb
        from lmforge.model import load
        model = load(self.model_dir)
        val = TokenShards(self.dir / "data", "val")
        n = min(len(val), self.recipe.run.eval_tokens or len(val))
        result = bits_per_byte(model, val.slice(0, n), self.tok.token_byte_lengths(),
                               seq_len=self.recipe.train.seq_len, batch_size=16)
        result["unigram_baseline_bpb"] = unigram_byte_bpb(
            (d.text for d in self.docs if d.meta["split"] == "train"),
            (d.text for d in self.docs if d.meta["split"] == "val"))
        return result

    def humaneval(self) -> dict:
        from lmforge.eval.quick import humaneval_pass_at_1
        from lmforge.model import load
        run = self.recipe.run
        if not run.humaneval_problems:
            return {"skipped": "run.humaneval_problems=0"}
        result = humaneval_pass_at_1(load(self.model_dir), self.tok, limit=run.humaneval_problems,
                                     max_new_tokens=run.humaneval_tokens, out_dir=self.dir / "eval",
                                     allow_weak_sandbox=self.recipe.sandbox.allow_weak,
                                     name=str(self.model_dir))
        result.pop("statuses", None)
        return result

    def samples(self) -> dict:
        from lmforge.model import load
        from lmforge.serve.engine import complete
        prompts = SAMPLE_PROMPTS[: self.recipe.run.samples]
        texts = complete(load(self.model_dir), self.tok, prompts, self.recipe.run.sample_tokens,
                         temperature=0.7, seed=0)
        return {"samples": [{"prompt": p, "completion": t} for p, t in zip(prompts, texts)]}

    def sft(self) -> dict:
        from lmforge.speedrun_post import run_sft, write_align_data
        from lmforge.train.trainer import TRAIN_FILES
        a, out = self.recipe.align, self.dir / "sft"
        self.align_files = write_align_data(self.docs, self.dir / ALIGN_DATA, a)
        fp = fingerprint("sft", self.fp["pretrain"], {k: getattr(a, k) for k in SFT_FIELDS})
        if not self.fresh("sft", fp, any((out / name).exists() for name in TRAIN_FILES)):
            remove_entries(out, TRAIN_FILES)
        result = run_sft(self.model_dir, self.align_files, out, self.recipe.train, a, self.console)
        self.sft_dir = Path(result["model_dir"])
        return result

    def dpo(self) -> dict:
        from lmforge.align.dpo import DPO_FILES
        from lmforge.speedrun_post import run_dpo
        a, out = self.recipe.align, self.dir / "dpo"
        fp = fingerprint("dpo", self.fp["sft"], {k: v for k, v in to_dict(a).items() if k not in SFT_FIELDS})
        if not self.fresh("dpo", fp, any((out / name).exists() for name in DPO_FILES)):
            remove_entries(out, DPO_FILES)
        result = run_dpo(self.sft_dir, self.align_files, out, self.recipe.train, a, self.console)
        self.final_dir = Path(result["model_dir"])
        return result

    def redteam(self) -> dict:
        from lmforge.speedrun_post import run_redteam
        return {"model": str(self.final_dir), **run_redteam(self.final_dir, self.recipe.redteam)}

    def card(self) -> dict:
        from lmforge.safety.card import write_card
        card_json, card_md = write_card(self.dir)  # reads report.json, which holds every stage so far
        return {"json": str(card_json), "markdown": str(card_md)}


def sandbox_layers(result: dict) -> str:
    """What isolated the generated programs, from the eval's `sandbox.layers` (lmforge.eval.sandbox),
    e.g. 'kernel: namespaces, pids_cgroup, filesystem, uid + rlimits + audit hook'."""
    layers = (result.get("sandbox") or {}).get("layers") or {}
    if not layers:
        return "layers not reported"
    text = f"{layers.get('isolation', '?')}: {', '.join(layers.get('active') or {}) or 'no kernel layer'}"
    if layers.get("failed"):
        text += f" (failed: {', '.join(layers['failed'])})"
    return text + (" + rlimits" if layers.get("rlimits") else "") + (" + audit hook" if layers.get("python_guard") else "")


def card_rows(report: dict) -> list[tuple[str, str, str]]:
    """(stage, result, seconds) for every stage: the console card and the HTML page show the same."""
    s = report["stages"]
    c, cl, t, tr, ev, he = s["corpus"], s["clean"], s["tokenizer"], s["pretrain"], s["evaluate"], s["humaneval"]
    pii = sum(cl["pii"].values()) if cl["pii"] else 0
    return [
        ("corpus", f"{c['documents']} stdlib files, {c['bytes'] / 1e6:.1f} MB", str(c["seconds"])),
        ("clean", f"{cl['documents_in']} -> {cl['documents_out']} documents, {cl['bytes_out'] / 1e6:.1f} MB kept, "
                  f"{pii} PII spans redacted", str(cl["seconds"])),
        ("tokenizer", f"vocab {t['vocab_size']}, {t['bytes_per_token']:.2f} bytes/token held out", str(t["seconds"])),
        ("shards", ", ".join(f"{k} {v:,} tokens" for k, v in s["shards"].items() if k != "seconds"),
         str(s["shards"]["seconds"])),
        ("pretrain", f"{tr['params'] / 1e6:.2f}M params, {tr['steps']} steps, {tr['tokens_seen']:,} tokens, "
                     f"loss {tr['final_loss']:.3f}", str(tr["seconds"])),
        ("evaluate", f"val bpb {ev['bpb']:.3f} vs unigram baseline {ev['unigram_baseline_bpb']:.3f} "
                     f"(ppl {ev['perplexity']:.1f})", str(ev["seconds"])),
        ("humaneval", he.get("skipped") or f"pass@1 {he['pass@1']:.3f} on {he['problems']} problems "
                      f"(greedy, sandbox: {sandbox_layers(he)})", str(he["seconds"])),
        ("samples", f"{len(s['samples']['samples'])} completions through the serving engine",
         str(s["samples"]["seconds"])),
        *post_rows(s),
    ]


def report_card(report: dict, console: Console, run_dir: Path) -> None:
    """The card on the console, and the same rows with figures as run_dir/report.html."""
    table = Table(title=f"lmforge speedrun: {report['name']}", show_header=True)
    table.add_column("stage")
    table.add_column("result")
    table.add_column("seconds", justify="right")
    rows = card_rows(report)
    for row in rows:
        table.add_row(*(escape(cell) for cell in row), style="bold green" if row[0] == "evaluate" else None)
    console.print(table)
    for sample in report["stages"]["samples"]["samples"]:
        console.print(f"[dim]{escape(sample['prompt'])}[/]{escape(sample['completion'])}", highlight=False)
    page = write_report_page(report, rows, run_dir)
    console.print(f"total {report['total_seconds']:.0f} s; report: {report['path']}; page: {page}")


STAGES = ("corpus", "clean", "tokenizer", "shards", "pretrain", "evaluate", "humaneval", "samples", "sft", "dpo",
          "redteam", "card")


def run_stages(recipe: SpeedrunRecipe, console: Console, names=STAGES) -> Stages:
    """Run the named stages in order (a prefix of STAGES: each needs the ones before it)."""
    claim_output_dir(Path(recipe.run.root) / recipe.run.name, "speedrun", RUN_FILES)
    stages = Stages(recipe, console)
    for name in names:
        stages.timed(name, getattr(stages, name))
    return stages


def speedrun(recipe: SpeedrunRecipe, console: Console | None = None) -> dict:
    console = console or Console()
    t0 = time.perf_counter()
    stages = run_stages(recipe, console)
    report = stages.report
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    report["path"] = str(stages.dir / "report.json")
    (stages.dir / "report.json").write_text(json.dumps(report, indent=2))
    report_card(report, console, stages.dir)
    return report


def speedrun_command(
    overrides: list[str] = typer.Argument(None, help="section.key=value, e.g. train.max_steps=100 run.name=x"),
    recipe: Path = typer.Option(Path(__file__).parent / "recipes" / "cpu-tiny.yaml", "--recipe", "-r"),
):
    """Run every stage end to end on the embedded stdlib corpus and print a report card."""
    speedrun(load_recipe(SpeedrunRecipe, recipe, overrides))


def register(app: typer.Typer) -> None:
    app.command("speedrun")(speedrun_command)
