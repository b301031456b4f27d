"""Direct Preference Optimisation as an objective on the shared training loop.

The reference model's log-probs never need a second model in memory: they are computed once,
before training, from the starting weights and cached (in memory, and in train.out keyed by a
fingerprint of the data and the weights, so a resumed run reuses them instead of scoring with the
half-trained weights); or, for a model carrying LoRA adapters, computed on the fly with the
adapters switched off (`adapters_disabled`: the frozen base is the reference). `lora.r > 0` in the
recipe does the latter: no reference pass, no cache, no second copy.

`dpo.loss_type` also takes the rest of the family on the same pairs:
- simpo, orpo: reference-free (no reference pass, no cache); the log-probs are averaged over each
  completion's tokens; ORPO adds the token-mean NLL of the chosen completions (its SFT term).
- kto: unpaired by design, fed from pairs split in two (chosen = desirable, rejected = undesirable).
  Its reference point z0 = max(0, mean(log pi - log pi_ref)) is estimated, as in TRL, on mismatched
  rows: pair i's prompt with pair i+1's completions (a fixed shift over the data set, so their
  reference log-probs are cached with the rest), averaged over each micro-batch, without gradient.

Every held-out evaluation also logs `val_win_rate`: the policy against the starting model on the
first dpo.win_rate_prompts held-out prompts (of those with room for dpo.win_rate_tokens more tokens
within train.seq_len), both completing greedily, judged by closeness to the
chosen completion (lmforge.align.win_rate). The start's completions are made once, from the
starting weights (or, with LoRA, the adapters switched off).
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import load_file, save_file

from lmforge.align.finetune_config import LoraHooks, LoraSettings
from lmforge.align.lora import adapters_disabled, lora_layers
from lmforge.align.preference import (
    DPO_LOSS_TYPES,
    PreferenceLoss,
    dpo_loss,
    kto_loss,
    orpo_loss,
    simpo_loss,
)
from lmforge.align.preference_data import (
    IGNORE,
    PairExample,
    PairLoader,
    build_pair_examples,
    collate_pairs,
    completion_logps,
    read_preference_jsonl,
    stdlib_pairs,
)
from lmforge.align.sft import pad_token_id
from lmforge.align.win_rate import chosen_texts, greedy_texts, win_rate
from lmforge.config import check_non_negative, check_positive, to_dict
from lmforge.errors import LmforgeError
from lmforge.model import load
from lmforge.outputs import atomic_write_bytes, claim_output_dir
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import latest_checkpoint
from lmforge.train.config import TrainConfig
from lmforge.train.starting_point import starting_point
from lmforge.train.trainer import TRAIN_FILES, fit, resolve_device

REFERENCE_FILE = "reference_logps.safetensors"
LOSS_TYPES = (*DPO_LOSS_TYPES, "kto", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")
DPO_FILES = [*TRAIN_FILES, REFERENCE_FILE]


@dataclass
class DPOConfig:
    data: str = ""              # JSONL with prompt/chosen/rejected per line; "" -> stdlib real vs corrupted bodies
    val_data: str = ""          # held-out JSONL; "" -> the stdlib val split when data is "", else none
    tokenizer: str = ""         # "" -> the model's own
    max_examples: int = 1000
    val_examples: int = 64
    beta: float = 0.1           # SimPO's paper uses 2.0-2.5; ORPO's beta is the paper's lambda
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge | robust | kto | simpo | orpo
    label_smoothing: float = 0.0  # cDPO for sigmoid and simpo, the flip rate for robust
    simpo_gamma: float = 0.5    # SimPO's target reward margin
    desirable_weight: float = 1.0    # KTO's lambda_D
    undesirable_weight: float = 1.0  # KTO's lambda_U
    data_seed: int = 0          # the default data's corruptions
    chat: bool = False          # format pairs with the chat template (prompt = user turn, completions = replies)
    win_rate_prompts: int = 16  # held-out prompts for val_win_rate against the starting model (0: off)
    win_rate_tokens: int = 64   # greedy tokens per completion for the win-rate

    def __post_init__(self):
        check_positive(self, "dpo", "max_examples", "val_examples", "beta", "desirable_weight",
                       "undesirable_weight")
        check_non_negative(self, "dpo", "simpo_gamma", "win_rate_prompts")
        check_positive(self, "dpo", "win_rate_tokens")
        if self.loss_type not in LOSS_TYPES:
            raise LmforgeError(f"dpo.loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if not 0 <= self.label_smoothing < 0.5:
            raise LmforgeError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type in ("hinge", "ipo", "kto", "orpo"):
            raise LmforgeError(f"dpo.label_smoothing applies to sigmoid, robust and simpo only, not "
                               f"{self.loss_type!r}; leave it at 0")

    @property
    def reference_free(self) -> bool:
        return self.loss_type in REFERENCE_FREE


@dataclass
class DPORecipe:
    """An optimizer step sees micro_batch * grad_accum pairs (grad_accum from global_batch_tokens as usual)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)


