"""The sampler's two-stage argmax against torch.argmax: same index on every row, ties and NaN included."""
import torch

from lmforge.serve.sampler import ARGMAX_CHUNK, argmax_rows


def test_argmax_rows_equals_torch_argmax_with_ties_nan_and_inf():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 40 * ARGMAX_CHUNK, generator=g)
    x[1, 5], x[1, 3000] = 9.0, 9.0                    # a tie across chunks: the first index wins
    x[2, 130], x[2, 129] = 9.0, 9.0                   # a tie inside a chunk
    x[3, 4000], x[3, 200] = float("nan"), 50.0        # NaN counts as the maximum
    x[4, 77], x[4, 2000] = float("nan"), float("nan")
    x[5] = float("-inf")                              # every token masked: index 0, as torch gives
    x[6, -1] = 20.0                                   # the last token
    x[7] = torch.randint(0, 3, x[7].shape, generator=g).float()   # many ties
    x[8, :] = 1.0
    x[9, ARGMAX_CHUNK - 1], x[9, ARGMAX_CHUNK] = 7.0, 7.0          # a tie across a chunk boundary
    assert argmax_rows(x) == x.argmax(-1).tolist()
    assert argmax_rows(x[[9, 3, 1]]) == x[[9, 3, 1]].argmax(-1).tolist()


def test_argmax_rows_on_a_vocabulary_that_is_not_a_multiple_of_the_chunk():
    x = torch.randn(3, 1000)
    x[0, 999] = 10.0
    assert argmax_rows(x) == x.argmax(-1).tolist()
