"""Evaluation results: the per-sample record, its score, and the aggregate metrics.

Scores per kind: captions get corpus CIDEr-D and BLEU-4 against all their
references on COCO's tokenization (and CHAIR when they carry ``objects``);
multiple choice gets ``answer_matching.multiple_choice_accuracy`` with the
row's choice parser; every other kind gets ``answer_matching.score_short_answer``
with the row's answer rule (by default ``vqa``: the VQAv2 soft score over 10 or
more references, else exact match against any reference, after the VQAv2
normalization); POPE-style kinds (``pope``, ``exists``) also get the POPE
scores. `resolve_scoring` gives each question the rule published numbers use
for its suite (or the one asked for), `scoring_rules` says which were used.
`summarize` aggregates per-sample results (objects or their JSON / Parquet
rows) into one metrics dict; `mean_std` aggregates one metric over runs (e.g.
seeds).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np

from workloads.answer_matching import (
    ANSWER_RULES,
    CHOICE_PARSERS,
    exact_match,
    multiple_choice_accuracy,
    pope_metrics,
    score_short_answer,
)
from workloads.caption_metrics import bleu4, cider_d, hallucination_rate
from workloads.chair import coco_chair as published_chair
from workloads.eval_questions import CAPTION_KINDS, MULTIPLE_CHOICE, POPE_KINDS, synthetic_chair_vocabularies

# ---------------------------------------------------------------- per sample


def score_prediction(
    row: dict, prediction: str, *, answer_rule: str | None = None, choice_parser: str | None = None
) -> float | None:
    """The per-sample score of a prediction: None for captions and rows without references.

    The rule is the argument, else the row's ``answer_rule`` / ``choice_parser`` (see `resolve_scoring`),
    else ``vqa`` / ``lenient``."""
    kind, references = row["kind"], row.get("references") or []
    if kind in CAPTION_KINDS or not references:
        return None
    if kind == MULTIPLE_CHOICE:
        parser = choice_parser or row.get("choice_parser") or "lenient"
        return multiple_choice_accuracy(prediction, row["choices"], row["answer"], parser)
    return score_short_answer(prediction, references, answer_rule or row.get("answer_rule") or "vqa")


def _default_rules(kind: str, suite: str | None, synthetic: bool) -> tuple[str, str]:
    """(answer rule, choice parser) of published numbers for a question of this kind and suite: GQA's for
    a ``gqa`` kind or a suite file named like GQA, VQAv2's otherwise; LLaVA's letter parser for multiple
    choice (ScienceQA, MMBench-style files), the lenient one on the synthetic suite (l2t's own)."""
    name = (suite or "").lower().rsplit("/", 1)[-1]
    rule = "gqa" if kind.lower() == "gqa" or "gqa" in name else "vqa"
    return rule, "lenient" if synthetic else "llava"


def _pick(explicit: str, *fallbacks: str | None) -> str | None:
    """``explicit`` unless it is ``auto``, else the first fallback that is set."""
    if explicit != "auto":
        return explicit
    return next((value for value in fallbacks if value not in (None, "", "auto")), None)


def resolve_scoring(
    questions: Sequence[dict],
    *,
    answer_rule: str = "auto",
    choice_parser: str = "auto",
    suite: str | None = None,
    synthetic: bool = False,
    file_settings: dict | None = None,
) -> list[dict]:
    """The questions, each with the ``answer_rule`` and ``choice_parser`` it is scored by.

    An explicit ``answer_rule`` / ``choice_parser`` (not ``auto``) wins; else the row's own value, else the
    question file's (``file_settings``), else the suite's published default (`_default_rules`)."""
    settings = file_settings or {}
    out = []
    for q in questions:
        rule, parser = _default_rules(str(q.get("kind", "")), suite, synthetic)
        rule = _pick(answer_rule, q.get("answer_rule"), settings.get("answer_rule"), rule)
        parser = _pick(choice_parser, q.get("choice_parser"), settings.get("choice_parser"), parser)
        if rule not in ANSWER_RULES or parser not in CHOICE_PARSERS:
            raise ValueError(
                f"question {q.get('question_id')}: answer_rule must be one of {ANSWER_RULES} and choice_parser "
                f"one of {CHOICE_PARSERS} (or auto), got {rule!r} and {parser!r}"
            )
        out.append({**q, "answer_rule": rule, "choice_parser": parser})
    return out


def scoring_rules(questions: Sequence[dict]) -> dict[str, str]:
    """``{kind: rule}`` of the scored questions: the choice parser for multiple choice, the answer rule for
    other short answers (several, comma-separated, when rows of one kind differ); captions are not listed."""
    used: dict[str, set[str]] = {}
    for q in questions:
        kind = str(q.get("kind"))
        if kind in CAPTION_KINDS or not q.get("references"):
            continue
        if kind == MULTIPLE_CHOICE:
            rule = q.get("choice_parser") or "lenient"
        else:
            rule = q.get("answer_rule") or "vqa"
        used.setdefault(kind, set()).add(rule)
    return {kind: ",".join(sorted(rules)) for kind, rules in sorted(used.items())}


@dataclass
class SampleResult:
    question_id: str
    kind: str
    question: str
    answer: str | None
    """The reference the model was teacher-forced on for VC."""
    prediction: str
    correct: float | None
    """Score under the question's rule (`score_prediction`): VQA accuracy by default (soft over >=10
    references, else exact match after VQA normalization), GQA's or exact match, multiple-choice accuracy,
    or None (captions, rows without a reference, skipped rows)."""
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
    images: list[str] | None = None
    """The question's images, in order (None: a text-only question)."""
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


def _synthetic_objects(samples: Sequence[SampleResult]) -> bool:
    """Whether every object the samples name is a synthetic colored shape ("red circle")."""
    from workloads.synthetic import COLORS, SHAPES

    names = {o for s in samples for o in (s.objects or [])}
    return bool(names) and names <= {f"{c} {s}" for c in COLORS for s in SHAPES}


def default_chair_vocabularies(samples: Sequence[SampleResult]) -> dict[str, list[str]]:
    """The synthetic world's CHAIR vocabularies when every named object is a synthetic colored shape, else
    none: captions of other suites get the published COCO CHAIR (`workloads.chair`) as ``chair_i`` / ``chair_s``."""
    return synthetic_chair_vocabularies() if _synthetic_objects(samples) else {}


def chair_metrics(
    captions: Sequence[SampleResult],
    vocabularies: dict[str, Sequence[str]] | None = None,
    coco: bool | None = None,
) -> dict[str, float]:
    """CHAIR of caption samples that name their objects.

    Per vocabulary (`hallucination_rate`): ``chair_i<suffix>``, ``chair_s<suffix>``,
    ``caption_mentions<suffix>`` (mentions per caption). With ``coco`` (default: unless the objects are
    synthetic), the published COCO CHAIR (`coco_chair`, ground truth: the objects and the reference
    captions): ``chair_coco_i``, ``chair_coco_s``, ``caption_mentions_coco``, which are also ``chair_i`` /
    ``chair_s`` when no vocabulary claims the suite's default (suffix "")."""
    predictions, objects = [s.prediction for s in captions], [s.objects or [] for s in captions]
    vocabularies = default_chair_vocabularies(captions) if vocabularies is None else vocabularies
    metrics: dict[str, float] = {}
    for suffix, vocabulary in vocabularies.items():
        chair = hallucination_rate(predictions, objects, vocabulary)
        metrics[f"chair_i{suffix}"] = float(chair["chair_i"])
        metrics[f"chair_s{suffix}"] = float(chair["chair_s"])
        metrics[f"caption_mentions{suffix}"] = float(chair["mentions"]) / len(captions)
    if coco if coco is not None else not _synthetic_objects(captions):
        chair = published_chair(predictions, objects, [s.references or [] for s in captions])
        names = [
            ("chair_coco_i", "chair_i"),
            ("chair_coco_s", "chair_s"),
            ("caption_mentions_coco", "caption_mentions"),
        ]
        values = [chair["chair_i"], chair["chair_s"], chair["mentions"] / len(captions)]
        for (name, default), value in zip(names, values):
            metrics[name] = float(value)
            if "" not in vocabularies:
                metrics[default] = float(value)
    return metrics


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def summarize(
    samples: Sequence[SampleResult | dict],
    questions: Sequence[dict] | None = None,
    skipped: dict[str, int] | None = None,
    *,
    chair_vocabularies: dict[str, Sequence[str]] | None = None,
    coco_chair: bool | None = None,
) -> dict[str, float]:
    """Aggregate metrics of per-sample results (objects or their rows):

    - ``eval_samples`` (rows evaluated), ``eval_skipped_<reason>``;
    - ``accuracy`` (mean score over scored rows) and ``accuracy_<kind>``;
      ``exact_match`` (prediction equals the primary answer, VQA-normalized);
    - ``vc_mean`` / ``vc_sum``: mean over rows of VC per token / per sample,
      ``vc_mean_<kind>``, ``vc_positive_share``;
    - ``pope_accuracy``, ``pope_precision``, ``pope_recall``, ``pope_f1``,
      ``pope_yes_ratio`` over POPE-style rows;
    - ``caption_cider`` (CIDEr-D), ``caption_bleu4`` over captions (COCO's
      tokenization), and, when every caption row names its objects, CHAIR
      (`chair_metrics`): ``chair_i`` / ``chair_s`` with the suite's default
      (the synthetic vocabulary on synthetic scenes, COCO's CHAIR otherwise),
      ``chair_i<suffix>`` per other vocabulary, ``chair_coco_i`` / ``chair_coco_s``
      whenever COCO's CHAIR is computed (``coco_chair``: default unless the
      objects are synthetic).

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
            metrics.update(chair_metrics(captions, chair_vocabularies, coco_chair))
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
