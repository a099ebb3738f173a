"""Evaluation results: the per-sample record, its score, and the aggregate metrics.

Scores per kind: captions get corpus CIDEr-D and BLEU-4 against all their
references (and CHAIR when they carry ``objects``); multiple choice gets
``answer_matching.multiple_choice_accuracy``; every other kind gets
``answer_matching.vqa_accuracy`` (the VQAv2 soft score over 10 or more
references, else exact match against any reference, after the VQAv2
normalization); POPE-style kinds (``pope``, ``exists``) also get the POPE
scores. `summarize` aggregates per-sample results (objects or their JSON /
Parquet rows) into one metrics dict; `mean_std` aggregates one metric over
runs (e.g. seeds).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np

from workloads.answer_matching import exact_match, multiple_choice_accuracy, pope_metrics, vqa_accuracy
from workloads.caption_metrics import bleu4, cider_d, hallucination_rate
from workloads.eval_questions import CAPTION_KINDS, MULTIPLE_CHOICE, POPE_KINDS, synthetic_chair_vocabularies

# ---------------------------------------------------------------- per sample


def score_prediction(row: dict, prediction: str) -> float | None:
    """The per-sample score of a prediction: None for captions and rows without references."""
    kind, references = row["kind"], row.get("references") or []
    if kind in CAPTION_KINDS or not references:
        return None
    if kind == MULTIPLE_CHOICE:
        return multiple_choice_accuracy(prediction, row["choices"], row["answer"])
    return vqa_accuracy(prediction, references)


@dataclass
class SampleResult:
    question_id: str
    kind: str
    question: str
    answer: str | None
    """The reference the model was teacher-forced on for VC."""
    prediction: str
    correct: float | None
    """Score: VQA accuracy (soft over >=10 references, else exact match after VQA normalization),
    multiple-choice accuracy, or None (captions, rows without a reference, skipped rows)."""
    logp_with_image: float | None
    logp_null_image: float | None
    vc_sum: float | None
    """log p(A|V,I) - log p(A|V=∅,I), summed over response tokens; None without an image or answer."""
    vc_mean: float | None
    """vc_sum per response token."""
    response_tokens: int
    references: list[str] | None = None
    choices: list[str] | None = None
    objects: list[str] | None = None
    category: str | None = None
    image: str | None = None
    error: str | None = None
    """Why the row was not evaluated (e.g. no_trained_tokens when it does not fit max_length)."""


SAMPLE_FIELDS = tuple(f.name for f in fields(SampleResult))


def as_sample(value: SampleResult | dict) -> SampleResult:
    """A SampleResult from itself or from its row (JSON, Parquet); extra keys are ignored."""
    if isinstance(value, SampleResult):
        return value
    data = {k: value.get(k) for k in SAMPLE_FIELDS}
    for key in ("references", "choices", "objects"):
        if data[key] is not None:
            data[key] = [str(x) for x in data[key]]
    data["response_tokens"] = int(data["response_tokens"] or 0)
    return SampleResult(**data)


def sample_rows(samples: Sequence[SampleResult]) -> list[dict]:
    return [asdict(s) for s in samples]


# ---------------------------------------------------------------- aggregation


def default_chair_vocabularies(samples: Sequence[SampleResult]) -> dict[str, list[str]]:
    """The synthetic vocabularies when every named object is a synthetic colored shape, else
    the union of the objects named in the samples."""
    from workloads.synthetic import COLORS, SHAPES

    names = {o for s in samples for o in (s.objects or [])}
    synthetic = {f"{c} {s}" for c in COLORS for s in SHAPES}
    if names and names <= synthetic:
        return synthetic_chair_vocabularies()
    return {"": sorted(names)}


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def summarize(
    samples: Sequence[SampleResult | dict],
    questions: Sequence[dict] | None = None,
    skipped: dict[str, int] | None = None,
    *,
    chair_vocabularies: dict[str, Sequence[str]] | None = None,
) -> dict[str, float]:
    """Aggregate metrics of per-sample results (objects or their rows):

    - ``eval_samples`` (rows evaluated), ``eval_skipped_<reason>``;
    - ``accuracy`` (mean score over scored rows) and ``accuracy_<kind>``;
      ``exact_match`` (prediction equals the primary answer, VQA-normalized);
    - ``vc_mean`` / ``vc_sum``: mean over rows of VC per token / per sample,
      ``vc_mean_<kind>``, ``vc_positive_share``;
    - ``pope_accuracy``, ``pope_precision``, ``pope_recall``, ``pope_f1``,
      ``pope_yes_ratio`` over POPE-style rows;
    - ``caption_cider`` (CIDEr-D), ``caption_bleu4`` over captions, and
      ``chair_i<suffix>`` / ``chair_s<suffix>`` per CHAIR vocabulary when
      every caption row names its objects.

    `questions` is accepted for compatibility and unused (rows carry what is needed).
    """
    rows = [as_sample(s) for s in samples]
    ok = [s for s in rows if s.error is None]
    reasons = Counter(s.error for s in rows if s.error is not None)
    for reason, count in (skipped or {}).items():
        reasons[reason] += count
    metrics: dict[str, float] = {"eval_samples": float(len(ok))}
    for reason, count in sorted(reasons.items()):
        metrics[f"eval_skipped_{reason}"] = float(count)
    if not ok:
        return metrics

    scored = [s for s in ok if s.correct is not None]
    if scored:
        metrics["accuracy"] = _mean(s.correct for s in scored)
        for kind in sorted({s.kind for s in scored}):
            metrics[f"accuracy_{kind}"] = _mean(s.correct for s in scored if s.kind == kind)
    short = [s for s in ok if s.kind not in CAPTION_KINDS and s.answer]
    if short:
        metrics["exact_match"] = _mean(exact_match(s.prediction, s.answer) for s in short)

    with_vc = [s for s in ok if s.vc_mean is not None]
    if with_vc:
        metrics["vc_mean"] = _mean(s.vc_mean for s in with_vc)
        metrics["vc_sum"] = _mean(s.vc_sum for s in with_vc)
        metrics["vc_positive_share"] = _mean(float(s.vc_sum > 0) for s in with_vc)
        for kind in sorted({s.kind for s in with_vc}):
            metrics[f"vc_mean_{kind}"] = _mean(s.vc_mean for s in with_vc if s.kind == kind)

    pope = [s for s in ok if s.kind in POPE_KINDS and s.answer and s.answer.strip().lower() in ("yes", "no")]
    if pope:
        scores = pope_metrics([s.prediction for s in pope], [s.answer.strip().lower() for s in pope])
        metrics.update({f"pope_{k}": float(scores[k]) for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")})

    captions = [s for s in ok if s.kind in CAPTION_KINDS and s.references]
    if captions:
        predictions, references = [s.prediction for s in captions], [s.references for s in captions]
        metrics["caption_cider"] = float(cider_d(predictions, references))
        metrics["caption_bleu4"] = float(bleu4(predictions, references))
        if all(s.objects is not None for s in captions):
            vocabularies = (
                chair_vocabularies if chair_vocabularies is not None else default_chair_vocabularies(captions)
            )
            for suffix, vocabulary in vocabularies.items():
                chair = hallucination_rate(predictions, [s.objects for s in captions], vocabulary)
                metrics[f"chair_i{suffix}"] = float(chair["chair_i"])
                metrics[f"chair_s{suffix}"] = float(chair["chair_s"])
                metrics[f"caption_mentions{suffix}"] = float(chair["mentions"]) / len(captions)
    return metrics


def mean_std(values: Sequence[float], ddof: int = 1) -> tuple[float, float]:
    """Mean and standard deviation of ``values`` (e.g. one metric over seeds).

    ``ddof=1`` (default) gives the sample standard deviation, the usual "mean ±
    std over runs"; a single value has std 0.0. Raises on an empty input.
    """
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std of no values")
    mean = sum(vals) / len(vals)
    if len(vals) <= ddof:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - ddof)
    return mean, math.sqrt(var)
