"""DPO: the prompt/completion boundary is exact, the objective's loss equals dpo_loss on log-probs
from plain full logits (fp64), cached reference log-probs equal recomputed ones, the LoRA reference
is exactly the base model, and DPO learns prompt-dependent preferences that a shuffled control cannot."""
import copy
import json
import random

import pytest
import torch
import torch.nn.functional as F

from lmforge.align.dpo import (
    REFERENCE_FILE,
    DPOConfig,
    DPOObjective,
    DPORecipe,
    cached_reference,
    finetune_dpo,
    mismatched,
    reference_logps,
)
from lmforge.align.lora import apply_lora, lora_layers
from lmforge.align.preference import dpo_loss
from lmforge.align.preference_data import (
    IGNORE,
    PreferencePair,
    build_pair_examples,
    collate_pairs,
    corrupt_body,
    read_preference_jsonl,
    stdlib_pairs,
    tokenize_pair,
)
from lmforge.config import load_recipe
from lmforge.errors import LmforgeError
from lmforge.model import load, save
from lmforge.tokenizer import train_tokenizer

from tests.align.helpers import tiny

KEYS = ["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "ember"]
VALUES = ["north", "south", "east", "west", "red", "blue", "green", "gold"]
NOISE = ["please", "now", "tell", "me", "quickly", "kindly", "the", "word"]


def key_value_pairs(rng: random.Random, n: int, shuffled: bool = False) -> list[PreferencePair]:
    """'<noise> <noise> KEY =' -> VALUE[KEY] chosen over another value; shuffled swaps the two at random."""
    pairs = []
    for _ in range(n):
        k = rng.randrange(len(KEYS))
        wrong = rng.choice([v for i, v in enumerate(VALUES) if i != k])
        chosen, rejected = f" {VALUES[k]}", f" {wrong}"
        if shuffled and rng.random() < 0.5:
            chosen, rejected = rejected, chosen
        pairs.append(PreferencePair(f"{rng.choice(NOISE)} {rng.choice(NOISE)} {KEYS[k]} =", chosen, rejected))
    return pairs


def kv_tokenizer():
    return train_tokenizer([" ".join(KEYS + VALUES + NOISE) + " = ="] * 20, vocab_size=300, min_frequency=1)


@pytest.fixture(scope="module")
def tok():
    return kv_tokenizer()


def full_logits_logps(model, ex) -> tuple[float, float]:
    """Reference: each sequence alone (no padding, no mask), full logits, log_softmax, gather, sum."""
    out = []
    for completion in (ex.chosen, ex.rejected):
        ids = torch.tensor([ex.prompt + completion])
        logp = F.log_softmax(model(ids[:, :-1]).double(), dim=-1)[0]
        n = len(ex.prompt)
        out.append(logp[torch.arange(n - 1, ids.shape[1] - 1), ids[0, n:]].sum())
    return out[0], out[1]


def test_prompt_and_completion_are_tokenised_separately(tok):
    pair = PreferencePair("tell me apple =", " north", "south")  # a space right at the boundary
    ex = tokenize_pair(tok, pair)
    assert ex.prompt + ex.chosen == tok.encode_text(pair.prompt) + tok.encode_text(pair.chosen) + [tok.eos_id]
    assert ex.prompt + ex.rejected == tok.encode_text(pair.prompt) + tok.encode_text(pair.rejected) + [tok.eos_id]
    batch = collate_pairs([ex, tokenize_pair(tok, PreferencePair("x", "north east", "y"))], tok.eos_id)
    # the scored targets of row 0 are exactly the chosen completion (EOS included), nothing of the prompt
    row = batch["targets"][0]
    assert row[row != IGNORE].tolist() == ex.chosen
    assert row[row != IGNORE].numel() == len(ex.chosen)
    assert batch["tokens"][2, :len(ex.prompt)].tolist() == ex.prompt  # rejected rows follow the chosen ones


def test_objective_loss_equals_dpo_loss_on_full_logits_fp64(tok):
    model = tiny(tok, dtype=torch.float64)
    reference = tiny(tok, seed=1, dtype=torch.float64)
    examples, _ = build_pair_examples(tok, key_value_pairs(random.Random(0), 6), 64, 6)
    examples[1] = tokenize_pair(tok, PreferencePair("now", " north south east", " red"))  # unequal lengths
    with torch.no_grad():
        ref = torch.tensor([[float(v) for v in full_logits_logps(reference, e)] for e in examples],
                           dtype=torch.float64)
    for loss_type in ("sigmoid", "ipo", "hinge", "robust"):
        cfg = DPOConfig(beta=0.3, loss_type=loss_type, label_smoothing=0.1 if loss_type == "robust" else 0.0)
        obj = DPOObjective(tok, examples, [], cfg, 4, tok.eos_id, ref_train=ref)
        batch = obj.batches(len(examples), seed=3).next_batch()
        loss, extra = obj.loss(model, batch)
        order = batch["index"].tolist()
        logps = [full_logits_logps(model, examples[i]) for i in order]
        expected = dpo_loss(torch.stack([c for c, _ in logps]), torch.stack([r for _, r in logps]),
                            ref[order, 0], ref[order, 1], beta=0.3, loss_type=loss_type,
                            label_smoothing=cfg.label_smoothing)
        torch.testing.assert_close(loss, expected.loss, rtol=1e-10, atol=1e-10)
        assert extra["reward_accuracy"] == pytest.approx(float(expected.reward_accuracy))
        assert extra["reward_margin"] == pytest.approx(float(expected.reward_margin), abs=1e-10)
        # and the gradients agree with the full-logits reference
        g = torch.autograd.grad(loss, model.lm_head.weight)[0]
        g_ref = torch.autograd.grad(expected.loss, model.lm_head.weight)[0]
        torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-10)


