"""`lmforge safety interp`: the interpretability tools run on one prompt, written as JSON and PNG heatmaps."""
from __future__ import annotations

from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.outputs import atomic_write_json
from lmforge.safety.interp import (
    activation_patching,
    attention_patterns,
    attribution_patching,
    head_scores,
    logit_difference,
    logit_lens,
    repeated_random_tokens,
)


def heatmap(values: torch.Tensor, path: Path, title: str, xlabel: str, ylabel: str,
            xticks: list[str] | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, values.shape[1] * 0.4 + 2), max(3, values.shape[0] * 0.35 + 1.5)))
    image = ax.imshow(values.detach().float().numpy(), aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if xticks:
        ax.set_xticks(range(len(xticks)), xticks, rotation=90, fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


@torch.no_grad()
def _lens_table(model, tok, ids: torch.Tensor, top: int = 3, tuned=None) -> list[dict]:
    lens = (logit_lens(model, ids) if tuned is None else tuned(model, ids))[:, 0, -1].float()  # [L, V], last position
    table = []
    for layer, row in enumerate(lens):
        probs = row.softmax(-1)
        best = probs.topk(top)
        table.append({"layer": layer, "top": [{"token": tok.decode([int(i)]), "p": round(float(p), 4)}
                                              for p, i in zip(best.values, best.indices)]})
    return table


def _fit_lens(model, tok, text: str, steps: int):
    """A tuned lens fit on `text` in windows of up to 64 tokens (batches of 8 windows)."""
    from lmforge.safety.tuned_lens import fit_tuned_lens
    ids = tok.encode(text)
    width = min(64, model.cfg.max_seq_len)
    windows = [ids[i:i + width] for i in range(0, len(ids) - width + 1, width)]
    if not windows:
        raise LmforgeError(f"the tuned-lens text has {len(ids)} tokens; it needs at least {width}")
    device = next(model.parameters()).device
    batches = [torch.tensor(windows[i:i + 8], device=device) for i in range(0, len(windows), 8)]
    return fit_tuned_lens(model, batches, steps)


def interp_report(model, tok, prompt: str, corrupt: str | None, out: Path, half: int = 16,
                  tuned_lens_text: str | None = None, tuned_lens_steps: int = 200) -> dict:
    """Logit lens of the prompt's last position (and a tuned lens fit on `tuned_lens_text`), attention
    maps, induction and previous-token head scores (on repeated random tokens), and, with a corrupted
    prompt of the same length in tokens, activation and attribution patching of the clean top token's
    logit difference."""
    model.eval()
    ids = torch.tensor([tok.encode(prompt)], device=next(model.parameters()).device)
    if ids.shape[1] == 0:
        raise LmforgeError("the prompt is empty after tokenisation")
    if ids.shape[1] > model.cfg.max_seq_len:
        raise LmforgeError(f"the prompt has {ids.shape[1]} tokens; the model takes at most {model.cfg.max_seq_len}")
    out.mkdir(parents=True, exist_ok=True)
    labels = [tok.decode([int(i)]) for i in ids[0]]
    result = {"prompt_tokens": labels, "logit_lens": _lens_table(model, tok, ids)}
    if tuned_lens_text is not None:
        result["tuned_lens"] = _lens_table(model, tok, ids, tuned=_fit_lens(model, tok, tuned_lens_text, tuned_lens_steps))
    patterns = attention_patterns(model, ids)  # [L, 1, H, T, T]
    for layer in range(patterns.shape[0]):
        heatmap(patterns[layer, 0].mean(0), out / f"attention_layer{layer}.png", f"layer {layer}: mean over heads",
                "key position", "query position", labels)
    vocab = min(model.cfg.vocab_size, tok.vocab_size)
    induction, previous = head_scores(attention_patterns(model, repeated_random_tokens(vocab, half, 4).to(ids.device)),
                                      half)
    result["induction_scores"], result["previous_token_scores"] = induction.tolist(), previous.tolist()
    heatmap(induction, out / "induction_heads.png", "induction score", "head", "layer")
    heatmap(previous, out / "previous_token_heads.png", "previous-token score", "head", "layer")
    if corrupt is not None:
        bad = torch.tensor([tok.encode(corrupt)], device=ids.device)
        if bad.shape != ids.shape:
            raise LmforgeError(f"the corrupted prompt has {bad.shape[1]} tokens, the prompt {ids.shape[1]}: "
                               "patching needs the same length")
        with torch.no_grad():
            right, wrong = int(model(ids)[0, -1].argmax()), int(model(bad)[0, -1].argmax())
        if right == wrong:
            wrong = int(model(ids)[0, -1].topk(2).indices[1])
        metric = logit_difference(right, wrong)
        patched = activation_patching(model, ids, bad, metric)
        attributed = attribution_patching(model, ids, bad, metric)
        result["patching"] = {"metric": f"logit({tok.decode([right])!r}) - logit({tok.decode([wrong])!r})",
                              "activation": patched.tolist(), "attribution": attributed.tolist()}
        heatmap(patched, out / "activation_patching.png", "activation patching", "position", "layer (0 = embed)", labels)
        heatmap(attributed, out / "attribution_patching.png", "attribution patching", "position",
                "layer (0 = embed)", labels)
    atomic_write_json(out / "interp.json", result)
    return result
