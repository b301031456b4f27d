"""The pretraining recipe: a model section (preset + overrides) and a train section."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmforge.config import build, check_choice, check_fraction, check_non_negative, check_positive, require
from lmforge.errors import LmforgeError
from lmforge.model.config import DEPTH_CHANNELS, ModelConfig, ModelSpec, spec_to_config


OPTIMIZERS = ("adamw", "muon")
# the trainer honours these: fp32 weights with optional bf16 autocast, or fp64 weights (exactness tests)
DTYPES = ("auto", "float32", "bfloat16", "float64")


@dataclass
class DPConfig:
    """train.dp: DP-SGD (per-example clipping, Gaussian noise, Poisson sampling; lmforge.safety.dp_sgd)."""
    enabled: bool = False
    max_grad_norm: float = 1.0        # C: each example's gradient is clipped to this L2 norm
    noise_multiplier: float = 1.0     # sigma: noise std is sigma * C (ignored when target_epsilon is set)
    target_epsilon: float = 0.0       # > 0: choose the smallest sigma that keeps epsilon <= this after max_steps
    delta: float = 1e-5

    def __post_init__(self):
        check_positive(self, "train.dp", "max_grad_norm")
        check_non_negative(self, "train.dp", "noise_multiplier", "target_epsilon")
        require(0 < self.delta < 1, "train.dp.delta", "in (0, 1)", self.delta)
        if self.enabled and not self.target_epsilon and not self.noise_multiplier > 0:
            raise LmforgeError("train.dp needs noise_multiplier > 0 or target_epsilon > 0")


@dataclass
class TrainConfig:
    data: str = ""                    # token shard directory (index.json + .bin files)
    init_from: str = ""               # start from these weights (any `lmforge.model.load` reference) instead
                                      # of a random init; the model section is then ignored
    out: str = "runs/train"
    seq_len: int = 256
    global_batch_tokens: int = 16384  # tokens per optimizer step; micro-batches accumulate to it
    micro_batch: int = 16             # sequences per forward/backward
    max_steps: int = 500
    lr: float = 3e-3
    min_lr_ratio: float = 0.1         # final lr as a fraction of lr
    schedule: str = "wsd"             # "wsd" (warmup-stable-decay) or "cosine"
    warmup: float = 0.1               # fraction of steps; wsd default 1:8:1
    decay: float = 0.1                # fraction of steps in the final decay (wsd only)
    weight_decay: float = 0.1
    optimizer: str = "adamw"          # "adamw", or "muon": Muon for hidden matrices, AdamW for the rest
    muon_lr: float = 0.02             # Muon's peak lr; follows train.lr's schedule in a fixed ratio
    muon_momentum: float = 0.95
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    z_loss: float = 0.0               # > 0: add z_loss * logsumexp(logits)^2 per token to the LM loss (PaLM)
    eval_every: int = 100
    eval_tokens: int = 65536
    ckpt_every: int = 100
    keep_last: int = 2
    log_every: int = 10
    seed: int = 1337
    device: str = "auto"              # auto -> cuda if available, else cpu
    dtype: str = "auto"               # auto -> bfloat16 autocast on cuda, float32 on cpu (see DTYPES)
    compile: bool = False
    activation_checkpointing: bool = False
    tensorboard: bool = True
    peak_flops: float = 0.0           # device peak for MFU; 0 -> looked up for known GPUs
    noise_scale: bool = False         # log the gradient noise scale B_simple (needs grad accum >= 2)
    dp: DPConfig = field(default_factory=DPConfig)

    def __post_init__(self):
        if self.schedule not in ("wsd", "cosine"):
            raise LmforgeError(f"train.schedule must be 'wsd' or 'cosine', got {self.schedule!r}")
        if not 0 <= self.warmup < 1 or not 0 <= self.decay <= 1 or self.warmup + self.decay > 1:
            raise LmforgeError("train.warmup and train.decay must be fractions summing to at most 1")
        check_positive(self, "train", "seq_len", "global_batch_tokens", "micro_batch", "max_steps", "log_every",
                       "eval_every", "eval_tokens", "ckpt_every", "keep_last", "grad_clip")
        check_non_negative(self, "train", "lr", "weight_decay", "seed", "peak_flops")  # lr=0 freezes weights
        check_fraction(self, "train", "min_lr_ratio")
        for name in ("beta1", "beta2"):
            require(0 <= getattr(self, name) < 1, f"train.{name}", "in [0, 1)", getattr(self, name))
        check_choice(self, "train", "dtype", DTYPES)
        check_choice(self, "train", "optimizer", OPTIMIZERS)
        check_non_negative(self, "train", "muon_lr", "z_loss")
        require(0 <= self.muon_momentum < 1, "train.muon_momentum", "in [0, 1)", self.muon_momentum)
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as e:
                raise LmforgeError(f"train.device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}") from e
        if self.global_batch_tokens % (self.micro_batch * self.seq_len):
            raise LmforgeError(f"train.global_batch_tokens={self.global_batch_tokens} must be a multiple of "
                               f"micro_batch*seq_len={self.micro_batch * self.seq_len}")
        if self.noise_scale and self.grad_accum < 2:
            raise LmforgeError("train.noise_scale compares micro-batch and full-batch gradients: it needs "
                               "global_batch_tokens >= 2 * micro_batch * seq_len")

        if self.dp.enabled and (self.noise_scale or self.activation_checkpointing):
            raise LmforgeError("train.dp computes per-example gradients: it cannot be combined with "
                               "train.noise_scale or train.activation_checkpointing")

    @property
    def grad_accum(self) -> int:
        return self.global_batch_tokens // (self.micro_batch * self.seq_len)


# The depth dial's training side. The AdamW lr was tuned on the tiny preset (width 256) and scales
# as 1/sqrt(width), as nanochat scales its AdamW rates; Muon's lr is width-independent (its updates
# are spectrally normalised). The token budget is Chinchilla's ~20 tokens per parameter.
DEPTH_LR_AT_WIDTH_256 = 3e-3
TOKENS_PER_PARAM = 20


def depth_dial_defaults(values: dict) -> dict:
    """With model.depth set, train.lr and train.max_steps that the user did not give follow from it."""
    model = values.get("model")
    if not isinstance(model, dict) or model.get("depth") is None:
        return values
    cfg = spec_to_config(build(ModelSpec, model, "model"))
    train = dict(values.get("train") or {})
    batch_tokens = train.get("global_batch_tokens", TrainConfig.global_batch_tokens)
    if isinstance(batch_tokens, int) and batch_tokens > 0:
        train.setdefault("max_steps", max(1, round(TOKENS_PER_PARAM * cfg.num_params() / batch_tokens)))
    train.setdefault("lr", DEPTH_LR_AT_WIDTH_256 * (4 * DEPTH_CHANNELS / cfg.dim) ** 0.5)
    return {**values, "train": train}


PARALLEL_DTYPES = ("auto", "float32", "bfloat16")  # auto: the weights' own dtype
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")  # lmforge.train.distributed.pipeline.SCHEDULES


@dataclass
class ParallelConfig:
    """How a `torchrun`-launched run splits over its processes (lmforge.train.distributed). One
    process (no torchrun) ignores the section as long as every degree is 1 (or dp_shard=-1)."""
    dp_shard: int = -1                # FSDP2 degree; -1: the world size left after tp * pp * cp
    tp: int = 1                       # tensor parallel degree
    pp: int = 1                       # pipeline parallel degree (ranks along the pipeline)
    pp_schedule: str = "1f1b"         # gpipe, 1f1b or interleaved_1f1b (2 stages per rank)
    microbatches: int = 0             # pipeline micro-batches per step; 0: train.grad_accum
    cp: int = 1                       # context parallel (ring attention) degree
    reshard_after_forward: bool = True  # true: ZeRO-3 (free gathered weights after forward); false: keep
                                        # them until backward (ZeRO-2-like, more memory, less traffic)
    param_dtype: str = "auto"         # FSDP mixed precision: dtype weights are gathered in for compute
    reduce_dtype: str = "auto"        # dtype of the gradient reduce-scatter
    cpu_offload: bool = False         # FSDP: sharded weights, grads and the AdamW step stay in host memory
    backend: str = "auto"             # auto: nccl on CUDA, gloo on CPU

    def __post_init__(self):
        require(self.dp_shard == -1 or self.dp_shard >= 1, "parallel.dp_shard", ">= 1 or -1 (the rest)",
                self.dp_shard)
        check_positive(self, "parallel", "tp", "pp", "cp")
        check_non_negative(self, "parallel", "microbatches")
        check_choice(self, "parallel", "pp_schedule", PP_SCHEDULES)
        check_choice(self, "parallel", "param_dtype", PARALLEL_DTYPES)
        check_choice(self, "parallel", "reduce_dtype", PARALLEL_DTYPES)
        check_choice(self, "parallel", "backend", ("auto", "gloo", "nccl"))


@dataclass
class TrainRecipe:
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    derived_defaults = staticmethod(depth_dial_defaults)

    def __post_init__(self):
        if isinstance(self.model, dict):  # programmatic callers: a plain dict without preset means none
            self.model = build(ModelSpec, {"preset": None, **self.model}, "model")
        self.model_config()  # refuse an impossible model section when the recipe is read

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        cfg = spec_to_config(self.model, vocab_size)
        if self.train.seq_len > cfg.max_seq_len:
            raise LmforgeError(f"train.seq_len={self.train.seq_len} exceeds model max_seq_len={cfg.max_seq_len}")
        return cfg
