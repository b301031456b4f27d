"""The speedrun's stages after pretraining: SFT and DPO (lmforge.align) on functions of the run's own
cleaned corpus, then a red-team of the finetuned model with and without the guard and its model card
(lmforge.safety).

The finetuning data go through files like every other stage's: runs/NAME/align_data/*.jsonl, one
chat (signature + docstring -> body) or one preference pair (real body chosen over a corrupted one)
per function, the train split's files for training and the val split's (never seen in pretraining)
for the held-out figures. SFT starts from the pretrained model, DPO from the SFT model.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

from rich.console import Console

from lmforge.config import check_non_negative, check_positive
from lmforge.outputs import atomic_write_text

ALIGN_DATA = "align_data"


@dataclass
class AlignStageConfig:
    """Both stages train with AdamW, micro_batch chats or pairs per step, each at most seq_len + 1 tokens."""
    seq_len: int = 0            # 0: train.seq_len (at most the model's context)
    sft_steps: int = 40
    sft_lr: float = 0.001
    sft_examples: int = 640     # training chats (the first that fit train.seq_len + 1 tokens)
    dpo_steps: int = 20
    dpo_lr: float = 0.0001
    dpo_beta: float = 0.1
    dpo_examples: int = 160     # training pairs
    val_examples: int = 64      # held-out chats and pairs
    win_rate_prompts: int = 16  # held-out prompts DPO's model and the SFT model both complete
    win_rate_tokens: int = 48
    micro_batch: int = 8
    seed: int = 0

    def __post_init__(self):
        check_positive(self, "align", "sft_steps", "sft_lr", "sft_examples", "dpo_steps", "dpo_lr", "dpo_beta",
                       "dpo_examples", "val_examples", "win_rate_tokens", "micro_batch")
        check_non_negative(self, "align", "seq_len", "win_rate_prompts")


@dataclass
class RedTeamStageConfig:
    per_family: int = 2         # generated attacks per family (7 families)
    benign: int = 14            # benign prompts, to count the guard's false blocks
    max_tokens: int = 32
    classifier: str = "rules"   # the guard's scorer: rules (instant) or trained (fit now, about a CPU-minute)
    seed: int = 0

    def __post_init__(self):
        check_positive(self, "redteam", "per_family", "max_tokens")
        check_non_negative(self, "redteam", "benign")


def _write_jsonl(path: Path, rows) -> str:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def write_align_data(docs, out: Path, cfg: AlignStageConfig) -> dict[str, str]:
    """SFT chats and DPO pairs from the run's cleaned documents, one JSONL per use and split."""
    from lmforge.align.data import function_chats
    from lmforge.align.preference_data import function_pairs_of
    split = {s: [d for d in docs if d.meta["split"] == s] for s in ("train", "val")}
    # More than the stages keep, since chats or pairs longer than the context are skipped when
    # tokenised: 8x the training rows, and every function of the (small) val split.
    limits = {"sft_train": 8 * cfg.sft_examples, "dpo_train": 8 * cfg.dpo_examples, "sft_val": None, "dpo_val": None}
    files = {}
    for name, limit in limits.items():
        kind, s = name.split("_")
        rows = ({"messages": m} for m in function_chats(split[s])) if kind == "sft" else \
            (asdict(p) for p in function_pairs_of(split[s], cfg.seed))
        files[name] = _write_jsonl(out / f"{name}.jsonl", islice(rows, limit))
    return files


def _train_overrides(tc, out: Path, cfg: AlignStageConfig, steps: int, lr: float) -> list[str]:
    seq_len = cfg.seq_len or tc.seq_len
    return [f"train.out={out}", f"train.seq_len={seq_len}", f"train.micro_batch={cfg.micro_batch}",
            f"train.global_batch_tokens={cfg.micro_batch * seq_len}", f"train.max_steps={steps}",
            f"train.lr={lr}", "train.optimizer=adamw", "train.schedule=cosine", "train.warmup=0.1",
            "train.weight_decay=0.0", f"train.eval_every={steps}", f"train.ckpt_every={steps}",
            f"train.log_every={max(1, steps // 4)}", "train.tensorboard=false", f"train.seed={cfg.seed}",
            f"train.device={tc.device}"]


