"""Per-GPU training memory under data (ZeRO 0-3), tensor, pipeline and sequence parallelism.

Model states follow Rajbhandari et al. (2020), "ZeRO": with mixed-precision Adam every
parameter costs 2 bytes of bf16 weights, 2 of bf16 gradients and K = 12 of optimizer state
(fp32 master weights, momentum and variance). ZeRO stage 1 shards the optimizer state over the
N_d data-parallel ranks, stage 2 the gradients too, stage 3 the weights too:
  (2 + 2 + K)Psi,  (2 + 2 + K/N_d)Psi,  (2 + (2 + K)/N_d)Psi,  (2 + 2 + K)Psi/N_d.
"mixed" is that Megatron/DeepSpeed layout (bf16 weights, gradients and activations). Plain
torch autocast over fp32 weights, as lmforge's trainer runs on GPU, keeps fp32 gradients, bf16
weight copies saved for backward and an fp32 residual stream, so it needs more than "mixed";
it is not modelled separately. Activations come from `activations.py`. Pipeline stages hold
their slice of the layers; under the 1F1B schedule the first stage keeps min(pp, micro-batches)
micro-batches in flight.

ZeRO-3 is modelled as lmforge's FSDP2 layout (train/distributed/fsdp.py): each block is one
`fully_shard` unit and the root unit (embeddings, final norm, head) stays gathered from its forward
to its backward. With reshard_after_forward (the default) a block's gathered weights live only while
it runs, plus the next block's prefetched all-gather; without it (`--no-reshard`, about ZeRO-2's
memory with ZeRO-3's sharded storage) every block stays gathered from its forward until its backward.
`comm_bytes_per_step` gives the matching collective volume per rank and step.

Tensor parallelism splits every weight over tp by default (Megatron: vocab-parallel embeddings and
head); tp_layout="lmforge" is train/distributed/tp.py's layout instead: the block matrices split,
the norms, embeddings and head whole on every rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.plan.activations import (RECOMPUTE, LayerShape, fused_loss_chunk_bytes, layer_bytes,
                                     output_layer_bytes)
from lmforge.plan.arithmetic import per_layer_params

# bytes per parameter: (weights, gradients, optimizer states)
PRECISIONS = {
    "mixed": (2, 2, 12),   # bf16 weights and grads; fp32 master copy + Adam m and v
    "fp32": (4, 4, 8),     # fp32 weights and grads; Adam m and v
}
ACTIVATION_BYTES = {"mixed": 2, "fp32": 4}
OFFLOADS = ("none", "optimizer", "params")
TP_LAYOUTS = ("megatron", "lmforge")  # "params" offloads the optimizer states and the weights


@dataclass(frozen=True)
class TrainingPlan:
    micro_batch: int = 1          # sequences per forward/backward on one GPU
    seq_len: int = 2048
    dp: int = 1                   # data-parallel degree (ZeRO shards over these ranks)
    tp: int = 1                   # tensor-parallel degree
    pp: int = 1                   # pipeline-parallel degree
    sp: bool = False              # sequence parallelism (splits the norm/dropout activations over tp)
    zero: int = 0                 # ZeRO stage 0..3
    recompute: str = "none"       # activation checkpointing: none | selective | full
    offload: str = "none"         # CPU offload: none | optimizer | params (needs ZeRO-3)
    precision: str = "mixed"      # mixed (2+2+12 bytes/param) | fp32 (4+4+8)
    flash: bool = False           # attention without s x s matrices
    micro_batches: int = 0        # micro-batches per step per pipeline (0: as many as pp)
    fused_loss: bool = True       # loss fused with the LM head in chunks, as lmforge trains (no full logits)
    reshard_after_forward: bool = True  # ZeRO-3/FSDP2: free each block's gathered weights after its forward
    tp_layout: str = "megatron"   # what tp splits: megatron (every weight) | lmforge (block matrices only)

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp


def model_state_bytes(n_params: float, dp: int = 1, zero: int = 0, precision: str = "mixed",
                      offload: str = "none") -> dict[str, float]:
    """GPU bytes of weights, gradients and optimizer states for n_params parameters on one
    data-parallel rank, plus what offloading moves to CPU memory."""
    if precision not in PRECISIONS:
        raise LmforgeError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if zero not in (0, 1, 2, 3):
        raise LmforgeError(f"ZeRO stage must be 0, 1, 2 or 3, got {zero}")
    if offload not in OFFLOADS:
        raise LmforgeError(f"offload must be one of {', '.join(OFFLOADS)}, got {offload!r}")
    if offload == "params" and zero != 3:
        raise LmforgeError("offloading parameters needs ZeRO stage 3 (they must be sharded to be fetched)")
    if dp < 1:
        raise LmforgeError(f"data-parallel degree must be at least 1, got {dp}")
    w, g, k = PRECISIONS[precision]
    weights = w * n_params / (dp if zero >= 3 else 1)
    grads = g * n_params / (dp if zero >= 2 else 1)
    optimizer = k * n_params / (dp if zero >= 1 else 1)
    cpu = 0.0
    if offload in ("optimizer", "params"):
        cpu, optimizer = cpu + optimizer, 0.0
    if offload == "params":
        cpu, weights = cpu + weights, 0.0
    return {"weights": weights, "gradients": grads, "optimizer": optimizer, "cpu": cpu}


@dataclass
class MemoryEstimate:
    plan: TrainingPlan
    stage: str                                  # which pipeline stage is the largest ("first", "last", "only")
    params_per_gpu: float                       # parameters of that stage's tensor-parallel shard
    parts: dict[str, float] = field(default_factory=dict)   # GPU bytes by kind
    cpu_bytes: float = 0.0

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def check_plan(cfg: ModelConfig, plan: TrainingPlan) -> None:
    """Raise LmforgeError for layouts that cannot be built."""
    problems = []
    for name in ("micro_batch", "seq_len", "dp", "tp", "pp"):
        if getattr(plan, name) < 1:
            problems.append(f"{name} must be at least 1 (got {getattr(plan, name)})")
    if problems:
        raise LmforgeError("impossible plan: " + "; ".join(problems))
    if cfg.n_heads % plan.tp:
        problems.append(f"tp={plan.tp} does not divide the {cfg.n_heads} attention heads")
    elif cfg.n_kv_heads % plan.tp and plan.tp % cfg.n_kv_heads:
        problems.append(f"tp={plan.tp} cannot split or replicate {cfg.n_kv_heads} key/value heads")
    if plan.pp > cfg.n_layers:
        problems.append(f"pp={plan.pp} exceeds the model's {cfg.n_layers} layers")
    if plan.sp and plan.tp == 1:
        problems.append("sequence parallelism splits activations across tensor-parallel ranks: it needs tp > 1")
    if plan.recompute not in RECOMPUTE:
        problems.append(f"recompute must be one of {', '.join(RECOMPUTE)} (got {plan.recompute!r})")
    if plan.micro_batches < 0:
        problems.append("micro_batches must be 0 (auto) or positive")
    if plan.tp_layout not in TP_LAYOUTS:
        problems.append(f"tp_layout must be one of {', '.join(TP_LAYOUTS)} (got {plan.tp_layout!r})")
    if not plan.reshard_after_forward and plan.zero != 3:
        problems.append("reshard_after_forward=False is an FSDP (ZeRO-3) setting: it needs zero=3")
    if problems:
        raise LmforgeError("impossible plan: " + "; ".join(problems))


def layer_shape(cfg: ModelConfig, tp: int = 1) -> LayerShape:
    # With more TP ranks than K/V heads, each rank keeps a replica of one K/V head.
    kv_hidden = cfg.n_kv_heads * cfg.head_dim
    if tp > cfg.n_kv_heads:
        kv_hidden = tp * cfg.head_dim
    return LayerShape(hidden=cfg.dim, heads=cfg.n_heads, kv_hidden=kv_hidden, ffn=cfg.hidden_dim, glu=True,
                      dropout=False, experts_per_token=cfg.n_experts_per_token if cfg.n_experts else 0,
                      attn_hidden=cfg.n_heads * cfg.head_dim)


def tp_shard(cfg: ModelConfig, plan: TrainingPlan, params: float, layers: float) -> float:
    """Parameters one tensor-parallel rank holds of `params` parameters of which `layers` are whole
    blocks (the rest: embeddings, head, final norm)."""
    if plan.tp_layout == "megatron":
        return params / plan.tp
    norms = layers * 2 * cfg.dim  # each block's two RMSNorm weights
    matrices = layers * per_layer_params(cfg) - norms
    return matrices / plan.tp + params - matrices


def training_memory(cfg: ModelConfig, plan: TrainingPlan) -> MemoryEstimate:
    """Peak GPU bytes on the most loaded GPU, by kind: weights, gradients, optimizer,
    activations, the output layer, and temporary buffers (a recomputed layer, ZeRO-3 gathers,
    one chunk of fused-loss logits)."""
    check_plan(cfg, plan)
    model_state_bytes(1, plan.dp, plan.zero, plan.precision, plan.offload)  # validates the options
    t, pp = plan.tp, plan.pp
    t_head = 1 if plan.tp_layout == "lmforge" else t  # the head is split (vocab-parallel) or whole
    layers = math.ceil(cfg.n_layers / pp)
    block = per_layer_params(cfg)
    embed = cfg.vocab_size * cfg.dim
    in_flight = min(pp, plan.micro_batches) if plan.micro_batches else pp
    stages = {"only": (cfg.num_params(), 1, True)} if pp == 1 else {
            # A tied embedding is duplicated on the first and last stage (as Megatron does).
            "first": (layers * block + embed, in_flight, False),
            "last": (layers * block + embed + cfg.dim, 1, True)}
    shape = layer_shape(cfg, t)
    act_bytes = ACTIVATION_BYTES[plan.precision]
    s, b = plan.seq_len, plan.micro_batch
    per_layer = layer_bytes(shape, s, b, t, plan.sp, plan.recompute, plan.flash, act_bytes)
    best = None
    for name, (params, micro_batches, has_head) in stages.items():
        shard = tp_shard(cfg, plan, params, layers)
        states = model_state_bytes(shard, plan.dp, plan.zero, plan.precision, plan.offload)
        parts = {"weights": states["weights"], "gradients": states["gradients"], "optimizer": states["optimizer"],
                 "activations": per_layer * layers * micro_batches}
        parts["output layer"] = output_layer_bytes(s, b, cfg.dim, cfg.vocab_size, t_head, plan.sp, act_bytes,
                                                   plan.fused_loss) if has_head else 0.0
        temp = fused_loss_chunk_bytes(cfg.vocab_size, t_head) if has_head and plan.fused_loss else 0.0
        if plan.recompute == "full":  # the one layer being recomputed holds its full activations
            temp += layer_bytes(shape, s, b, t, plan.sp, "none", plan.flash, act_bytes)
        if plan.zero == 3:  # gathered weights: the root unit and the blocks held (see the module doc)
            gathered_blocks = 2 if plan.reshard_after_forward else layers + 1  # + the in-flight all-gather
            gathered = tp_shard(cfg, plan, params - layers * block, 0) + gathered_blocks * tp_shard(cfg, plan, block, 1)
            temp += gathered * PRECISIONS[plan.precision][0]
        parts["temporary buffers"] = temp
        estimate = MemoryEstimate(plan, name, shard, parts, states["cpu"])
        if best is None or estimate.total > best.total:
            best = estimate
    return best


def comm_bytes_per_step(cfg: ModelConfig, plan: TrainingPlan, grad_accum: int = 1) -> dict[str, float]:
    """Bytes per rank and optimizer step through each data-parallel collective, counted as the
    full (gathered, or pre-reduction) buffer each call is given; a ring moves (dp-1)/dp of an
    all-gather or reduce-scatter buffer and 2(dp-1)/dp of an all-reduce buffer over each link.
    ZeRO-3 (FSDP2, lmforge's layout): per micro-batch every unit is gathered for the forward and
    the blocks again for the backward when resharded (the root unit is never resharded), and the
    gradients are reduce-scattered. ZeRO 0-2 (DDP): one all-reduce of the gradients per step."""
    check_plan(cfg, plan)
    if plan.dp == 1:
        return {"all_gather": 0.0, "reduce_scatter": 0.0, "all_reduce": 0.0}
    w, g, _ = PRECISIONS[plan.precision]
    layers = cfg.n_layers / plan.pp  # (stages taken as equal)
    params = tp_shard(cfg, plan, cfg.num_params() / plan.pp, layers)
    if plan.zero < 3:
        return {"all_gather": 0.0, "reduce_scatter": 0.0, "all_reduce": g * params}
    blocks = layers * tp_shard(cfg, plan, per_layer_params(cfg), 1)
    gathered = params + (blocks if plan.reshard_after_forward else 0)
    return {"all_gather": grad_accum * w * gathered, "reduce_scatter": grad_accum * g * params, "all_reduce": 0.0}
