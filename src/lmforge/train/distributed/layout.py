"""The process layout of a run: the `parallel` degrees resolved against the world size and checked
against the model and batch, as plain arithmetic (no process group is created here)."""
from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.train.config import ParallelConfig, TrainConfig
from lmforge.train.distributed.pipeline import stages_per_rank


@dataclass(frozen=True)
class Layout:
    world: int
    dp_shard: int
    tp: int = 1
    pp: int = 1
    cp: int = 1

    @property
    def mesh_shape(self) -> tuple[tuple[str, int], ...]:
        """(name, size) of each mesh dimension larger than 1, outermost first (dp outside tp, so
        tp peers are neighbours: on one node they share the fastest links)."""
        dims = (("pp", self.pp), ("dp_shard", self.dp_shard), ("cp", self.cp), ("tp", self.tp))
        return tuple(d for d in dims if d[1] > 1) or (("dp_shard", 1),)


def resolve_layout(pc: ParallelConfig, world: int, tc: TrainConfig, cfg: ModelConfig | None) -> Layout:
    """The layout for `world` processes, or an LmforgeError saying which setting is impossible."""
    fixed = pc.tp * pc.pp * pc.cp
    if world % fixed:
        raise LmforgeError(f"parallel.tp*pp*cp = {pc.tp}*{pc.pp}*{pc.cp} = {fixed} does not divide the world "
                           f"size {world}")
    dp = world // fixed if pc.dp_shard == -1 else pc.dp_shard
    if dp * fixed != world:
        raise LmforgeError(f"parallel.dp_shard*tp*pp*cp = {dp}*{pc.tp}*{pc.pp}*{pc.cp} = {dp * fixed} must equal "
                           f"the world size {world} (torchrun --nproc-per-node x --nnodes); dp_shard=-1 fills it")
    if tc.micro_batch % dp:
        raise LmforgeError(f"train.micro_batch={tc.micro_batch} must be a multiple of parallel.dp_shard={dp}")
    if cfg is not None and (cfg.n_heads % pc.tp or cfg.n_kv_heads % pc.tp):
        raise LmforgeError(f"parallel.tp={pc.tp} must divide the model's n_heads={cfg.n_heads} and "
                           f"n_kv_heads={cfg.n_kv_heads}")
    if pc.pp > 1:
        _check_pipeline(pc, dp, tc, cfg)
    elif pc.microbatches:
        raise LmforgeError(f"parallel.microbatches={pc.microbatches} splits a pipeline's step: it needs parallel.pp > 1")
    if tc.seq_len % pc.tp:
        raise LmforgeError(f"train.seq_len={tc.seq_len} must be a multiple of parallel.tp={pc.tp} "
                           "(sequence parallel splits it)")
    if pc.tp > 1 and cfg is not None and cfg.n_experts:
        raise LmforgeError("parallel.tp needs a dense model (no MoE experts) so far")
    if pc.cp > 1:
        _check_context_parallel(pc, tc, cfg)
    if pc.cpu_offload and dp * pc.cp == 1:
        raise LmforgeError("parallel.cpu_offload moves FSDP shards to host memory: it needs parallel.dp_shard or "
                           "parallel.cp > 1 (one process keeps its weights where train.device puts them)")
    if tc.noise_scale and world > 1:
        raise LmforgeError("train.noise_scale is single-process only")
    if tc.dp.enabled and world > 1:  # per-example gradients and the accountant assume one process
        raise LmforgeError("train.dp (DP-SGD) is single-process only so far")
    if tc.optimizer == "muon" and world > 1:  # Newton–Schulz needs whole matrices, FSDP holds row shards
        raise LmforgeError("train.optimizer=muon is single-process only so far; use adamw under torchrun")
    return Layout(world, dp, pc.tp, pc.pp, pc.cp)


def pipeline_microbatches(pc: ParallelConfig, tc: TrainConfig) -> int:
    return pc.microbatches or tc.grad_accum


def _check_pipeline(pc: ParallelConfig, dp: int, tc: TrainConfig, cfg: ModelConfig | None) -> None:
    v = stages_per_rank(pc.pp_schedule)
    n_micro = pipeline_microbatches(pc, tc)
    if n_micro < pc.pp:
        raise LmforgeError(f"parallel.microbatches={n_micro} is fewer than the parallel.pp={pc.pp} pipeline stages "
                           "(every stage would idle); raise parallel.microbatches or train.global_batch_tokens")
    if pc.pp_schedule == "interleaved_1f1b" and n_micro % pc.pp:
        raise LmforgeError(f"interleaved_1f1b needs parallel.microbatches={n_micro} to be a multiple of "
                           f"parallel.pp={pc.pp}")
    rows = tc.micro_batch * tc.grad_accum
    if rows % n_micro:
        raise LmforgeError(f"the step's {rows} sequences (train.micro_batch x grad_accum) do not split into "
                           f"parallel.microbatches={n_micro} equal pipeline micro-batches")
    if cfg is not None and cfg.n_layers % (pc.pp * v):
        raise LmforgeError(f"parallel.pp={pc.pp} with {pc.pp_schedule} ({v} stage(s) per rank) must divide the "
                           f"model's n_layers={cfg.n_layers} into {pc.pp * v} equal stages")
    if cfg is not None and (cfg.tie_embeddings or cfg.n_experts):
        raise LmforgeError("parallel.pp needs untied embeddings and a dense model (no MoE) so far")
    if dp > 1 or pc.tp > 1 or pc.cp > 1:
        raise LmforgeError("parallel.pp is not combined with dp_shard, tp or cp in the training loop yet")
    if tc.compile:
        raise LmforgeError("train.compile is not supported with parallel.pp yet")


def _check_context_parallel(pc: ParallelConfig, tc: TrainConfig, cfg: ModelConfig | None) -> None:
    if tc.seq_len % (2 * pc.cp):
        raise LmforgeError(f"train.seq_len={tc.seq_len} must be a multiple of 2*parallel.cp={2 * pc.cp} "
                           "(zigzag load balancing gives each rank two equal chunks)")
    if pc.tp > 1:
        raise LmforgeError("parallel.cp is not combined with parallel.tp in the training loop yet")
    if tc.activation_checkpointing:  # the recompute runs in the backward, outside the ring's forward
        raise LmforgeError("train.activation_checkpointing is not supported with parallel.cp yet")
    if tc.compile:
        raise LmforgeError("train.compile is not supported with parallel.cp yet")
    if cfg is not None and cfg.n_experts:  # the load-balancing loss would be each rank's own, not the sequence's
        raise LmforgeError("parallel.cp needs a dense model (no MoE experts) so far")