# --- reference log-probs ----------------------------------------------------------------------------
@torch.no_grad()
def reference_logps(model, examples: list[PairExample], pad_id: int, batch: int = 8) -> torch.Tensor:
    """[N, 2] summed completion log-probs (chosen, rejected) of every pair under `model` (eval mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        b = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items()}
        logps = completion_logps(model, b)
        out.append(torch.stack([logps[:len(chunk)], logps[len(chunk):]], dim=1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 2)


def fingerprint(model, *example_lists: list[PairExample]) -> str:
    """sha256 of the weights and the tokenised pairs: a cache made for anything else is not used."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    for examples in example_lists:
        h.update(b"|")
        for e in examples:
            h.update(repr((e.prompt, e.chosen, e.rejected)).encode())
    return h.hexdigest()


def cached_reference(model, train: list[PairExample], val: list[PairExample], pad_id: int,
                     path: Path | None, console: Console) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs of the train and val pairs: read from `path` when its fingerprint matches,
    else computed with `model` and written there (atomically)."""
    key = fingerprint(model, train, val)
    if path is not None and path.is_file():
        try:
            from safetensors import safe_open
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception:  # noqa: BLE001 (an unreadable cache is recomputed)
            meta = {}
        if meta.get("fingerprint") == key:
            cached = load_file(str(path))
            console.print(f"reference log-probs: cached ({path})", highlight=False)
            return cached["train"], cached["val"]
    ref_train, ref_val = reference_logps(model, train, pad_id), reference_logps(model, val, pad_id)
    if path is not None:
        tmp = path.with_name(path.name + ".tmp")
        save_file({"train": ref_train.contiguous(), "val": ref_val.contiguous()}, str(tmp),
                  metadata={"fingerprint": key})
        atomic_write_bytes(path, tmp.read_bytes())
        tmp.unlink()
    console.print(f"reference log-probs: computed for {len(train)} + {len(val)} pairs", highlight=False)
    return ref_train, ref_val


# --- the objective -----------------------------------------------------------------------------------
def mismatched(examples: list[PairExample], max_len: int | None = None) -> list[PairExample]:
    """KTO's KL rows: pair i's prompt with pair i+1's completions (cut to fit max_len tokens)."""
    out = []
    for i, e in enumerate(examples):
        nxt = examples[(i + 1) % len(examples)]
        room = None if max_len is None else max(max_len - len(e.prompt), 1)
        out.append(PairExample(e.prompt, nxt.chosen[:room], nxt.rejected[:room]))
    return out


def reference_rows(cfg: DPOConfig, examples: list[PairExample], max_len: int | None = None) -> list[PairExample]:
    """The rows whose reference log-probs the loss needs: the pairs, then (KTO) their KL rows."""
    return examples + mismatched(examples, max_len) if cfg.loss_type == "kto" else examples


