"""GRPO: group rollouts through the serving engine (prompt blocks shared across the group, masks and
truncation flags right, old-policy log-probs equal to a plain full forward, the engine sampling with
the weights of the moment after an update), the objective's loss equal to rl.grpo_loss on reference
log-probs, and a tiny model whose reward rises under GRPO while a random-reward control's does not."""
import contextlib
import random

import pytest
import torch
import torch.nn.functional as F

from lmforge.align.grpo import GRPOConfig, GRPOObjective, with_advantages
from lmforge.align.rl import group_advantages, grpo_loss, mask_truncated
from lmforge.align.rollouts import sample_groups
from lmforge.align.tasks import (
    Task,
    arithmetic_tasks,
    exact_match_reward,
    first_integer,
)
from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig, Transformer

from tests.align.helpers import arithmetic_tokenizer, tiny


@pytest.fixture(scope="module")
def tok():
    return arithmetic_tokenizer()


def eos_prone(tok, seed=0):
    """A random model whose head makes EOS likely at some positions and never at others: all other
    logits are 0, the EOS logit is a random direction of the hidden state."""
    model = tiny(tok, seed)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_id] *= 40
        keep = model.lm_head.weight[tok.eos_id].clone()
        model.lm_head.weight.mul_(0.3)
        model.lm_head.weight[tok.eos_id] = keep
    return model


def reference_logprobs(model, tokens, prompt_len, n):
    """log_softmax of a full forward of the row alone, gathered at the completion's n tokens."""
    ids = tokens[:prompt_len + n][None]
    logp = F.log_softmax(model(ids[:, :-1]).double(), dim=-1)[0]
    return logp[torch.arange(prompt_len - 1, prompt_len + n - 1), ids[0, prompt_len:]]


def test_tasks_are_seeded_split_and_scored_by_the_first_integer():
    train, val = arithmetic_tasks(300, 1), arithmetic_tasks(50, 1, "val")
    assert train == arithmetic_tasks(300, 1) and train != arithmetic_tasks(300, 2)
    assert not {t.prompt for t in train} & {t.prompt for t in val}
    a, b = (int(x) for x in train[0].prompt.removeprefix("What is ").split("?")[0].split(" + "))
    assert train[0].answer == a + b
    task = Task("What is 2 + 3? Answer:", 5)
    assert exact_match_reward(" 5, since 2+3", task) == 1.0
    assert exact_match_reward(" 15", task) == 0.0 and exact_match_reward(" five", task) == 0.0
    assert first_integer("x -12 4") == -12
    with pytest.raises(LmforgeError, match="grpo.ops"):
        arithmetic_tasks(3, 0, ops="/")


