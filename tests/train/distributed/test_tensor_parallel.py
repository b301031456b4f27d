"""Tensor + sequence parallel at tp=2 (apply_tp via DTensor parallelize_module, on the tp dimension
of a 2x2 gloo mesh, fp64), and FSDP x TP on the whole 2x2 mesh, give the unsharded model's loss and
gradients."""
import pytest


@pytest.mark.slow
def test_tp2_with_sequence_parallel_equals_the_plain_model(parallel_results):
    for res in parallel_results:
        tp = res["tp2"]
        assert tp["loss"] <= 1e-12 and tp["grad"] <= 1e-12, tp
        assert tp["n_grads"] == 2 * 9 + 3  # every parameter compared (2 blocks x 9, embedding, final norm, head)
        assert tp["q_rows_local"] * 2 == tp["q_rows"]  # each rank holds half the heads
        assert tp["norm_rows"] == 16 // 2  # norms run on half the sequence (sequence parallel)


@pytest.mark.slow
def test_fsdp_x_tp_on_a_2x2_mesh_equals_the_plain_model(parallel_results):
    for res in parallel_results:
        grid = res["fsdp2xtp2"]
        assert grid["loss"] <= 1e-12 and grid["grad"] <= 1e-12, grid
        assert grid["n_grads"] == 2 * 9 + 3
        assert grid["n_2d"] == 2 * 9  # every block weight sharded over both dimensions (tp, then dp)