def test_reference_cache_equals_recomputation_and_is_keyed_by_weights(tok, tmp_path, capsys):
    from rich.console import Console
    console = Console()
    model = tiny(tok)
    train, _ = build_pair_examples(tok, key_value_pairs(random.Random(1), 10), 64, 10)
    val, _ = build_pair_examples(tok, key_value_pairs(random.Random(2), 4), 64, 4)
    path = tmp_path / REFERENCE_FILE
    first = cached_reference(model, train, val, tok.eos_id, path, console)
    stamp = path.stat().st_mtime_ns
    again = cached_reference(model, train, val, tok.eos_id, path, console)
    assert "cached" in capsys.readouterr().out and path.stat().st_mtime_ns == stamp
    fresh = reference_logps(model, train, tok.eos_id, batch=3), reference_logps(model, val, tok.eos_id, batch=1)
    for a, b, c in zip(first, again, fresh):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-5)
    with torch.no_grad():
        expected = torch.tensor([[float(v) for v in full_logits_logps(model, e)] for e in train])
    torch.testing.assert_close(first[0], expected, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # other weights: the cache must not be used
    changed = cached_reference(model, train, val, tok.eos_id, path, console)
    assert not torch.allclose(changed[0], first[0])


def test_lora_reference_is_the_base_model_exactly(tok):
    base = tiny(tok)
    model = apply_lora(copy.deepcopy(base), r=4, alpha=8)
    torch.manual_seed(5)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.5)  # peft initialises B to 0: make the adapter matter
    examples, _ = build_pair_examples(tok, key_value_pairs(random.Random(3), 5), 64, 5)
    obj = DPOObjective(tok, examples, [], DPOConfig(), 5, tok.eos_id)
    batch = obj.batches(5, seed=0).next_batch()
    ref = obj.reference(model, batch, None)
    with torch.no_grad():
        base_logps = base.token_logprobs(batch["tokens"], batch["targets"], attention_mask=batch["attention_mask"])
        policy = model.token_logprobs(batch["tokens"], batch["targets"], attention_mask=batch["attention_mask"])
    assert torch.equal(ref, base_logps.sum(-1))
    assert not torch.allclose(policy.sum(-1), ref)  # the adapters are on again afterwards
    loss, _ = obj.loss(model, batch)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_default_pairs_are_deterministic_real_vs_corrupted():
    a = [p for _, p in zip(range(20), stdlib_pairs("val", seed=0))]
    b = [p for _, p in zip(range(20), stdlib_pairs("val", seed=0))]
    assert a == b and len(a) == 20
    assert all(p.chosen != p.rejected and p.prompt.rstrip().endswith(('"""', "'''")) for p in a)
    assert corrupt_body("x = 1", random.Random(0)) is None  # nothing to corrupt in one plain line
    assert corrupt_body("if a == b:\n    return 1", random.Random(0)) == "if a != b:\n    return 1"


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n\n{\"prompt\": 1}\n")
    with pytest.raises(LmforgeError, match=r"p.jsonl:3: `prompt` must be a string"):
        read_preference_jsonl(path)
    path.write_text("not json\n")
    with pytest.raises(LmforgeError, match=r"p.jsonl:1: not JSON"):
        read_preference_jsonl(path)
    with pytest.raises(LmforgeError, match="not found"):
        read_preference_jsonl(tmp_path / "missing.jsonl")