def test_rollouts_share_the_prompt_masks_truncation_and_old_logprobs_equal_a_full_forward(tok):
    model = eos_prone(tok)
    tasks = arithmetic_tasks(3, 5)
    prompts = [tok.encode(t.prompt) for t in tasks]
    G, max_tokens = 4, 6
    r = sample_groups(model, tok, prompts, G, max_tokens=max_tokens, temperature=1.0, seed=3, pad_id=tok.eos_id,
                      tasks=tasks, reward_fn=exact_match_reward, block_size=4)
    # the G-1 followers of each prompt reuse its full blocks (all but the last prompt token is never recomputed)
    assert r.prefix_hits == sum((G - 1) * ((len(p) - 1) // 4) * 4 for p in prompts) > 0
    lens = r.completion_mask.sum(1).long()
    assert 0 < int(r.truncated.sum()) < len(lens), "the fixture should give both ended and cut completions"
    for i in range(len(lens)):
        p, n = len(prompts[i // G]), int(lens[i])
        assert r.tokens[i, :p].tolist() == prompts[i // G]
        assert r.tokens[i, p:p + n].tolist() == r.completion_ids[i, :n].tolist()
        assert r.completion_mask[i, n:].sum() == 0
        ended = r.completion_ids[i, n - 1] == tok.eos_id
        assert bool(r.truncated[i]) == (not ended) and (ended or n == max_tokens)
        expected = reference_logprobs(model, r.tokens[i], p, n)
        torch.testing.assert_close(r.old_logprobs[i, :n].double(), expected, rtol=0, atol=2e-5)
    assert len({tuple(r.completion_ids[i].tolist()) for i in range(G)}) > 1  # a group is G different samples


def test_after_an_update_the_engine_samples_with_the_new_weights(tok):
    """Stale KV or prefix blocks from before an update would make the engine's sampling log-probs
    differ from a full forward of the updated model (the test fails when the engine is reused across
    updates)."""
    model = tiny(tok)
    tasks = arithmetic_tasks(2, 6)
    prompts = [tok.encode(t.prompt) for t in tasks]
    sample_groups(model, tok, prompts, 3, max_tokens=4, temperature=1.0, seed=1, pad_id=tok.eos_id)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    r = sample_groups(model, tok, prompts, 3, max_tokens=4, temperature=1.0, seed=1, pad_id=tok.eos_id)
    for i in range(r.tokens.shape[0]):
        p, n = len(prompts[i // 3]), int(r.completion_mask[i].sum())
        torch.testing.assert_close(r.old_logprobs[i, :n].double(), reference_logprobs(model, r.tokens[i], p, n),
                                   rtol=0, atol=2e-5)


@pytest.mark.parametrize("aggregation,scale,beta", [("grpo", "group", 0.0), ("dr_grpo", "none", 0.04),
                                                    ("dapo", "batch", 0.1)])
def test_objective_loss_equals_grpo_loss_on_reference_logprobs(tok, aggregation, scale, beta):
    model = eos_prone(tok)
    tasks = arithmetic_tasks(3, 7)
    prompts = [tok.encode(t.prompt) for t in tasks]
    r = sample_groups(model, tok, prompts, 4, max_tokens=6, temperature=1.0, seed=2, pad_id=tok.eos_id)
    g = torch.Generator().manual_seed(0)
    r.rewards = torch.randint(0, 2, (12,), generator=g).float()
    m = r.completion_mask
    sign = (-1.0) ** (torch.arange(m.shape[0])[:, None] + torch.arange(m.shape[1]))  # ratios off 1 both ways
    r.old_logprobs = r.old_logprobs + (0.5 * sign + 0.1 * torch.randn(m.shape, generator=g)) * m
    r.ref_logprobs = r.old_logprobs + 0.5 * torch.randn(r.old_logprobs.shape, generator=g) * m
    model = model.double()
    cfg = GRPOConfig(group_size=4, max_tokens=6, scale=scale, aggregation=aggregation, beta=beta)
    obj = GRPOObjective(tok, tasks, [], cfg, 3, tok.eos_id, reference=lambda d: model)
    loss, metrics = obj.loss(model, with_advantages(r.to_dict(), cfg))
    grads = torch.autograd.grad(loss, [model.lm_head.weight, model.embed_tokens.weight])

    lens = m.sum(1).long()
    lp = torch.zeros(m.shape, dtype=torch.float64)
    rows = []
    for i in range(12):
        n = int(lens[i])
        row = reference_logprobs(model, r.tokens[i], int(r.prompt_lens[i]), n)
        rows.append(row)
    lp = torch.stack([F.pad(x, (0, m.shape[1] - x.numel())) for x in rows])
    adv = group_advantages(r.rewards.double(), 4, scale=scale)
    expected = grpo_loss(lp, r.old_logprobs.double(), adv.advantages, mask_truncated(m.double(), r.truncated),
                         ref_logprobs=r.ref_logprobs.double(), beta=beta, eps_low=0.2, eps_high=0.28,
                         aggregation=aggregation, max_len=6)
    torch.testing.assert_close(loss, expected.loss, rtol=1e-9, atol=1e-12)
    expected_grads = torch.autograd.grad(expected.loss, [model.lm_head.weight, model.embed_tokens.weight])
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)
    assert metrics["clip_low"] + metrics["clip_high"] > 0
    assert metrics["zero_variance_groups"] == pytest.approx(float(adv.zero_variance_fraction))
    assert metrics["kl"] == pytest.approx(float(expected.kl), abs=1e-9)
    with torch.no_grad():  # entropy of the full-forward distributions at the completion positions
        ents = []
        for i in range(12):
            p, n = int(r.prompt_lens[i]), int(lens[i])
            logp = F.log_softmax(model(r.tokens[i, :p + n - 1][None]).double(), dim=-1)[0, p - 1:]
            ents.append(-(logp.exp() * logp).sum(-1))
    assert metrics["entropy"] == pytest.approx(float(torch.cat(ents).mean()), rel=1e-9)


def digit_share(text: str, task: Task) -> float:
    """A dense verifiable reward a random tiny model can climb: the share of digit characters."""
    return sum(c.isdigit() for c in text) / max(len(text), 1)


def grpo_run(tok, seed: int, reward_fn, steps: int = 30) -> tuple[float, float]:
    """(held-out digit share before, after) `steps` GRPO updates of a tiny model with `reward_fn`."""
    model = tiny(tok, seed)
    cfg = GRPOConfig(group_size=8, max_tokens=4, aggregation="dapo", mask_truncated=False)
    obj = GRPOObjective(tok, arithmetic_tasks(64, seed), [], cfg, 4, tok.eos_id, reward_fn=reward_fn)
    obj.prepare_model(model)
    loader = obj.batches(4, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    val = arithmetic_tasks(8, 99, "val")

    def score():
        r = sample_groups(model, tok, [tok.encode(t.prompt) for t in val], 8, max_tokens=4, temperature=1.0,
                          seed=123, pad_id=tok.eos_id, tasks=val, reward_fn=digit_share)
        return float(r.rewards.mean())
    before = score()
    for _ in range(steps):
        loss, _ = obj.loss(model, loader.next_batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, score()


def test_win_rate_against_the_start_counts_questions_won_and_lost(tok):
    """val_win_rate: right now and wrong at the start; val_loss_rate: the reverse (per held-out
    question, from each model's own greedy rollouts; the start is evaluated once)."""
    start, policy = tiny(tok, 0), tiny(tok, 1)
    odd = lambda text, task: float((sum(map(ord, text)) + task.answer) % 2)  # noqa: E731 (0/1, varies by model and task)
    cfg = GRPOConfig(group_size=2, max_tokens=4, val_tasks=24)
    val = arithmetic_tasks(24, 0, "val")
    loads = []
    obj = GRPOObjective(tok, [], val, cfg, 1, tok.eos_id, reward_fn=odd, start=lambda d: loads.append(d) or start)
    plain = contextlib.nullcontext
    before, after = start.eval(), policy.eval()
    before, after = (obj.held_out_rewards(m, plain) for m in (before, after))
    out = obj.evaluate(policy, plain)
    obj.evaluate(policy, plain)
    won, lost = float((after * (1 - before)).mean()), float((before * (1 - after)).mean())
    assert won > 0 and lost > 0 and won != lost, (won, lost)
    assert out["val_win_rate"] == pytest.approx(won) and out["val_loss_rate"] == pytest.approx(lost)
    assert out["val_exact_match"] == pytest.approx(float(after.mean())) and len(loads) == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reward_rises_under_grpo_and_not_under_random_rewards(tok, seed):
    before, after = grpo_run(tok, seed, digit_share)
    rng = random.Random(seed)
    c_before, c_after = grpo_run(tok, seed, lambda text, task: rng.random())
    assert after - before >= 0.25, (before, after)  # measured 0.38-0.41 over seeds 0-2
    assert c_after - c_before <= 0.1, (c_before, c_after)  # measured -0.01-+0.02


def test_finetune_grpo_resumes_bit_for_bit_with_a_kl_reference_and_the_cli_runs(tok, tmp_path):
    """4 steps straight equal 2 steps + --resume 2 more (same prompts, same samples, the KL reference
    reloaded from the starting weights); the CLI runs the same recipe grammar."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from lmforge.align.grpo import GRPORecipe, finetune_grpo
    from lmforge.cli import app
    from lmforge.config import load_recipe
    from lmforge.model import save

    start = tmp_path / "start"
    save(tiny(tok, 0), start, tokenizer=tok)
    common = ["train.seq_len=24", "train.micro_batch=2", "train.global_batch_tokens=96", "train.lr=0.003",
              "train.warmup=0", "train.decay=0", "train.ckpt_every=2", "train.eval_every=2", "train.log_every=1",
              "train.tensorboard=false", "grpo.group_size=4", "grpo.max_tokens=4", "grpo.beta=0.1",
              "grpo.val_tasks=4", "grpo.mask_truncated=false"]
    full = finetune_grpo(load_recipe(GRPORecipe, None, [*common, "train.max_steps=4", f"train.out={tmp_path / 'full'}"]),
                         str(start))
    part = [*common, f"train.out={tmp_path / 'part'}"]
    finetune_grpo(load_recipe(GRPORecipe, None, [*part, "train.max_steps=2"]), str(start))
    finetune_grpo(load_recipe(GRPORecipe, None, [*part, "train.max_steps=4"]), str(start), resume=True)
    a, b = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("full", "part"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    s = load_file(start / "model.safetensors")
    assert not all(torch.equal(a[k], s[k]) for k in a)  # it trained
    assert full["steps"] == 4

    result = CliRunner().invoke(app, ["finetune", "grpo", str(start), *common, "train.max_steps=1",
                                      f"train.out={tmp_path / 'cli'}"])
    assert result.exit_code == 0, result.output
    assert "done: 1 steps" in result.output
    bad = CliRunner().invoke(app, ["finetune", "grpo", str(start), "grpo.aggregation=mean", f"train.out={tmp_path / 'x'}"])
    assert isinstance(bad.exception, LmforgeError) and "grpo.aggregation" in str(bad.exception)


# --- unit-test rewards in the sandbox ---------------------------------------------------------------
CORRECT = {"add": "    return x + {k}", "times": "    return x * {k}", "count": "    return sum(1 for v in xs if v > {k})",
           "first": "    return s[:{k}][::-1]"}
WRONG = {"add": "    return x - {k}", "times": "    return x + {k}", "count": "    return len(xs)",
         "first": "    return s[::-1][:{k}]"}


def test_unit_test_reward_runs_each_program_in_the_sandbox_and_passes_only_correct_bodies():
    """Reference: the bodies are written by hand, right and wrong, for every task template; the
    sandbox's own verdict on the assembled program decides the reward."""
    from lmforge.align.tasks import code_program, coding_tasks, unit_test_reward
    from lmforge.eval.sandbox import SandboxLimits, run_program

    tasks = coding_tasks(40, 0)
    seen = {}
    for t in tasks:  # one task per template
        seen.setdefault(t.header.split("(")[0].split()[1].split("_")[0], t)
    assert set(seen) == set(CORRECT)
    assert not {t.header for t in tasks} & {t.header for t in coding_tasks(40, 0, "val")}
    for kind, task in seen.items():
        k = int(next(p for p in task.header.split("(")[0].split("_") if p.isdigit()))
        good, bad = CORRECT[kind].format(k=k), WRONG[kind].format(k=k)
        assert unit_test_reward(good, task) == 1.0, code_program(good, task)
        assert unit_test_reward(bad, task) == 0.0, code_program(bad, task)
    task = seen["add"]
    escape = "    import socket; socket.create_connection(('1.1.1.1', 80)); return x + 2"
    assert unit_test_reward(escape, task) == 0.0  # no network: the program fails, it is not rewarded
    quick = SandboxLimits(cpu_seconds=1, wall_seconds=3)
    assert unit_test_reward("    while True: pass", task, quick) == 0.0  # a timeout is a failure, not a hang
    assert run_program(code_program("    return x", task)).status == "failed"


@pytest.mark.slow
def test_finetune_grpo_on_coding_tasks_scores_completions_in_the_sandbox(tok, tmp_path):
    """grpo.task=code: one step on coding tasks; every completion's reward is the sandbox's verdict
    (a random model's bodies all fail: reward 0, held-out pass@1 0), logged as val_pass_at_1."""
    import json

    from lmforge.align.grpo import GRPORecipe, finetune_grpo
    from lmforge.config import load_recipe
    from lmforge.model import save

    start = tmp_path / "start"
    torch.manual_seed(0)
    save(Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                 hidden_dim=64, max_seq_len=256)), start, tokenizer=tok)
    calls = []

    def counting(text, task):
        from lmforge.align.tasks import unit_test_reward
        calls.append(text)
        return unit_test_reward(text, task)
    recipe = load_recipe(GRPORecipe, None, ["train.seq_len=160", "train.micro_batch=1", "train.global_batch_tokens=160",
                                            "train.max_steps=1", "train.tensorboard=false", "grpo.task=code",
                                            "grpo.group_size=2", "grpo.max_tokens=3", "grpo.val_tasks=1",
                                            f"train.out={tmp_path / 'out'}"])
    finetune_grpo(recipe, str(start), reward_fn=counting)
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(calls) == 2 and rows[0]["reward_mean"] == 0.0
    assert [r["val_pass_at_1"] for r in rows if "val_pass_at_1" in r] == [0.0]
