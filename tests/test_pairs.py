"""Pair selection on hand-made scores: best vs worst, threshold edges, ties, K > 2, pairs kept vs threshold."""

import pytest

from synpref.core.pairs import BELOW, EMPTY, IDENTICAL, TIE, kept_vs_threshold, pair_row, select_pair, threshold_grid


def test_two_samples_best_vs_worst_any_order():
    pair, reason, gap = select_pair(["a", "b"], [0.2, 1.7], threshold=0.5)
    assert reason is None and (pair.chosen, pair.rejected) == (1, 0)
    assert (pair.score_chosen, pair.score_rejected) == (1.7, 0.2) and gap == pytest.approx(1.5) == pair.gap


@pytest.mark.parametrize("threshold, kept", [(0.5, True), (0.5 - 1e-9, True), (0.5 + 1e-9, False), (0.0, True)])
def test_threshold_edge_is_inclusive(threshold, kept):
    # 1.0 - 0.5 is exactly 0.5 in binary floating point, so the edge is exact.
    pair, reason, gap = select_pair(["x", "y"], [1.0, 0.5], threshold)
    assert gap == 0.5
    assert (pair is not None) is kept and reason == (None if kept else BELOW)


@pytest.mark.parametrize("threshold", [0.0, -1.0])
def test_ties_dropped_even_without_threshold(threshold):
    assert select_pair(["x", "y"], [0.3, 0.3], threshold) == (None, TIE, 0.0)
    assert select_pair(["x", "y", "z"], [2.0, 2.0, 2.0], threshold) == (None, TIE, 0.0)


def test_k_greater_than_two_takes_extremes_first_on_equal_scores():
    texts = ["a", "b", "c", "d", "e"]
    scores = [0.1, 3.0, -2.0, 3.0, -2.0]
    pair, reason, gap = select_pair(texts, scores, threshold=1.0)
    assert (pair.chosen, pair.rejected) == (1, 2) and gap == 5.0 and reason is None
    row = pair_row("pid", [{"role": "user", "content": "q"}], texts, pair)
    assert row == {
        "prompt_id": "pid",
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant", "content": "b"}],
        "rejected": [{"role": "assistant", "content": "c"}],
        "score_chosen": 3.0,
        "score_rejected": -2.0,
        "gap": 5.0,
    }


def test_k_greater_than_two_partial_ties_still_pair():
    # Two samples share the top score; the worst differs: a real preference.
    pair, reason, _ = select_pair(["a", "b", "c"], [1.0, 1.0, 0.0])
    assert reason is None and (pair.chosen, pair.rejected) == (0, 2)


def test_identical_texts_with_different_scores_dropped():
    assert select_pair(["same", "same"], [1.0, 0.0])[:2] == (None, IDENTICAL)
    assert select_pair(["fine", " "], [1.0, 0.0])[:2] == (None, EMPTY)


def test_bad_input_is_an_error():
    with pytest.raises(ValueError, match="≥ 2"):
        select_pair(["a"], [1.0])
    with pytest.raises(ValueError):
        select_pair(["a", "b"], [1.0])


def test_kept_vs_threshold_counts_by_hand():
    gaps = [0.1, 0.5, 0.5, 2.0]
    assert kept_vs_threshold(gaps, [0.0, 0.1, 0.2, 0.5, 0.6, 2.0, 3.0]) == [
        (0.0, 4),
        (0.1, 4),
        (0.2, 3),
        (0.5, 3),
        (0.6, 1),
        (2.0, 1),
        (3.0, 0),
    ]
    grid = threshold_grid(gaps, threshold=0.25, steps=4)
    assert grid == [0.0, 0.25, 0.5, 1.0, 1.5, 2.0]