def write_pairs(path, pairs):
    path.write_text("".join(json.dumps(vars(p)) + "\n" for p in pairs))
    return str(path)


def implicit_reward_accuracy(policy_dir, start_dir, tok, pairs) -> float:
    examples, _ = build_pair_examples(tok, pairs, 64, len(pairs))
    pol = reference_logps(load(policy_dir), examples, tok.eos_id)
    ref = reference_logps(load(start_dir), examples, tok.eos_id)
    return float(((pol[:, 0] - ref[:, 0]) > (pol[:, 1] - ref[:, 1])).float().mean())


def test_dpo_learns_prompt_dependent_preferences_and_shuffled_control_does_not(tok, tmp_path):
    seed = 0
    start = tmp_path / "start"
    save(tiny(tok, seed), start, tokenizer=tok)
    val_pairs = key_value_pairs(random.Random(100), 64)
    val_data = write_pairs(tmp_path / "val.jsonl", val_pairs)
    common = ["train.seq_len=16", "train.micro_batch=16", "train.global_batch_tokens=256", "train.max_steps=60",
              "train.lr=0.003", "train.warmup=0.1", "train.eval_every=60", "train.ckpt_every=60",
              "train.log_every=20", "train.tensorboard=false", f"train.seed={seed}", "dpo.max_examples=400",
              "dpo.beta=0.1", "dpo.win_rate_tokens=3"]
    acc, win = {}, {}
    for name, shuffled in (("real", False), ("shuffled", True)):
        data = write_pairs(tmp_path / f"{name}.jsonl", key_value_pairs(random.Random(seed), 400, shuffled))
        recipe = load_recipe(DPORecipe, None, [*common, f"dpo.data={data}", f"dpo.val_data={val_data}",
                                               f"train.out={tmp_path / name}"])
        finetune_dpo(recipe, str(start))
        assert (tmp_path / name / REFERENCE_FILE).is_file()
        acc[name] = implicit_reward_accuracy(tmp_path / name / "model", start, tok, val_pairs)
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        win[name] = [r["val_win_rate"] for r in rows if "val_win_rate" in r][-1]
    print(f"held-out implicit-reward accuracy: real {acc['real']:.3f}, shuffled {acc['shuffled']:.3f}; "
          f"win-rate vs the start: real {win['real']:.3f}, shuffled {win['shuffled']:.3f}")
    assert acc["real"] > 0.9
    assert abs(acc["shuffled"] - 0.5) < 0.2
    # what the model writes: closer to the chosen value than the start's completion (measured 0.81),
    # clearly more than for the shuffled control (0.62: it learns to write some value word)
    assert win["real"] >= 0.75 and win["real"] > win["shuffled"] + 0.1


