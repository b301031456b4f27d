"""Training across processes on PyTorch's own distributed engine, layered on a plain model.

`torchrun --nproc-per-node N -m lmforge train ...` starts N copies of the ordinary training loop;
`start_runtime` reads the torchrun environment, checks the `parallel` recipe section against the
world size and the model (before any process group exists), builds the device mesh and hands the
loop a runtime whose few hooks (parallelize, shard the loader, reduce the loss, checkpoint, gather
the final model) are identities in a single process. Parallelism is applied from outside by small
`apply_*` functions (fsdp.py); the model class knows nothing of it.
"""