def held_out_chat_loss(model_dir: Path, files: dict, seq_len: int, n: int) -> float:
    """Mean loss per assistant token of `model_dir` on the held-out chats (what SFT's val_loss measures)."""
    import torch

    from lmforge.align.data import read_chat_jsonl
    from lmforge.align.sft import build_examples, mean_masked_loss, pad_token_id
    from lmforge.model import load_pretrained
    from lmforge.train.examples import collate
    loaded = load_pretrained(str(model_dir), None, "float32", "cpu")
    examples, _ = build_examples(loaded.tokenizer, read_chat_jsonl(files["sft_val"]), seq_len + 1, n)
    pad = pad_token_id(loaded.tokenizer)
    batches = [collate(examples[i:i + 16], pad) for i in range(0, len(examples), 16)]
    with torch.no_grad():
        return mean_masked_loss(loaded.model.eval(), batches)


def run_sft(start: Path, files: dict, out: Path, tc, cfg: AlignStageConfig, console: Console) -> dict:
    from lmforge.align.sft import SFTRecipe, finetune_sft
    from lmforge.config import load_recipe
    recipe = load_recipe(SFTRecipe, None, _train_overrides(tc, out, cfg, cfg.sft_steps, cfg.sft_lr) + [
        f"sft.data={files['sft_train']}", f"sft.val_data={files['sft_val']}", f"sft.max_examples={cfg.sft_examples}",
        f"sft.val_examples={cfg.val_examples}"])
    before = held_out_chat_loss(start, files, recipe.train.seq_len, cfg.val_examples)
    summary = finetune_sft(recipe, str(start), resume=True, console=console)
    after = held_out_chat_loss(Path(summary["model_dir"]), files, recipe.train.seq_len, cfg.val_examples)
    return {"steps": summary["steps"], "final_loss": summary["final_loss"], "val_loss_before": before,
            "val_loss_after": after, "model_dir": summary["model_dir"]}


def _last_eval(metrics_path: Path) -> dict:
    from lmforge.train.metrics import read_metrics
    rows = [r for r in read_metrics(metrics_path) if "val_win_rate" in r or "val_reward_accuracy" in r]
    return rows[-1] if rows else {}


def run_dpo(start: Path, files: dict, out: Path, tc, cfg: AlignStageConfig, console: Console) -> dict:
    """DPO from the SFT model; the effect: held-out implicit-reward accuracy and margin, the win-rate
    against the SFT model, and how often each model itself gives the real body more log-probability
    than the corrupted one (reference-free, on the same held-out pairs)."""
    import torch
    from safetensors.torch import load_file

    from lmforge.align.dpo import REFERENCE_FILE, DPORecipe, finetune_dpo, reference_logps
    from lmforge.align.preference_data import build_pair_examples, read_preference_jsonl
    from lmforge.align.sft import pad_token_id
    from lmforge.config import load_recipe
    from lmforge.model import load_pretrained
    recipe = load_recipe(DPORecipe, None, _train_overrides(tc, out, cfg, cfg.dpo_steps, cfg.dpo_lr) + [
        f"dpo.data={files['dpo_train']}", f"dpo.val_data={files['dpo_val']}", f"dpo.max_examples={cfg.dpo_examples}",
        f"dpo.val_examples={cfg.val_examples}", f"dpo.beta={cfg.dpo_beta}", "dpo.chat=true",
        f"dpo.win_rate_prompts={cfg.win_rate_prompts}", f"dpo.win_rate_tokens={cfg.win_rate_tokens}"])
    summary = finetune_dpo(recipe, str(start), resume=True, console=console)
    last = _last_eval(out / "metrics.jsonl")
    loaded = load_pretrained(summary["model_dir"], None, "float32", "cpu")
    val, _ = build_pair_examples(loaded.tokenizer, read_preference_jsonl(files["dpo_val"]), recipe.train.seq_len + 1,
                                 cfg.val_examples, chat=True)
    start_logps = load_file(str(out / REFERENCE_FILE))["val"]  # the SFT model's, cached by DPO
    logps = reference_logps(loaded.model, val, pad_token_id(loaded.tokenizer))
    prefers = {name: float((lp[:, 0] > lp[:, 1]).to(torch.float32).mean()) if len(val) else None
               for name, lp in (("sft", start_logps), ("dpo", logps))}
    return {"steps": summary["steps"], "final_loss": summary["final_loss"], "val_pairs": len(val),
            "val_reward_accuracy": last.get("val_reward_accuracy"), "val_reward_margin": last.get("val_reward_margin"),
            "val_win_rate": last.get("val_win_rate"), "win_rate_prompts": last.get("val_win_rate_prompts", 0),
            "prefers_real_body": prefers, "model_dir": summary["model_dir"]}