def test_dpo_resume_reuses_the_cached_reference_and_matches_an_uninterrupted_run(tok, tmp_path, capsys):
    from safetensors.torch import load_file
    start = tmp_path / "start"
    save(tiny(tok, 0), start, tokenizer=tok)
    data = write_pairs(tmp_path / "pairs.jsonl", key_value_pairs(random.Random(0), 40))
    common = ["train.seq_len=16", "train.micro_batch=4", "train.global_batch_tokens=128", "train.lr=0.003",
              "train.warmup=0", "train.decay=0",  # a constant lr: the 2-step run's schedule is the 6-step one's start
              "train.ckpt_every=2", "train.eval_every=100", "train.log_every=1", "train.tensorboard=false",
              f"dpo.data={data}"]
    finetune_dpo(load_recipe(DPORecipe, None, [*common, "train.max_steps=6", f"train.out={tmp_path / 'full'}"]),
                 str(start))
    part = [*common, f"train.out={tmp_path / 'part'}"]
    finetune_dpo(load_recipe(DPORecipe, None, [*part, "train.max_steps=2"]), str(start))
    capsys.readouterr()
    finetune_dpo(load_recipe(DPORecipe, None, [*part, "train.max_steps=6"]), str(start), resume=True)
    assert "reference log-probs: cached" in capsys.readouterr().out
    a, b = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("full", "part"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(LmforgeError, match="already holds checkpoints"):
        finetune_dpo(load_recipe(DPORecipe, None, [*part, "train.max_steps=6"]), str(start))


# --- the rest of the family: KTO, SimPO, ORPO through the same command ---------------------------------
def test_kto_simpo_orpo_objective_losses_equal_the_formulas_on_full_logits_fp64(tok):
    """The objective's loss and gradient equal the preference.py formula (itself equal to TRL's, see
    test_preference_losses.py) fed log-probs from plain full logits: sums for KTO (with its KL rows,
    pair i's prompt + pair i+1's completions), per-token means for SimPO/ORPO, plus ORPO's chosen NLL."""
    from lmforge.align.dpo import reference_rows
    from lmforge.align.preference import kto_loss, orpo_loss, simpo_loss
    model = tiny(tok, dtype=torch.float64)
    reference = tiny(tok, seed=1, dtype=torch.float64)
    examples, _ = build_pair_examples(tok, key_value_pairs(random.Random(0), 6), 64, 6)
    examples[1] = tokenize_pair(tok, PreferencePair("now", " north south east", " red"))  # unequal lengths
    for loss_type in ("kto", "simpo", "orpo"):
        cfg = DPOConfig(beta=0.3, loss_type=loss_type, label_smoothing=0.1 if loss_type == "simpo" else 0.0,
                        simpo_gamma=0.4, desirable_weight=1.3, undesirable_weight=0.8)
        ref = None
        if loss_type == "kto":
            with torch.no_grad():
                ref = torch.tensor([[float(v) for v in full_logits_logps(reference, e)]
                                    for e in reference_rows(cfg, examples)], dtype=torch.float64)
            assert ref.shape == (12, 2)
        obj = DPOObjective(tok, examples, [], cfg, 4, tok.eos_id, ref_train=ref)
        batch = obj.batches(4, seed=3).next_batch()
        loss, extra = obj.loss(model, batch)
        order = batch["index"].tolist()
        logps = [full_logits_logps(model, examples[i]) for i in order]
        chosen, rejected = torch.stack([c for c, _ in logps]), torch.stack([r for _, r in logps])
        n_c = torch.tensor([len(examples[i].chosen) for i in order], dtype=torch.float64)
        n_r = torch.tensor([len(examples[i].rejected) for i in order], dtype=torch.float64)
        if loss_type == "kto":
            kl_rows = mismatched(examples)
            assert kl_rows[0].prompt == examples[0].prompt and kl_rows[0].chosen == examples[1].chosen
            with torch.no_grad():
                kl_pol = torch.stack([torch.stack(full_logits_logps(model, kl_rows[i])) for i in order]).T.reshape(-1)
            kl_ref = torch.cat([ref[[6 + i for i in order], 0], ref[[6 + i for i in order], 1]])
            expected = kto_loss(torch.cat([chosen, rejected]), torch.cat([ref[order, 0], ref[order, 1]]),
                                torch.arange(8) < 4, kl_policy_logps=kl_pol, kl_ref_logps=kl_ref, beta=0.3,
                                desirable_weight=1.3, undesirable_weight=0.8)
            assert extra["kl"] == pytest.approx(float(expected.kl), abs=1e-10)
            expected_loss = expected.loss
        elif loss_type == "simpo":
            expected_loss = simpo_loss(chosen / n_c, rejected / n_r, beta=0.3, gamma=0.4, label_smoothing=0.1).loss
        else:
            expected_loss = -chosen.sum() / n_c.sum() + orpo_loss(chosen / n_c, rejected / n_r, beta=0.3).loss
            assert extra["nll"] == pytest.approx(float(-chosen.detach().sum() / n_c.sum()), abs=1e-10)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=1e-10)
        g = torch.autograd.grad(loss, model.lm_head.weight)[0]
        g_ref = torch.autograd.grad(expected_loss, model.lm_head.weight)[0]
        torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type,beta", [("kto", 0.1), ("simpo", 2.0), ("orpo", 1.0)])
