"""What the training loop asks of its process layout: one process (the default, every hook an
identity or the plain-file checkpoint) or a torchrun world on a device mesh (FSDP2 over dp_shard,
tensor + sequence parallel over tp, both on a 2-D mesh, a pipeline over pp, or context parallel
over cp: ring attention on zigzag sequence chunks, FSDP over dp_shard x cp)."""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.train import checkpoint as plain_ckpt
from lmforge.train.config import ParallelConfig, TrainConfig
from lmforge.train.distributed.checkpoint import is_dcp_checkpoint, load_dcp_checkpoint, save_dcp_checkpoint
from lmforge.train.distributed.context_parallel import ContextParallelForward
from lmforge.train.distributed.fsdp import apply_fsdp
from lmforge.train.distributed.layout import Layout, pipeline_microbatches, resolve_layout
from lmforge.train.distributed.pipeline import apply_pp
from lmforge.train.distributed.tp import apply_tp


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_any_checkpoint(path: Path, model, optimizer) -> dict:
    """A step directory of either format (a DCP one also loads into one plain process)."""
    if is_dcp_checkpoint(path):
        return load_dcp_checkpoint(path, model, optimizer)
    return plain_ckpt.load_checkpoint(path, model, optimizer)


class SingleProcess:
    main, dp, pipeline = True, 1, None

    def __init__(self, tc: TrainConfig, console: Console):
        self.device, self.console = resolve_device(tc.device), console

    def parallelize(self, model):
        return model

    def wrap_forward(self, forward):
        return forward

    def shard(self, loader):
        return loader

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def clip_grad_norm(self, params, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def eval_model(self, model):
        return model

    def save_checkpoint(self, root, step, model, optimizer, trainer_state, keep_last, trainable_only=False):
        return plain_ckpt.save_checkpoint(root, step, model, optimizer, trainer_state, keep_last, trainable_only)

    def load_checkpoint(self, path, model, optimizer) -> dict:
        return load_any_checkpoint(path, model, optimizer)

    def full_model(self, model):
        return model

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class Distributed:
    """One rank of a torchrun world: FSDP2 over the dp_shard mesh dimension, tensor parallel over
    tp (within each FSDP shard group), a pipeline over pp, or context parallel over cp (FSDP then
    shards over dp_shard x cp, which also averages the gradients over the cp ranks)."""

    def __init__(self, layout: Layout, pc: ParallelConfig, tc: TrainConfig, console: Console):
        self.layout, self.pc = layout, pc
        self.rank, self.local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
        use_cuda = torch.cuda.is_available() and tc.device in ("auto", "cuda")
        self.device = torch.device("cuda", self.local_rank) if use_cuda else resolve_device(tc.device)
        backend = pc.backend if pc.backend != "auto" else ("nccl" if self.device.type == "cuda" else "gloo")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=timedelta(minutes=10))
        names, sizes = zip(*layout.mesh_shape)
        self.mesh = init_device_mesh(self.device.type, sizes, mesh_dim_names=names)
        self.dp = layout.dp_shard
        self.dp_rank = self.mesh["dp_shard"].get_local_rank() if "dp_shard" in names else 0
        self.main = self.rank == 0
        self.console = console if self.main else Console(quiet=True)
        self.pipeline = None
        self.n_microbatches = pipeline_microbatches(pc, tc)

    def parallelize(self, model):
        if not all(p.requires_grad for p in model.parameters()):
            raise LmforgeError("parallel training supports full-model training only (no frozen weights)")
        if self.layout.pp > 1:
            pp_mesh = self.mesh["pp"]
            model, self.pipeline = apply_pp(model, pp_mesh.get_local_rank(), self.layout.pp, self.pc.pp_schedule,
                                            self.n_microbatches, self.device, pp_mesh.get_group())
            return model
        if self.layout.tp > 1:
            model = apply_tp(model, self.mesh["tp"])
        if self.dp > 1 or self.layout.cp > 1:  # FSDP over TP: each block's tp shards sharded again (2-D DTensors)
            model = apply_fsdp(model, self._fsdp_mesh(), self.pc.reshard_after_forward, self.pc.param_dtype,
                               self.pc.reduce_dtype, self.pc.cpu_offload)
        return model

    def _fsdp_mesh(self):
        """dp_shard, cp, or both flattened into one dimension (cp ranks hold the same weights)."""
        dims = tuple(d for d in ("dp_shard", "cp") if d in self.mesh.mesh_dim_names)
        return self.mesh[dims[0]] if len(dims) == 1 else self.mesh[dims]._flatten("dp_shard_cp")

    def wrap_forward(self, forward):
        """What the objective calls as the model: under cp, this rank's share of each sequence."""
        return ContextParallelForward(forward, self.mesh["cp"].get_group()) if self.layout.cp > 1 else forward

    def pipeline_gradients(self, objective, micros: list, autocast):
        """The step's micro-batches as one batch through the pipeline schedule (pretraining rows of
        tokens): -> what accumulate_gradients returns; the loss sum is 0 off the last stage."""
        counts = [objective.loss_tokens(batch) for batch in micros]
        with autocast():
            loss = self.pipeline.step(torch.cat(micros).to(self.device))
        dtype = torch.promote_types(next(self.pipeline.part.parameters()).dtype, torch.float32)
        loss_sum = loss.to(dtype) * len(micros) if loss is not None else torch.zeros((), dtype=dtype,
                                                                                      device=self.device)
        return loss_sum, {}, counts, None

    def shard(self, loader):
        if not hasattr(loader, "shard"):
            raise LmforgeError("this objective's data loader cannot be split by rank: run it in one process")
        return loader.shard(self.dp_rank, self.dp)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean over data-parallel ranks of a per-rank value (tp peers hold equal copies, cp peers
        the means over equal shares of the same rows; off the last pipeline stage the value is 0,
        so pp divides out)."""
        x = x.detach().clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x / (self.layout.world // self.layout.pp)

    def clip_grad_norm(self, params, max_norm: float) -> torch.Tensor:
        """torch's clip_grad_norm_ rule over gradients that may be DTensors on different meshes (FSDP
        over dp_shard, TP blocks on dp_shard x tp) or plain tensors (replicated over tp, or one
        pipeline stage's own): each DTensor norm is reduced over its mesh, plain ones are counted
        once, and pipeline stages add up their parts."""
        grads = [p.grad for p in params if p.grad is not None]
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for g in grads:
            norm = torch.linalg.vector_norm(g)
            sq += (norm.full_tensor() if isinstance(norm, DTensor) else norm).double() ** 2
        if self.layout.pp > 1:
            dist.all_reduce(sq, group=self.mesh["pp"].get_group())
        total = sq.sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.item())
        return total

    def eval_model(self, model):
        """Collective: the model to evaluate, None on ranks that do not. FSDP evaluates sharded; a
        pipeline or tensor parallel run evaluates the gathered whole model on rank 0 (held-out
        windows may be ragged, which sequence parallel cannot split)."""
        return self.full_model(model) if self.pipeline is not None or self.layout.tp > 1 else model

    def save_checkpoint(self, root, step, model, optimizer, trainer_state, keep_last, trainable_only=False):
        return save_dcp_checkpoint(root, step, model, optimizer, trainer_state, keep_last)

    def load_checkpoint(self, path, model, optimizer) -> dict:
        return load_any_checkpoint(path, model, optimizer)

    def full_model(self, model):
        """Collective: the whole model as a plain Transformer on rank 0 (None elsewhere)."""
        if self.pipeline is not None:  # each stage's weights are plain tensors: gather them whole
            parts = [None] * self.layout.world if self.main else None
            dist.gather_object({k: v.detach().cpu() for k, v in model.state_dict().items()}, parts, dst=0)
            state = {k: v for part in parts for k, v in part.items()} if self.main else None
        else:
            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.main:
            return None
        plain = Transformer(model.cfg).to(state["embed_tokens.weight"].dtype)  # built at the trained dtype
        plain.load_state_dict(state)
        return plain

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def start_runtime(pc: ParallelConfig | None, tc: TrainConfig, cfg, console: Console):
    """SingleProcess unless torchrun started more than one process. The layout is checked first,
    so a bad setting is a one-line error before any process group exists."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    pc = pc or ParallelConfig()
    layout = resolve_layout(pc, world, tc, cfg)
    if world == 1:
        return SingleProcess(tc, console)
    return Distributed(layout, pc, tc, console)
