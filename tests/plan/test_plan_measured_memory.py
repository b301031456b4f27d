"""The planner's fp32 figures against what a real lmforge model holds on CPU.

Model states are measured as the bytes of every parameter, gradient and AdamW state tensor after
one optimizer step; activations as the bytes of every distinct tensor autograd saves for the
backward pass (saved_tensors_hooks), excluding the parameters themselves.
"""
import pytest
import torch

from lmforge.model import Transformer, lm_loss
from lmforge.model.config import ModelConfig, preset
from lmforge.plan import TrainingPlan, training_memory


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def measure(cfg: ModelConfig, batch: int, seq_len: int, fused: bool, checkpointing: bool) -> tuple[int, int]:
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    model.gradient_checkpointing = checkpointing
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:   # views of one storage count once
            saved[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if fused:   # the trainer's path: loss fused with the LM head
            loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        else:
            loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
    activations = sum(saved.values())
    optimizer = torch.optim.AdamW(model.parameters())
    loss.backward()
    optimizer.step()
    states = sum(tensor_bytes(p) + tensor_bytes(p.grad) for p in model.parameters())
    states += sum(tensor_bytes(v) for s in optimizer.state.values() for v in s.values() if v.dim() > 0)
    return states, activations


CONFIGS = {
    "mha": ModelConfig(vocab_size=512, dim=128, n_layers=2, n_heads=4, hidden_dim=352, max_seq_len=128),
    "tiny-gqa": preset("tiny"),
    "tiny-moe": preset("tiny-moe"),
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_planner_matches_measured_cpu_memory_within_20_percent(name, fused, checkpointing):
    cfg, batch, seq_len = CONFIGS[name], 4, 128
    states, activations = measure(cfg, batch, seq_len, fused, checkpointing)
    # On CPU SDPA never materialises the s x s scores (flash=True); fp32 everything.
    plan = TrainingPlan(micro_batch=batch, seq_len=seq_len, precision="fp32", flash=True, fused_loss=fused,
                        recompute="full" if checkpointing else "none")
    est = training_memory(cfg, plan)
    planned_states = est.parts["weights"] + est.parts["gradients"] + est.parts["optimizer"]
    assert planned_states == states   # fp32 AdamW: 4 + 4 + 8 bytes per parameter, exactly
    planned_activations = est.parts["activations"] + est.parts["output layer"]
    assert planned_activations == pytest.approx(activations, rel=0.20)
    assert planned_states + planned_activations == pytest.approx(states + activations, rel=0.20)
