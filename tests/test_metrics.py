"""WinRate metric, Wilson interval and sign test against hand computations and published values."""

import math
import struct
from fractions import Fraction
from pathlib import Path

import pytest

from synpref.core.metrics import (
    WinRate,
    length_matched,
    outcome,
    plot_average_rewards,
    plot_win_rates,
    sign_test_p,
    wilson_interval,
)


def compute(policy, baseline, pl=None, bl=None, **kw):
    m = WinRate(**kw)
    m.update(policy, baseline, pl, bl)
    return m.compute()


def test_ties_wins_losses_and_averages():
    # 3 wins (1>0, 2>1, 5>4), 2 ties (3=3, 0=0), 1 loss (0<1)
    out = compute([1, 2, 5, 3, 0, 0], [0, 1, 4, 3, 0, 1])
    assert (out["wins"], out["ties"], out["losses"], out["n"]) == (3, 2, 1, 6)
    assert out["win_rate"] == pytest.approx(3 / 6)
    assert out["tie_rate"] == pytest.approx(2 / 6)
    assert out["loss_rate"] == pytest.approx(1 / 6)
    assert out["avg_reward_policy"] == pytest.approx(11 / 6)
    assert out["avg_reward_baseline"] == pytest.approx(9 / 6)
    # sample s.d. of [0,1,4,3,0,1]: mean 1.5, squares 2.25+.25+6.25+2.25+2.25+.25 = 13.5, /5 = 2.7
    assert out["reward_stderr_baseline"] == pytest.approx(math.sqrt(2.7 / 6))
    # sign test over 3 wins / 1 loss: 2 * (1 + 4) / 16
    assert out["sign_test_p"] == pytest.approx(10 / 16)


def test_tie_tolerance_turns_small_gaps_into_ties():
    out = compute([1.05, 2.0, 0.0], [1.0, 1.0, 0.5], tie_tolerance=0.1)
    assert (out["wins"], out["ties"], out["losses"]) == (1, 1, 1)
    assert outcome(1.05, 1.0, 0.1) == "tie" and outcome(1.05, 1.0) == "win" and outcome(0, 1) == "loss"


def test_all_wins_and_all_losses():
    wins = compute([2.0] * 10, [1.0] * 10)
    assert (wins["win_rate"], wins["tie_rate"], wins["loss_rate"]) == (1.0, 0.0, 0.0)
    assert wins["win_rate_ci_high"] == 1.0
    assert wins["sign_test_p"] == pytest.approx(2 / 2**10)
    losses = compute([0.0] * 10, [1.0] * 10)
    assert (losses["win_rate"], losses["loss_rate"]) == (0.0, 1.0)
    assert losses["win_rate_ci_low"] == 0.0
    # Wilson upper bound at 0/10: z²/(n+z²) = 3.8415/13.8415
    assert losses["win_rate_ci_high"] == pytest.approx(1.959964**2 / (10 + 1.959964**2), abs=1e-6)


def test_single_prompt():
    out = compute([1.0], [0.0], [5], [5])
    assert out["win_rate"] == 1.0 and out["n"] == 1
    # Wilson at 1/1: lower bound = 1 / (1 + z²)
    assert out["win_rate_ci_low"] == pytest.approx(1 / (1 + 1.959964**2), abs=1e-6)
    assert out["win_rate_ci_high"] == 1.0
    assert out["sign_test_p"] == 1.0  # one win of one is no evidence
    assert math.isnan(out["reward_stderr_policy"])
    assert out["length_matched_win_rate"] == 1.0