class DPOObjective(LoraHooks):
    """DPO-family loss on pairs. With ref_train/ref_val (from `cached_reference` on `reference_rows`)
    the reference is the cache; without, the model must carry LoRA adapters and the reference is the
    model with them disabled. SimPO and ORPO use no reference."""

    def __init__(self, tok: Tokenizer | None, train: list[PairExample], val: list[PairExample], cfg: DPOConfig,
                 eval_batch: int, pad_id: int, ref_train: torch.Tensor | None = None,
                 ref_val: torch.Tensor | None = None, vocab_size: int | None = None, max_len: int | None = None):
        self.tok, self.train, self.val, self.cfg, self.eval_batch = tok, train, val, cfg, eval_batch
        self.pad_id, self.ref_train, self.ref_val = pad_id, ref_train, ref_val
        self.vocab_size = vocab_size if vocab_size is not None else tok.vocab_size
        self.kl_train, self.kl_val = mismatched(train, max_len), mismatched(val, max_len)
        # the first held-out prompts that leave room for the completion within the sequence length
        room = [e for e in val if max_len is None or len(e.prompt) + cfg.win_rate_tokens < max_len]
        self.win_examples = room[:cfg.win_rate_prompts] if tok is not None else []
        self.start_texts: list[str] | None = None  # the starting model's completions (`start_completions`)

    def start_completions(self, start_model, autocast) -> list[str]:
        """The starting model's greedy completions of the win-rate prompts (kept for every evaluation)."""
        self.start_texts = self.completions(start_model, autocast)
        return self.start_texts

    def completions(self, model, autocast) -> list[str]:
        return greedy_texts(model, self.tok, [e.prompt for e in self.win_examples], self.cfg.win_rate_tokens,
                            self.pad_id, autocast)

    def win_rate(self, model, autocast) -> float:
        """Held-out win-rate of `model` against the starting model (see lmforge.align.win_rate)."""
        if self.start_texts is None:
            if not lora_layers(model):
                raise LmforgeError("the win-rate needs the starting model's completions (start_completions) "
                                   "or a model with LoRA adapters")
            with adapters_disabled(model):
                self.start_completions(model, autocast)
        return win_rate(self.completions(model, autocast), self.start_texts, chosen_texts(self.tok, self.win_examples))

    def batches(self, micro_batch: int, seed: int) -> PairLoader:
        return PairLoader(self.train, micro_batch, seed, self.pad_id)

    def loss_tokens(self, batch) -> int:
        return batch["tokens"].shape[0] // 2  # the loss is a mean over pairs

    def reference(self, model, batch, cache: torch.Tensor | None, offset: int = 0) -> torch.Tensor:
        """[2B] reference log-probs of the batch's rows (chosen then rejected); `offset` picks the
        cache's KL rows (KTO: they follow the pairs)."""
        if cache is not None:
            ref = cache[batch["index"].cpu() + offset].to(batch["tokens"].device)
            return torch.cat([ref[:, 0], ref[:, 1]])
        if not lora_layers(model):
            raise LmforgeError("DPO needs precomputed reference log-probs or a model with LoRA adapters")
        with torch.no_grad(), adapters_disabled(model):
            return completion_logps(model, batch)

    def pair_loss(self, model, batch, cache, kl_rows: list[PairExample]) -> tuple[torch.Tensor, dict[str, float]]:
        """(mean loss, metrics) of a collated batch; `kl_rows`: the split's KTO KL rows."""
        cfg = self.cfg
        logps = completion_logps(model, batch)
        b = logps.shape[0] // 2
        extra = {}
        if cfg.reference_free:
            lengths = (batch["targets"] != IGNORE).sum(-1).clamp(min=1).to(logps.dtype)
            avg = logps / lengths
            if cfg.loss_type == "simpo":
                out = simpo_loss(avg[:b], avg[b:], beta=cfg.beta, gamma=cfg.simpo_gamma,
                                 label_smoothing=cfg.label_smoothing)
                loss = out.loss
            else:  # orpo: odds-ratio term + the NLL of the chosen completions (token mean)
                out = orpo_loss(avg[:b], avg[b:], beta=cfg.beta)
                nll = -logps[:b].sum() / lengths[:b].sum()
                loss = nll + out.loss
                extra["nll"] = float(nll.detach())
        elif cfg.loss_type == "kto":
            ref = self.reference(model, batch, cache).to(logps.dtype)
            rows = [kl_rows[i] for i in batch["index"].tolist()]
            kl_batch = {k: v.to(batch["tokens"].device) for k, v in collate_pairs(rows, self.pad_id).items()}
            kl_batch["index"] = batch["index"]
            with torch.no_grad():
                kl_policy = completion_logps(model, kl_batch)
            kl_ref = self.reference(model, kl_batch, cache, offset=len(kl_rows)).to(logps.dtype)
            desirable = torch.arange(2 * b, device=logps.device) < b  # chosen rows desirable, rejected not
            k = kto_loss(logps, ref, desirable, kl_policy_logps=kl_policy, kl_ref_logps=kl_ref, beta=cfg.beta,
                         desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight)
            out, loss = PreferenceLoss(k.losses, k.rewards[:b], k.rewards[b:]), k.loss
            extra["kl"] = float(k.kl)
        else:
            ref = self.reference(model, batch, cache).to(logps.dtype)
            out = dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], beta=cfg.beta, loss_type=cfg.loss_type,
                           label_smoothing=cfg.label_smoothing)
            loss = out.loss
        return loss, {**metrics(out), **extra}

    def loss(self, model, batch):
        return self.pair_loss(model, batch, self.ref_train, self.kl_train)

    def evaluate(self, model, autocast) -> dict[str, float]:
        if not self.val:
            return {}
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        sums: dict[str, float] = {}
        with torch.no_grad(), autocast():
            for i in range(0, len(self.val), self.eval_batch):
                chunk = self.val[i:i + self.eval_batch]
                batch = {k: v.to(device) for k, v in collate_pairs(chunk, self.pad_id).items()}
                batch["index"] = torch.arange(i, i + len(chunk))
                loss, extra = self.pair_loss(model, batch, self.ref_val, self.kl_val)
                for k, v in {"loss": float(loss), **extra}.items():
                    sums[k] = sums.get(k, 0.0) + v * len(chunk)
        model.train(was_training)
        out = {f"val_{k}": v / len(self.val) for k, v in sums.items()}
        if self.win_examples:
            out["val_win_rate"] = self.win_rate(model, autocast)
            out["val_win_rate_prompts"] = len(self.win_examples)
        return out

    def tokenizer(self) -> Tokenizer | None:
        return self.tok