def test_kto_simpo_orpo_learn_prompt_dependent_preferences_and_shuffled_control_does_not(tok, tmp_path, loss_type,
                                                                                          beta):
    """Same data and measure as the DPO learning test (held-out chosen-vs-rejected log-ratio accuracy
    against the start); SimPO and ORPO write no reference cache."""
    start = tmp_path / "start"
    save(tiny(tok, 0), start, tokenizer=tok)
    val_pairs = key_value_pairs(random.Random(100), 64)
    common = ["train.seq_len=16", "train.micro_batch=16", "train.global_batch_tokens=256", "train.max_steps=60",
              "train.lr=0.003", "train.warmup=0.1", "train.eval_every=60", "train.ckpt_every=60",
              "train.log_every=20", "train.tensorboard=false", "dpo.max_examples=400", f"dpo.beta={beta}",
              f"dpo.loss_type={loss_type}"]
    acc = {}
    for name, shuffled in (("real", False), ("shuffled", True)):
        data = write_pairs(tmp_path / f"{name}.jsonl", key_value_pairs(random.Random(0), 400, shuffled))
        finetune_dpo(load_recipe(DPORecipe, None, [*common, f"dpo.data={data}", f"train.out={tmp_path / name}"]),
                     str(start))
        assert (tmp_path / name / REFERENCE_FILE).is_file() == (loss_type == "kto")
        acc[name] = implicit_reward_accuracy(tmp_path / name / "model", start, tok, val_pairs)
    print(f"{loss_type}: held-out accuracy real {acc['real']:.3f}, shuffled {acc['shuffled']:.3f}")
    assert acc["real"] > 0.9
    assert abs(acc["shuffled"] - 0.5) < 0.2


def test_kto_resume_reuses_the_cached_reference_with_its_kl_rows(tok, tmp_path, capsys):
    from safetensors.torch import load_file
    start = tmp_path / "start"
    save(tiny(tok, 0), start, tokenizer=tok)
    data = write_pairs(tmp_path / "pairs.jsonl", key_value_pairs(random.Random(0), 40))
    common = ["train.seq_len=16", "train.micro_batch=4", "train.global_batch_tokens=128", "train.lr=0.003",
              "train.warmup=0", "train.decay=0", "train.ckpt_every=2", "train.eval_every=100", "train.log_every=1",
              "train.tensorboard=false", f"dpo.data={data}", "dpo.loss_type=kto"]
    finetune_dpo(load_recipe(DPORecipe, None, [*common, "train.max_steps=4", f"train.out={tmp_path / 'full'}"]),
                 str(start))
    part = [*common, f"train.out={tmp_path / 'part'}"]
    finetune_dpo(load_recipe(DPORecipe, None, [*part, "train.max_steps=2"]), str(start))
    capsys.readouterr()
    finetune_dpo(load_recipe(DPORecipe, None, [*part, "train.max_steps=4"]), str(start), resume=True)
    assert "reference log-probs: cached" in capsys.readouterr().out
    n_pairs = len(build_pair_examples(tok, read_preference_jsonl(data), 17, 1000)[0])
    assert load_file(tmp_path / "part" / REFERENCE_FILE)["train"].shape == (2 * n_pairs, 2)  # pairs + KL rows
    a, b = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("full", "part"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kto_with_lora_takes_its_reference_and_kl_rows_from_the_base(tok):
    base = tiny(tok)
    model = apply_lora(copy.deepcopy(base), r=4, alpha=8)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.5)
    examples, _ = build_pair_examples(tok, key_value_pairs(random.Random(3), 5), 64, 5)
    with torch.no_grad():
        ref = reference_logps(base, examples + mismatched(examples),
                              tok.eos_id)
    cfg = DPOConfig(loss_type="kto")
    on_the_fly = DPOObjective(tok, examples, [], cfg, 5, tok.eos_id)
    cached = DPOObjective(tok, examples, [], cfg, 5, tok.eos_id, ref_train=ref)
    batch = on_the_fly.batches(5, seed=0).next_batch()
    a, ea = on_the_fly.loss(model, batch)
    b, eb = cached.loss(model, batch)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert ea["kl"] == pytest.approx(eb["kl"], abs=1e-6) and ea["kl"] > 0


def test_loss_type_settings_are_checked():
    with pytest.raises(LmforgeError, match="dpo.loss_type must be one of"):
        DPOConfig(loss_type="cpo")
    with pytest.raises(LmforgeError, match="label_smoothing applies to"):
        DPOConfig(loss_type="kto", label_smoothing=0.1)
    with pytest.raises(LmforgeError, match="dpo.desirable_weight"):
        DPOConfig(loss_type="kto", desirable_weight=0)
    with pytest.raises(LmforgeError, match="dpo.simpo_gamma"):
        DPOConfig(loss_type="simpo", simpo_gamma=-1)
    assert DPOConfig(loss_type="simpo").reference_free and not DPOConfig(loss_type="kto").reference_free