def test_wilson_bounds_against_hand_computation():
    # 63 / 100 (the paper's DPO-synthetic win rate): p = .63, z = 1.959964
    # centre = (.63 + z²/200) / (1 + z²/100) = 0.649207/1.038415 = 0.625190
    # half = z/1.038415 * sqrt(.63*.37/100 + z²/40000) = 1.887454 * 0.0492655 = 0.092986
    low, high = wilson_interval(63, 100)
    assert low == pytest.approx(0.532204, abs=2e-5) and high == pytest.approx(0.718176, abs=2e-5)
    # 7 / 10, the textbook example (R: binom::binom.wilson(7, 10) -> 0.3967781 0.8922087)
    low, high = wilson_interval(7, 10)
    assert low == pytest.approx(0.3967781, abs=1e-6) and high == pytest.approx(0.8922087, abs=1e-6)
    # The paper's 63 % vs 64 %: each inside the other's interval.
    assert wilson_interval(64, 100)[0] < 0.63 < wilson_interval(64, 100)[1]
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_sign_test_exact_and_log_space():
    assert sign_test_p(60, 40) == pytest.approx(0.05688793, abs=1e-7)  # R: binom.test(60, 100)$p.value
    assert sign_test_p(5, 0) == pytest.approx(2 / 32)
    assert sign_test_p(3, 3) == 1.0 and sign_test_p(0, 0) == 1.0
    # Above n = 2000 the tail is summed in log space; check it against exact rational arithmetic.
    wins, losses = 1450, 1600
    n = wins + losses
    exact = 2 * Fraction(sum(math.comb(n, i) for i in range(wins + 1)), 2**n)
    assert sign_test_p(wins, losses) == pytest.approx(float(exact), rel=1e-9)


def test_length_matched_pairs():
    assert length_matched(100, 91) and length_matched(91, 100) and not length_matched(100, 89)
    assert length_matched(0, 0) and not length_matched(0, 3)
    # lengths: (100, 95) matched win, (10, 50) unmatched win, (40, 40) matched loss
    out = compute([2, 2, 0], [1, 1, 1], [100, 10, 40], [95, 50, 40])
    assert out["length_matched_n"] == 2
    assert out["length_matched_win_rate"] == pytest.approx(1 / 2)
    assert out["avg_length_policy"] == pytest.approx(150 / 3)
    assert out["avg_length_baseline"] == pytest.approx(185 / 3)


def test_states_are_sums_so_processes_aggregate():
    """DDP all-reduces each state with its dist_reduce_fx; merging two halves must equal one pass."""
    policy, baseline = [3, 1, 2, 2, 0.5, 7], [1, 1, 3, 0, 0.5, 2]
    lengths_p, lengths_b = [10, 20, 30, 40, 50, 60], [10, 25, 30, 80, 49, 61]
    whole = compute(policy, baseline, lengths_p, lengths_b)
    a, b = WinRate(), WinRate()
    a.update(policy[:2], baseline[:2], lengths_p[:2], lengths_b[:2])
    b.update(policy[2:], baseline[2:], lengths_p[2:], lengths_b[2:])
    assert set(a._reductions.values()) == {a._reductions["wins"]} and a._reductions["wins"].__name__ == "dim_zero_sum"
    a.merge_state(b)
    merged = a.compute()
    for key, value in whole.items():
        assert merged[key] == pytest.approx(value, nan_ok=True), key


def test_bad_rewards_are_rejected():
    with pytest.raises(ValueError, match="2 policy rewards but 1"):
        compute([1, 2], [1])
    with pytest.raises(ValueError, match="finite"):
        compute([float("nan")], [1])


def png_size(path) -> tuple[int, int]:
    data = Path(path).read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_figures_are_pngs_of_the_expected_size(tmp_path):
    pytest.importorskip("matplotlib")
    a = compute([2, 1, 0, 3], [1, 1, 1, 1], [5, 5, 5, 5], [5, 6, 7, 8])
    b = compute([0, 0, 4, 3], [1, 1, 1, 1], [5, 5, 5, 5], [5, 6, 7, 8])
    plot_win_rates([("dpo_ultrafeedback", a), ("dpo_synthetic", b)], tmp_path / "w.png")
    plot_average_rewards([("dpo_synthetic", b)], tmp_path / "r.png")
    assert png_size(tmp_path / "w.png") == (640, 400)
    assert png_size(tmp_path / "r.png") == (640, 400)
