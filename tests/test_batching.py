"""synpref.core.batching: padding and the length-ordered batch plans every caller shares."""

import torch

from synpref.core.batching import length_batches, longest_first, pad


def test_pad_right_and_left():
    assert pad([[1, 2, 3], [4], []], 0).tolist() == [[1, 2, 3], [4, 0, 0], [0, 0, 0]]
    assert pad([[1, 2, 3], [4]], 9, left=True).tolist() == [[1, 2, 3], [9, 9, 4]]
    assert pad([[5]], 0).dtype == torch.long


def test_length_batches_longest_first_ties_in_order():
    lengths = [3, 7, 7, 1, 5]
    assert length_batches(lengths, 2) == [[1, 2], [4, 0], [3]]
    # Inside windows of 4 positions only: positions 4.. are planned after 0..3.
    assert length_batches(lengths, 2, window=4) == [[1, 2], [0, 3], [4]]
    assert length_batches([], 3) == []


def test_longest_first_keeps_a_given_order_for_ties():
    assert longest_first([4, 0, 2, 1], [2, 2, 9, 2, 2], window=2) == [4, 0, 2, 1]
    assert longest_first([4, 0, 2, 1], [2, 2, 9, 2, 2]) == [2, 4, 0, 1]
