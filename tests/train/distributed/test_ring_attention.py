"""Ring attention over gloo process groups of 2 and 4 ranks (GQA, fp64) equals full attention on
the unsplit sequence: output, row log-sum-exp and dQ/dK/dV within 1e-10, for the zigzag and the
contiguous split, causal and not; zigzag balances the causal work, a contiguous split does not.
(One 4-rank launch, shared with test_tensor_parallel.py: parallel_worker.py.)"""
import pytest

from lmforge.model.ring_attention import pair_work


@pytest.mark.slow
def test_ring_attention_equals_full_attention_at_2_and_4_ranks(parallel_results):
    cases = {case for r in parallel_results for case in r if case.startswith("cp")}
    assert len(cases) == 8  # cp 2/4 x zigzag/contiguous x causal/full
    for rank, res in enumerate(parallel_results):
        for case in cases:
            diffs = res[case]
            assert set(diffs) == {"out", "lse", "dq", "dk", "dv"}
            assert max(diffs.values()) <= 1e-10, (rank, case, diffs)


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_zigzag_balances_causal_work_and_contiguous_does_not(cp):
    T = 64 * cp
    zigzag, contiguous = pair_work(T, cp, zigzag=True), pair_work(T, cp, zigzag=False)
    assert sum(zigzag) == sum(contiguous) == T * (T + 1) // 2  # every causal pair, once
    assert max(zigzag) / (sum(zigzag) / cp) <= 1.05
    assert max(contiguous) / (sum(contiguous) / cp) >= 2 - 1 / cp - 0.05  # last rank: ~2x the mean