def run_redteam(model_dir: Path, cfg: RedTeamStageConfig) -> dict:
    """Generated attacks (every family) and benign prompts against the model in this process behind
    a canary system prompt, without and with the guard."""
    from lmforge.model import load_pretrained
    from lmforge.safety.attacks import attacks
    from lmforge.safety.benign import benign
    from lmforge.safety.guard import Guard
    from lmforge.safety.judges import make_canary, system_prompt
    from lmforge.safety.load import load_classifier
    from lmforge.safety.redteam import report, run
    from lmforge.safety.targets import ModelTarget
    loaded = load_pretrained(str(model_dir), None, "float32", "cpu")
    model, tok = loaded.model.eval(), loaded.tokenizer
    prompts = attacks(cfg.per_family, cfg.seed) + benign(cfg.benign, cfg.seed)
    canary = make_canary(cfg.seed)
    room = model.cfg.max_seq_len - cfg.max_tokens
    system = {"role": "system", "content": system_prompt(canary)}
    cut = sum(len(tok.encode_chat([system, *p.messages])) > room for p in prompts if p.is_attack)
    out = {"classifier": cfg.classifier, "max_tokens": cfg.max_tokens, "attacks_cut_to_fit": cut}
    for name, guard in (("unguarded", None), ("guarded", Guard(load_classifier(cfg.classifier)))):
        out[name] = report(run(ModelTarget(model, tok, cfg.max_tokens, guard), prompts, canary), cfg.seed)
    return out


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def post_rows(s: dict) -> list[tuple[str, str, str]]:
    """The SFT, DPO, red-team and card rows (those stages that ran)."""
    rows = []
    if "sft" in s:
        f = s["sft"]
        rows.append(("sft", f"{f['steps']} steps; held-out loss per assistant token {f['val_loss_before']:.3f} -> "
                            f"{f['val_loss_after']:.3f}", str(f["seconds"])))
    if "dpo" in s:
        d = s["dpo"]
        p = d["prefers_real_body"]
        rows.append(("dpo", f"{d['steps']} steps; held out ({d['val_pairs']} pairs): implicit-reward accuracy "
                            f"{_pct(d['val_reward_accuracy'])}, real body preferred {_pct(p['sft'])} -> {_pct(p['dpo'])}; "
                            f"win-rate vs SFT {_pct(d['val_win_rate'])} on {d['win_rate_prompts']} prompts",
                     str(d["seconds"])))
    if "redteam" in s:
        r = s["redteam"]
        u, g = r["unguarded"], r["guarded"]
        benign = f"; benign blocked {_pct(g['benign']['blocked'])} of {g['benign']['n']}" if "benign" in g else ""
        cut = f"; {r['attacks_cut_to_fit']} attack prompts cut to fit the context" if r["attacks_cut_to_fit"] else ""
        rows.append(("redteam", f"attack success {_pct(u['attacks']['asr'])} -> {_pct(g['attacks']['asr'])} with the "
                                f"guard ({r['classifier']}; {u['attacks']['n']} attacks, {len(u['families'])} "
                                f"families, {_pct(g['attacks']['blocked'])} blocked){benign}{cut}",
                     str(r["seconds"])))
    if "card" in s:
        rows.append(("card", "model_card.md and model_card.json", str(s["card"]["seconds"])))
    return rows
