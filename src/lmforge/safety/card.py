"""Model card and governance report from a run directory, as JSON and Markdown.

Reads what the run wrote (a speedrun's report.json, a train run's recipe.yaml and metrics.jsonl,
the model's config.json, red-team results when present) and files it under headings that answer the
documentation duties of the EU AI Act (Annex IV technical documentation; Art. 53(1)(a) and Annex XI
for general-purpose models: description, training data and its provenance, compute, evaluation,
known limits) and the NIST AI RMF functions (Map: context and intended use; Measure: evaluations,
privacy, red-team; Manage: risks and limits). Anything the run did not produce is recorded as
"not measured", never guessed.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from lmforge.errors import LmforgeError
from lmforge.outputs import atomic_write_json, atomic_write_text

NOT_MEASURED = "not measured"

# card section -> the duties it answers (shown in the Markdown, kept in the JSON)
DUTIES = {
    "model": "EU AI Act Annex IV(1), Annex XI(1)(a); NIST AI RMF Map 2.1",
    "intended_use": "EU AI Act Annex IV(1)(a), Art. 13(3)(b); NIST AI RMF Map 1.1",
    "training_data": "EU AI Act Annex IV(2)(d), Art. 53(1)(d), Annex XI(2)(c); NIST AI RMF Map 4.1",
    "training": "EU AI Act Annex XI(2)(d)-(e) (compute); NIST AI RMF Map 2.2",
    "privacy": "EU AI Act Art. 10(5), GDPR Art. 25; NIST AI RMF Measure 2.10",
    "evaluation": "EU AI Act Annex IV(2)(g), Annex XI(2)(b); NIST AI RMF Measure 2.3",
    "red_team": "EU AI Act Art. 55(1)(a) (adversarial testing); NIST AI RMF Measure 2.7",
    "limits": "EU AI Act Art. 13(3)(b)(iii), Annex IV(3); NIST AI RMF Manage 1.3",
}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{path} is not valid JSON ({e.msg})") from e


def _metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    return rows


def _last(rows: list[dict], key: str):
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else None


def _train_dir(run: Path) -> Path | None:
    for candidate in (run, run / "train"):
        if (candidate / "recipe.yaml").is_file() or (candidate / "metrics.jsonl").is_file():
            return candidate
    return None


def build_card(run_dir: str | Path) -> dict:
    run = Path(run_dir)
    if not run.is_dir():
        raise LmforgeError(f"run directory not found: {run}")
    report = _read_json(run / "report.json") or {}
    stages = report.get("stages", {})
    train_dir = _train_dir(run)
    if not stages and train_dir is None:
        raise LmforgeError(f"{run} holds no run outputs (report.json, recipe.yaml or metrics.jsonl)")
    recipe = yaml.safe_load((train_dir / "recipe.yaml").read_text(encoding="utf-8")) if train_dir and \
        (train_dir / "recipe.yaml").is_file() else {}
    recipe = recipe if isinstance(recipe, dict) else {}
    rows = _metrics(train_dir / "metrics.jsonl") if train_dir else []
    model_cfg = _read_json(train_dir / "model" / "lmforge_model.json") if train_dir else None
    pretrain = stages.get("pretrain", {})
    tc = recipe.get("train", {}) if isinstance(recipe.get("train"), dict) else {}
    dp = tc.get("dp", {}) if isinstance(tc.get("dp"), dict) else {}
    params = pretrain.get("params")
    tokens = pretrain.get("tokens_seen") or _last(rows, "tokens_seen")
    clean = stages.get("clean", {})
    red_team = stages.get("redteam") or _read_json(run / "redteam.json") or _read_json(run / "redteam" / "report.json")
    card = {
        "model": {"architecture": "Llama-family decoder-only transformer (lmforge)",
                  "config": model_cfg or recipe.get("model") or NOT_MEASURED, "parameters": params or NOT_MEASURED},
        "intended_use": {"purpose": "research and education: a small language model of Python source code",
                         "out_of_scope": ["decisions about people", "any safety-critical or high-risk use "
                                          "(EU AI Act Annex III)", "factual question answering"]},
        "training_data": {"provenance": stages.get("corpus") or ({"shards": tc.get("data")} if tc.get("data")
                                                                 else NOT_MEASURED),
                          "filters_removed": clean.get("removed", NOT_MEASURED),
                          "pii": clean.get("pii", NOT_MEASURED), "duplicates": clean.get("duplicates", NOT_MEASURED),
                          "documents_in_out": [clean.get("documents_in"), clean.get("documents_out")]
                          if clean else NOT_MEASURED},
        "training": {"steps": pretrain.get("steps") or _last(rows, "step") or NOT_MEASURED,
                     "tokens_seen": tokens or NOT_MEASURED, "final_loss": pretrain.get("final_loss")
                     or _last(rows, "loss") or NOT_MEASURED,
                     "training_flops_estimate": 6 * params * tokens if params and tokens else NOT_MEASURED,
                     "settings": {k: tc[k] for k in ("seq_len", "global_batch_tokens", "lr", "schedule", "seed")
                                  if k in tc} or NOT_MEASURED},
        "privacy": {"dp_sgd": bool(dp.get("enabled")),
                    "epsilon": _last(rows, "dp_epsilon") if dp.get("enabled") else None,
                    "delta": dp.get("delta") if dp.get("enabled") else None,
                    "max_grad_norm": dp.get("max_grad_norm") if dp.get("enabled") else None,
                    "pii_redacted_in_data": bool(clean.get("pii"))},
        "evaluation": {k: stages[k] for k in ("evaluate", "humaneval", "sft", "dpo") if k in stages} or
                      ({"val_loss": _last(rows, "val_loss")} if _last(rows, "val_loss") is not None else NOT_MEASURED),
        "red_team": red_team or NOT_MEASURED,
    }
    card["limits"] = known_limits(card)
    card["duties"] = DUTIES
    return card


def known_limits(card: dict) -> list[str]:
    limits = ["Small model trained on a narrow corpus (Python source): outputs are often wrong and must not "
              "be relied on."]
    if not card["privacy"]["dp_sgd"]:
        limits.append("Trained without differential privacy: it may reproduce rare strings of its training data "
                      "(see the canary-exposure benchmark).")
    else:
        limits.append(f"DP-SGD bounds what any one training example can change: epsilon="
                      f"{card['privacy']['epsilon']}, delta={card['privacy']['delta']} (per example, not per person).")
    if card["red_team"] == NOT_MEASURED:
        limits.append("No red-team evaluation in this run: prompt-injection and jailbreak robustness is unknown.")
    if card["evaluation"] == NOT_MEASURED:
        limits.append("No held-out evaluation in this run.")
    if card["training_data"]["pii"] == NOT_MEASURED:
        limits.append("No PII filter ran on this run's data (or its report is missing).")
    return limits


def to_markdown(card: dict) -> str:
    titles = {"model": "Model", "intended_use": "Intended use", "training_data": "Training data",
              "training": "Training and compute", "privacy": "Privacy", "evaluation": "Evaluation",
              "red_team": "Red-team results", "limits": "Known limits and risks"}
    lines = ["# Model card", ""]
    for key, title in titles.items():
        lines += [f"## {title}", "", f"*Answers: {card['duties'][key]}*", ""]
        value = card[key]
        if isinstance(value, list):
            lines += [f"- {item}" for item in value]
        elif isinstance(value, dict):
            lines += [f"- **{k}**: {json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else v}"
                      for k, v in value.items()]
        else:
            lines.append(str(value))
        lines.append("")
    return "\n".join(lines)


def write_card(run_dir: str | Path, out: str | Path | None = None) -> tuple[Path, Path]:
    """-> (model_card.json, model_card.md), written atomically into `out` (default: the run directory)."""
    card = build_card(run_dir)
    folder = Path(out) if out else Path(run_dir)
    if folder.exists() and not folder.is_dir():
        raise LmforgeError(f"{folder} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    return (atomic_write_json(folder / "model_card.json", card),
            atomic_write_text(folder / "model_card.md", to_markdown(card)))
