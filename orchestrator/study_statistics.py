"""Paired comparisons of study arms: mean ± std over seeds and a hierarchical bootstrap interval.

A study compares arms (a masking mode, a λ pair, ...) trained with several
seeds and evaluated on the same held-out questions. Two sources of noise
matter: the seed (weights init, data order) and the finite question set. The
interval of an arm's difference against the baseline accounts for both with a
two-level bootstrap (Davison & Hinkley's hierarchical resampling): each
replicate draws seeds with replacement from the seeds both arms share, then,
for every drawn seed, questions with replacement from the question ids both
arms answered; the arm and the baseline are scored on the same draw (paired),
and the replicate's difference is the mean over the drawn seeds. The 95%
interval is the 2.5th and 97.5th percentile of the replicates. With one seed
it is an interval over questions only.

Per-question metrics (accuracy, accuracy per kind, visual contribution) are
resampled as arrays; corpus metrics (CIDEr-D, BLEU-4, CHAIR, POPE F1) are
recomputed with `workloads.eval_summary.summarize` on each replicate's rows.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Rows = Sequence[dict]
"""One trial's evaluation samples (rows of `samples.jsonl`: question_id, kind, correct, vc_mean, ...)."""

PER_QUESTION = {"accuracy": "correct", "vc_mean": "vc_mean", "vc_sum": "vc_sum"}


@dataclass
class PairedDifference:
    """Arm minus baseline on shared seeds and questions, with its bootstrap interval."""

    metric: str
    difference: float
    low: float
    high: float
    seeds: int
    questions: int
    replicates: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def text(self, digits: int = 3) -> str:
        star = " *" if self.excludes_zero else ""
        return f"{self.difference:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]{star}"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) of the finite values."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return math.nan, math.nan
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0


def _per_question_values(rows: Rows, metric: str) -> np.ndarray | None:
    """Per-row values whose mean is `metric` (NaN where a row doesn't count), or None for corpus metrics."""
    kind = None
    if metric.startswith("accuracy_"):
        metric, kind = "accuracy", metric[len("accuracy_") :]
    field = PER_QUESTION.get(metric)
    if field is None:
        return None
    values = []
    for row in rows:
        value = row.get(field)
        counts = value is not None and row.get("error") is None and (kind is None or row.get("kind") == kind)
        values.append(float(value) if counts else math.nan)
    return np.asarray(values, dtype=np.float64)


def _scorer(rows: Rows, metric: str) -> Callable[[np.ndarray], float]:
    """A function of question indices (with repeats) giving `metric` over those rows."""
    values = _per_question_values(rows, metric)
    if values is not None:

        def mean_of(index: np.ndarray) -> float:
            chosen = values[index]
            chosen = chosen[~np.isnan(chosen)]
            return float(chosen.mean()) if len(chosen) else math.nan

        return mean_of
    from workloads.eval_questions import CAPTION_KINDS, POPE_KINDS
    from workloads.eval_summary import summarize

    # Only the rows a corpus metric reads are kept, so each replicate scores a few dozen rows, not all.
    kinds = (
        CAPTION_KINDS
        if metric.startswith(("caption_", "chair_"))
        else POPE_KINDS
        if metric.startswith("pope_")
        else None
    )
    relevant = [i for i, row in enumerate(rows) if kinds is None or row.get("kind") in kinds]
    keep = np.zeros(len(rows), dtype=bool)
    keep[relevant] = True
    if metric in ("caption_cider", "caption_bleu4"):
        from workloads.caption_metrics import bleu4, cider_d

        score = cider_d if metric == "caption_cider" else bleu4

        def caption_metric(index: np.ndarray) -> float:
            chosen = [rows[i] for i in index[keep[index]] if rows[i].get("error") is None and rows[i].get("references")]
            return (
                float(score([r["prediction"] or "" for r in chosen], [r["references"] for r in chosen]))
                if chosen
                else math.nan
            )

        return caption_metric

    def corpus(index: np.ndarray) -> float:
        return float(summarize([rows[i] for i in index[keep[index]]]).get(metric, math.nan))

    return corpus


def _aligned(arm: Mapping[int, Rows], base: Mapping[int, Rows]) -> tuple[list[int], list[str], dict, dict]:
    """Seeds both arms have, question ids every run of both answered, rows reordered to those ids."""
    seeds = sorted(set(arm) & set(base))
    if not seeds:
        raise ValueError("the arm and the baseline share no seed")
    ids = None
    for runs in (arm, base):
        for seed in seeds:
            present = {str(r.get("question_id")) for r in runs[seed]}
            ids = present if ids is None else ids & present
    questions = sorted(ids or ())
    if not questions:
        raise ValueError("the arm and the baseline share no evaluation question")

    def reorder(runs: Mapping[int, Rows]) -> dict[int, list[dict]]:
        out = {}
        for seed in seeds:
            by_id = {str(r.get("question_id")): r for r in runs[seed]}
            out[seed] = [by_id[q] for q in questions]
        return out

    return seeds, questions, reorder(arm), reorder(base)


def paired_difference(
    arm: Mapping[int, Rows],
    base: Mapping[int, Rows],
    metric: str,
    *,
    replicates: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> PairedDifference:
    """`metric` of `arm` minus `base` ({seed: samples} each), with a hierarchical paired bootstrap interval."""
    seeds, questions, arm_rows, base_rows = _aligned(arm, base)
    score_arm = {s: _scorer(arm_rows[s], metric) for s in seeds}
    score_base = {s: _scorer(base_rows[s], metric) for s in seeds}
    everything = np.arange(len(questions))
    point = float(np.nanmean([score_arm[s](everything) - score_base[s](everything) for s in seeds]))
    rng = np.random.default_rng(seed)
    draws = np.empty(replicates)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a draw may hold no row of a kind: NaN, skipped
        for b in range(replicates):
            chosen = rng.choice(len(seeds), size=len(seeds), replace=True) if len(seeds) > 1 else [0]
            diffs = []
            for k in chosen:
                index = rng.integers(0, len(questions), size=len(questions))
                diffs.append(score_arm[seeds[k]](index) - score_base[seeds[k]](index))
            draws[b] = np.nanmean(diffs)
    tail = (1 - confidence) / 2
    low, high = np.nanquantile(draws, [tail, 1 - tail])
    return PairedDifference(metric, point, float(low), float(high), len(seeds), len(questions), replicates)


def conclusion(name: str, baseline: str, result: PairedDifference) -> str:
    """One line saying what the interval allows one to conclude."""
    scope = f"{result.seeds} seed(s) x {result.questions} questions"
    if result.excludes_zero:
        direction = "higher" if result.difference > 0 else "lower"
        return (
            f"{name} is {direction} than {baseline} on {result.metric} by {result.text()} (95% interval over "
            f"{scope} excludes 0): a difference this data supports."
        )
    return (
        f"{name} vs {baseline} on {result.metric}: {result.text()} (95% interval over {scope} includes 0): "
        f"no difference can be concluded from this data."
    )