def metrics(out) -> dict[str, float]:
    return {"reward_accuracy": float(out.reward_accuracy), "reward_margin": float(out.reward_margin),
            "chosen_reward": float(out.chosen_rewards.mean()), "rejected_reward": float(out.rejected_rewards.mean())}


# --- the command ---------------------------------------------------------------------------------------
def preference_examples(section, section_name: str, tok: Tokenizer, max_len: int, console: Console,
                        chat: bool = False):
    """(train, val) tokenised pairs from the section's data / val_data settings (shared by dpo and rm)."""
    if section.data:
        train_pairs = read_preference_jsonl(section.data)
        val_pairs = read_preference_jsonl(section.val_data) if section.val_data else []
    else:
        if section.val_data:
            raise LmforgeError(f"{section_name}.val_data needs {section_name}.data (the default data has its own "
                               "val split)")
        train_pairs, val_pairs = stdlib_pairs("train", section.data_seed), stdlib_pairs("val", section.data_seed)
    train, dropped = build_pair_examples(tok, train_pairs, max_len, section.max_examples, chat)
    val, val_dropped = build_pair_examples(tok, val_pairs, max_len, section.val_examples, chat)
    if not train:
        raise LmforgeError(f"no preference pair fits train.seq_len={max_len - 1} tokens")
    console.print(f"preference data: {len(train)} train pairs, {len(val)} held-out "
                  f"({dropped + val_dropped} longer than {max_len} tokens skipped)", highlight=False)
    return train, val


def finetune_dpo(recipe: DPORecipe, model: str | None = None, resume: bool = False,
                 console: Console | None = None) -> dict:
    """DPO of MODEL (or train.init_from; default the bundled SmolLM2-135M-Instruct) into train.out;
    the reference log-probs come from the starting weights, computed once and cached in train.out."""
    console = console or Console()
    tc, dc = recipe.train, recipe.dpo
    path, tok = starting_point(tc, model, dc.tokenizer)
    pad_id = pad_token_id(tok)
    train, val = preference_examples(dc, "dpo", tok, tc.seq_len + 1, console, dc.chat)
    out = claim_output_dir(tc.out, "finetune", DPO_FILES)
    if not resume and latest_checkpoint(out / "ckpt"):  # fit refuses too, but only after the reference pass
        raise LmforgeError(f"{out} already holds checkpoints; pass --resume to continue it, or choose another train.out")
    ref_train = ref_val = None
    objective = DPOObjective(tok, train, val, dc, tc.micro_batch, pad_id, max_len=tc.seq_len + 1)
    # with LoRA the reference (and the win-rate's start) is the frozen base, adapters off, on the fly;
    # SimPO and ORPO need no reference
    if not recipe.lora.enabled and (not dc.reference_free or objective.win_examples):
        start = load(path, dtype=torch.float32, device=resolve_device(tc.device))  # used once, then freed
        if not dc.reference_free:
            ref_train, ref_val = cached_reference(start, reference_rows(dc, train, tc.seq_len + 1),
                                                  reference_rows(dc, val, tc.seq_len + 1), pad_id,
                                                  out / REFERENCE_FILE, console)
        if objective.win_examples:
            objective.start_completions(start, contextlib.nullcontext)
        del start
    objective.ref_train, objective.ref_val = ref_train, ref_val
    objective.lora, objective.base_model = recipe.lora, str(path)
    return fit(objective, tc, to_dict(recipe), None, "finetune", DPO_FILES, resume, console)
