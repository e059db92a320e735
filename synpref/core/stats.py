"""Statistics behind a skeptic-proof win rate: length control, judge agreement, clustering by prompt, power."""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Optional, Sequence

import numpy as np

from synpref.core.metrics import LOSS, TIE, WIN, sign_test_p

#: Outcome as a preference score: a tie is half a win (AlpacaEval's convention).
PREFERENCE = {WIN: 1.0, TIE: 0.5, LOSS: 0.0}


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def length_controlled_win_rate(
    outcomes: Sequence[str], policy_lengths: Sequence[float], baseline_lengths: Sequence[float], ridge: float = 1e-3
) -> float:
    """AlpacaEval 2's length-controlled win rate for one policy against one baseline.

    Fit P(policy preferred) = σ(θ + φ·x) with x = tanh(Δ / sd(Δ)), Δ = policy length − baseline
    length (AlpacaEval's normalised length difference), by maximum likelihood on the preference
    (win 1, tie ½, loss 0); report σ(θ): the predicted win rate had both answers the same length.
    AlpacaEval also fits an instruction-difficulty term across many models; with one policy and one
    baseline that term is not identifiable, so it is left out. A tiny ridge keeps θ and φ finite
    when length separates the outcomes perfectly. Newton's method on the convex log-likelihood.
    """
    y = np.array([PREFERENCE[o] for o in outcomes], dtype=np.float64)
    if y.size == 0:
        return math.nan
    delta = np.asarray(policy_lengths, dtype=np.float64) - np.asarray(baseline_lengths, dtype=np.float64)
    sd = delta.std()
    x = np.tanh(delta / sd) if sd > 0 else np.zeros_like(delta)
    design = np.stack([np.ones_like(x), x], axis=1)
    w = np.zeros(2)
    for _ in range(200):
        p = _sigmoid(design @ w)
        grad = design.T @ (p - y) + ridge * w
        hess = design.T @ (design * (p * (1 - p))[:, None]) + ridge * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(_sigmoid(w[0]))


def agreement(a: Sequence[str], b: Sequence[str]) -> float:
    """Share of prompts on which two judges give the same outcome (win, tie or loss)."""
    if len(a) != len(b):
        raise ValueError(f"agreement needs one outcome per prompt from each judge: {len(a)} vs {len(b)}")
    return sum(x == y for x, y in zip(a, b)) / len(a) if a else math.nan


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float:
    """Cohen's κ = (p_o − p_e) / (1 − p_e): agreement beyond what the judges' own outcome rates give
    by chance (p_e = Σ_c P_a(c)·P_b(c)). 1 when both always agree and p_e < 1; NaN when p_e = 1."""
    p_o = agreement(a, b)
    n = len(a)
    if not n:
        return math.nan
    p_e = sum((list(a).count(c) / n) * (list(b).count(c) / n) for c in set(a) | set(b))
    return (p_o - p_e) / (1 - p_e) if p_e < 1 else math.nan


def cluster_bootstrap_interval(
    clusters: Sequence[Sequence[float]], confidence: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of the pooled mean (e.g. the win rate) when values come in clusters
    (the n answers to one prompt), resampling whole clusters: answers to the same prompt are
    correlated, so treating them as independent would make the interval too narrow. Fixed seed."""
    clusters = [c for c in clusters if len(c)]
    if not clusters:
        return math.nan, math.nan
    sums = np.array([sum(c) for c in clusters], dtype=np.float64)
    sizes = np.array([len(c) for c in clusters], dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, len(clusters), size=(n_boot, len(clusters)))
    stats = sums[draws].sum(1) / sizes[draws].sum(1)
    tail = (1 - confidence) / 2
    return float(np.quantile(stats, tail)), float(np.quantile(stats, 1 - tail))


def clustered_sign_test_p(clusters: Sequence[Sequence[str]]) -> float:
    """Exact sign test over prompts: a prompt counts as won when the mean preference of its answers
    (win 1, tie ½, loss 0) is above ½, as lost when below, and is left out when exactly ½."""
    means = [sum(PREFERENCE[o] for o in c) / len(c) for c in clusters if len(c)]
    return sign_test_p(sum(m > 0.5 for m in means), sum(m < 0.5 for m in means))


def prompts_for_power(p1: float, p2: Optional[float] = None, alpha: float = 0.05, power: float = 0.8) -> float:
    """Prompts needed to tell a win rate p1 from 50 % (p2 None), or from another arm's p2 (then per
    arm), with a two-sided test at level `alpha` and the given power (normal approximation):

        vs 50 %:  n = [z₁₋α/₂·√(½·½)  + z_power·√(p1·q1)]² / (p1 − ½)²
        vs p2:    n = [z₁₋α/₂·√(2·p̄·q̄) + z_power·√(p1·q1 + p2·q2)]² / (p1 − p2)²,  p̄ = (p1 + p2)/2

    (q = 1 − p), rounded up; inf when the rates are equal. The two-arm formula treats the arms as
    independent samples; arms judged on the same prompts against the same baseline are positively
    correlated, so it overstates the need somewhat (conservative).
    """
    z_a, z_b = NormalDist().inv_cdf(1 - alpha / 2), NormalDist().inv_cdf(power)
    p0 = 0.5 if p2 is None else p2
    if p1 == p0:
        return math.inf
    if p2 is None:
        root = z_a * math.sqrt(0.25) + z_b * math.sqrt(p1 * (1 - p1))
    else:
        mean = (p1 + p2) / 2
        root = z_a * math.sqrt(2 * mean * (1 - mean)) + z_b * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))
    return float(math.ceil((root / (p1 - p0)) ** 2))
