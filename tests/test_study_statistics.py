"""The paired interval code against worked examples where the true difference is known."""

import math

import numpy as np
import pytest

from orchestrator.study_statistics import conclusion, mean_std, paired_difference


def _rows(correct, prefix="q", kind="color"):
    return [{"question_id": f"{prefix}{i}", "kind": kind, "correct": float(c)} for i, c in enumerate(correct)]


def test_identical_arms_differ_by_exactly_zero():
    rows = _rows(np.random.default_rng(0).integers(0, 2, 200))
    result = paired_difference({0: rows, 1: rows}, {0: rows, 1: rows}, "accuracy", replicates=200)
    assert (result.difference, result.low, result.high) == (0.0, 0.0, 0.0)
    assert not result.excludes_zero


def test_a_known_difference_over_questions():
    """One seed, 1000 questions: the arm answers 30% more of them. Difference 0.3, binomial-width interval."""
    n = 1000
    base = _rows([0] * n)
    arm = _rows([1] * 300 + [0] * 700)
    result = paired_difference({0: arm}, {0: base}, "accuracy", replicates=2000, seed=1)
    assert result.difference == pytest.approx(0.3)
    assert result.low < 0.3 < result.high and result.excludes_zero
    half_width = 1.96 * math.sqrt(0.3 * 0.7 / n)  # the normal approximation of the paired proportion's interval
    assert (result.high - result.low) / 2 == pytest.approx(half_width, rel=0.15)
    assert result.seeds == 1 and result.questions == n


def test_seed_to_seed_spread_widens_the_interval():
    """Per-seed true differences 0.1, 0.2, 0.3 (exact): the mean is 0.2 and seeds drive the interval."""
    n = 400
    base = {s: _rows([0] * n) for s in range(3)}
    arm = {s: _rows([1] * int(n * d) + [0] * (n - int(n * d))) for s, d in enumerate((0.1, 0.2, 0.3))}
    result = paired_difference(arm, base, "accuracy", replicates=2000, seed=2)
    assert result.difference == pytest.approx(0.2)
    assert 0.09 < result.low < 0.17 and 0.23 < result.high < 0.31
    questions_only = paired_difference({1: arm[1]}, {1: base[1]}, "accuracy", replicates=2000, seed=2)
    assert (result.high - result.low) > 1.5 * (questions_only.high - questions_only.low)


def test_questions_are_matched_by_id_and_unshared_ones_left_out():
    base = _rows([0, 0, 1, 1])
    arm = list(reversed(_rows([1, 0, 1, 1]))) + [{"question_id": "extra", "kind": "color", "correct": 1.0}]
    result = paired_difference({0: arm}, {0: base}, "accuracy", replicates=100)
    assert result.questions == 4 and result.difference == pytest.approx(0.25)


def test_a_noisy_null_difference_includes_zero_and_says_so():
    rng = np.random.default_rng(3)
    base = {s: _rows(rng.integers(0, 2, 300)) for s in range(3)}
    arm = {s: _rows(rng.integers(0, 2, 300)) for s in range(3)}
    result = paired_difference(arm, base, "accuracy", replicates=500)
    assert result.low < 0 < result.high and not result.excludes_zero
    assert "no difference can be concluded" in conclusion("l2t", "response", result)
    strong = paired_difference({0: _rows([1] * 50)}, {0: _rows([0] * 50)}, "accuracy", replicates=100)
    assert "excludes 0" in conclusion("l2t", "response", strong) and strong.text().endswith("*")


def test_per_kind_and_corpus_metrics():
    base = _rows([0, 1, 0, 1], kind="color") + _rows([1, 1], prefix="s", kind="shape")
    arm = _rows([1, 1, 1, 1], kind="color") + _rows([1, 1], prefix="s", kind="shape")
    color = paired_difference({0: arm}, {0: base}, "accuracy_color", replicates=100)
    assert color.difference == pytest.approx(0.5)
    shape = paired_difference({0: arm}, {0: base}, "accuracy_shape", replicates=100)
    assert shape.difference == 0.0
    captions = [
        {"question_id": f"c{i}", "kind": "caption", "prediction": p, "references": [r], "correct": None}
        for i, (p, r) in enumerate([("a red circle", "a red circle"), ("a blue square", "a green square")])
    ]
    cider = paired_difference({0: captions}, {0: captions}, "caption_cider", replicates=20)
    assert cider.difference == 0.0 and cider.low == 0.0 and cider.high == 0.0


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))
