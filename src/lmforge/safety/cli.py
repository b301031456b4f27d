"""`lmforge safety ...`: guard (classify a prompt), guard-eval (held-out-family detector metrics)
and redteam (attack success against a model or an endpoint, with and without the guard)."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from lmforge.errors import LmforgeError
from lmforge.model.cli_options import dtype_option, model_argument, tokenizer_option

safety_app = typer.Typer(help="Guard, red-team and other safety tools.", no_args_is_help=True)

# other safety modules add their commands with `register(safety_app)`, one line each here
EXTRA_COMMANDS: tuple[str, ...] = ("lmforge.safety.model_cli",)

CLASSIFIER_HELP = "guard scorer: trained (fit on the generated sets now), rules, or a saved guard / HF classifier dir"


def _read(path: Path) -> str:
    if not path.is_file():
        raise LmforgeError(f"no such file: {path}")
    return path.read_text(encoding="utf-8")


@safety_app.command("guard")
def guard_command(
    text: str = typer.Argument(None, help="the prompt to classify (or --file, or '-' for stdin)"),
    file: Path = typer.Option(None, "--file", "-f", help="UTF-8 file: one prompt per line (with --lines) or one prompt"),
    lines: bool = typer.Option(False, help="classify each line of --file separately"),
    classifier: str = typer.Option("trained", help=CLASSIFIER_HELP),
):
    """Classify prompts as attack or benign; prints one JSON line per prompt with score and reasons."""
    from lmforge.safety.guard import Guard
    from lmforge.safety.load import load_classifier

    if (text is None) == (file is None):
        raise LmforgeError("give the prompt as TEXT or with --file (one of the two)")
    if file is not None:
        body = _read(file)
        prompts = [x for x in body.splitlines() if x.strip()] if lines else [body]
    else:
        prompts = [sys.stdin.read() if text == "-" else text]
    guard = Guard(load_classifier(classifier))
    for p in prompts:
        d = guard.check_text(p)
        typer.echo(json.dumps({"attack": d.action != "allow", "score": round(d.score, 4),
                               "threshold": round(guard.classifier.threshold, 4), "reasons": d.reasons,
                               "text": p[:80]}, ensure_ascii=False))


@safety_app.command("guard-eval")
def guard_eval_command(
    seed: int = typer.Option(0, min=0),
    per_family: int = typer.Option(50, min=2, max=1000, help="attacks per family"),
    benign_n: int = typer.Option(350, "--benign", min=4, max=10000, help="benign prompts (half train, half test)"),
    fpr: float = typer.Option(0.01, min=0.0, max=1.0, help="false-positive rate for the TPR column"),
):
    """TPR at a fixed FPR and AUC for each attack family, with the classifier trained without it."""
    from lmforge.safety.training import held_out_table, summary
    rows = held_out_table(seed, fpr, per_family, benign_n)
    t = Table(title=f"guard, each family held out of training (TPR at {fpr:.0%} FPR)")
    for col in ("family", "attacks", "benign", "AUC", "TPR", "rules AUC", "rules TPR"):
        t.add_column(col, justify="right")
    for r in rows + [{"family": "mean", "attacks": sum(r["attacks"] for r in rows), "benign": rows[0]["benign"],
                      **summary(rows)}]:
        t.add_row(r["family"], str(r["attacks"]), str(r["benign"]), f"{r['auc']:.3f}", f"{r['tpr_at_fpr']:.3f}",
                  f"{r['rules_auc']:.3f}", f"{r['rules_tpr_at_fpr']:.3f}")
    Console(soft_wrap=True).print(t)


@safety_app.command("redteam")
def redteam_command(
    model: str = model_argument(),
    endpoint: str = typer.Option(None, help="an OpenAI-compatible server (e.g. http://127.0.0.1:8000) instead of MODEL"),
    endpoint_model: str = typer.Option(None, help="the model name on the endpoint (default: its first)"),
    api_key: str = typer.Option(None, envvar="LMFORGE_API_KEY"),
    tokenizer: str = tokenizer_option(),
    dtype: str = dtype_option(),
    guard: bool = typer.Option(False, "--guard", help="put the guard in front of the in-process model"),
    classifier: str = typer.Option("trained", help=CLASSIFIER_HELP),
    per_family: int = typer.Option(10, min=1, max=1000, help="attacks per family"),
    benign_n: int = typer.Option(20, "--benign", min=0, max=10000, help="benign prompts (to count false blocks)"),
    max_tokens: int = typer.Option(64, min=1, max=4096),
    seed: int = typer.Option(0, min=0),
    workers: int = typer.Option(1, min=1, max=64, help="requests in flight (endpoint)"),
    judge_endpoint: str = typer.Option(None, help="also ask this OpenAI-compatible server's model a yes/no question "
                                                  "per reply (a model judge; the deterministic judges stay the default)"),
    task_prompt: bool = typer.Option(False, "--task-prompt", help="system prompt: a translation task plus the canary "
                                                                  "(instead of the bank assistant)"),
    json_out: Path = typer.Option(None, "--json", help="also write the report (and every reply) here"),
):
    """Attack success rate (95 % bootstrap CI) per family against a model or endpoint with a canary
    system prompt; benign prompts count how often a guard blocks harmless requests."""
    from lmforge.outputs import atomic_write_json
    from lmforge.safety.attacks import attacks
    from lmforge.safety.benign import benign
    from lmforge.safety.judges import SYSTEM_TEMPLATE, TASK_TEMPLATE, make_canary
    from lmforge.safety.redteam import agreement, report, run, run_judge

    if endpoint:
        if model is not None or guard:
            raise LmforgeError("--endpoint replaces MODEL and --guard (run the server with --guard instead)")
        from lmforge.safety.targets import EndpointTarget
        target = EndpointTarget(endpoint, endpoint_model, api_key, max_tokens)
    else:
        from lmforge.model import load_pretrained
        from lmforge.safety.guard import Guard
        from lmforge.safety.load import load_classifier
        from lmforge.safety.targets import ModelTarget
        loaded = load_pretrained(model, tokenizer, dtype, "cpu")
        target = ModelTarget(loaded.model, loaded.tokenizer, max_tokens, Guard(load_classifier(classifier)) if guard else None)
    prompts = attacks(per_family, seed) + benign(benign_n, seed)
    template = TASK_TEMPLATE if task_prompt else SYSTEM_TEMPLATE
    outcomes = run(target, prompts, make_canary(seed), workers, template)
    rep = report(outcomes, seed)
    _print_report(rep)
    if judge_endpoint:
        from lmforge.safety.judge_model import ModelJudge
        from lmforge.safety.targets import EndpointTarget
        judge = ModelJudge(EndpointTarget(judge_endpoint, max_tokens=3))
        judged = run_judge(outcomes, judge, make_canary(seed))
        rep["model_judge"] = {**report(judged, seed), "unclear": judge.unclear, "agreement": agreement(outcomes, judged)}
        typer.echo(f"model judge ({judge_endpoint}): {judge.unclear} unclear answers; "
                   f"agreement with the deterministic judges {rep['model_judge']['agreement']:.3f}")
        _print_report(rep["model_judge"])
    if json_out:
        atomic_write_json(json_out, {**rep, "replies": [{"family": o.prompt.family, "goal": o.prompt.goal,
                                                        "blocked": o.blocked, "success": o.success, "reply": o.reply}
                                                       for o in outcomes]})


def _print_report(rep: dict) -> None:
    t = Table(title="attack success rate (95 % bootstrap CI)")
    for col in ("family", "n", "ASR", "95% CI", "blocked"):
        t.add_column(col, justify="right")
    rows = rep["families"] + ([{"family": "all attacks", **rep["attacks"]}] if "attacks" in rep else [])
    for r in rows:
        t.add_row(r["family"], str(r["n"]), f"{r['asr']:.3f}", f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]", f"{r['blocked']:.3f}")
    if "benign" in rep:
        b = rep["benign"]
        t.add_row("benign (blocked)", str(b["n"]), "-", f"[{b['ci'][0]:.3f}, {b['ci'][1]:.3f}]", f"{b['blocked']:.3f}")
    Console(soft_wrap=True).print(t)


def register(app: typer.Typer) -> None:
    for module in EXTRA_COMMANDS:
        importlib.import_module(module).register(safety_app)
    app.add_typer(safety_app, name="safety")
