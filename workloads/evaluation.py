"""Held-out evaluation of a trained model: answers, scores and visual contribution.

Every question is encoded exactly as training data is (same chat template,
same segments), with its reference answer as the assistant turn. The prompt
is everything before the first response token; the model answers it with
greedy or beam-search decoding. The same encoded row, scored with the real
image and with V=∅, gives the visual contribution over the response tokens:

    VC = log p(A | V, I) - log p(A | V=∅, I)

reported per sample as the sum over response tokens (``vc_sum``) and as the
per-token mean (``vc_mean``); the aggregates are their means over samples.
V=∅ is random noise (the paper's choice: a standard normal draw in the image
processor's normalized pixel space, seeded per question so that a sample's
score does not depend on batching), a blank image (zeros in normalized space:
the processor's mean color), or no image at all (the image tokens removed).

Questions are LLaVA-style evaluation rows (one JSON object per line)::

    {"question_id": ..., "image": "path/relative/to/image_root.jpg",
     "text": "What is the man holding?\\nAnswer the question using a single word or phrase.",
     "answer": "frisbee"                        # one reference, or
     "answers": ["frisbee", "disc", ...]        # VQAv2-style lists (strings or {"answer": ...}), or
     "label": "yes"                             # POPE files
     "choices": ["red", "green", "blue"]        # multiple choice (answer: option text or letter)
     "kind": "vqa" | "caption" | "pope" | "exists" | "multiple_choice" | "color" | ...
     "objects": ["red circle"]                  # what is in the image (CHAIR)
     "category": ...}                           # kept in the outputs, e.g. POPE's split

``text`` may also be called ``question`` or ``prompt``; it is used verbatim
(multiple-choice rows must list their options in it, as LLaVA's files do), and
``<image>\\n`` is prepended when the row has an image and no placeholder.
A row without any reference is still answered (its prediction is written) but
neither scored nor used for VC.

Scores per kind: captions get corpus CIDEr-D and BLEU-4 against all their
references (and CHAIR when they carry ``objects``); multiple choice gets
``metrics.multiple_choice_accuracy``; every other kind gets
``metrics.vqa_accuracy`` (the VQAv2 soft score over 10 or more references,
else exact match against any reference, after the VQAv2 normalization);
POPE-style kinds (``pope``, ``exists``) also get the POPE scores.

This module knows nothing of Ray: `Evaluator` scores a list of questions in
one process; orchestrator/evaluate.py runs it inside Ray Data actors.
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workloads.conversations import IMAGE_PLACEHOLDER, Conversation, ConversationError, Turn
from workloads.loss import token_nll
from workloads.metrics import (
    bleu4,
    cider_d,
    exact_match,
    hallucination_rate,
    multiple_choice_accuracy,
    normalize_vqa_answer,
    pope_metrics,
    vqa_accuracy,
)
from workloads.segment_codes import Segment
from workloads.segments import EncodeSpec, encode_conversations

NULL_IMAGES = ("noise", "blank", "none")
CAPTION_KINDS = frozenset({"caption"})
POPE_KINDS = frozenset({"pope", "exists"})
MULTIPLE_CHOICE = "multiple_choice"
SYNTHETIC_SUITE = "synthetic"
TEXT_KEYS = ("text", "question", "prompt")


class QuestionError(ValueError):
    """An evaluation row that can't be used; the message names the row."""


# ---------------------------------------------------------------- questions


def _reference_list(row: dict) -> list[str]:
    """Every reference answer of a row, in file order (duplicates kept: they weigh in the soft score).

    `answers` (VQAv2's ten, a caption's references) when present, else `answer` (a string or a
    list) or POPE's `label`; a lone `answer` beside `answers` only picks the VC target."""
    answers = row.get("answers")
    if answers is None or answers == []:
        answers = row.get("answer", row.get("label"))
    if answers is None:
        return []
    if not isinstance(answers, (list, tuple)):
        answers = [answers]
    refs = [str(item["answer"] if isinstance(item, dict) else item) for item in answers]
    return [r for r in refs if r.strip()]


def primary_answer(row: dict, references: Sequence[str]) -> str | None:
    """The answer the model is teacher-forced on for VC: `answer` (or `label`) when it is one string,
    else the most frequent reference after VQA normalization (first seen wins a tie)."""
    answer = row.get("answer", row.get("label"))
    if isinstance(answer, str) and answer.strip():
        return answer
    if not references:
        return None
    counts = Counter(normalize_vqa_answer(r) for r in references)
    best = max(counts.values())
    return next(r for r in references if counts[normalize_vqa_answer(r)] == best)


def normalize_question(row: dict, position: int = 0, default_kind: str | None = None) -> dict:
    """One evaluation row in the shape `Evaluator` reads (see the module docstring for the input)."""
    if not isinstance(row, dict):
        raise QuestionError(f"question {position}: not a JSON object")
    text = next((row[k] for k in TEXT_KEYS if isinstance(row.get(k), str) and row[k].strip()), None)
    if text is None:
        raise QuestionError(f"question {position}: no question text (one of {TEXT_KEYS})")
    image = row.get("image")
    if isinstance(image, list):
        if len(image) > 1:
            raise QuestionError(f"question {position}: one image per question is supported, got {len(image)}")
        image = image[0] if image else None
    if not image and IMAGE_PLACEHOLDER in text:
        raise QuestionError(f"question {position}: {IMAGE_PLACEHOLDER} in the text but no image")
    references = _reference_list(row)
    choices = row.get("choices", row.get("options"))
    if choices is not None:
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices) or len(choices) < 2:
            raise QuestionError(f"question {position}: choices must be a list of at least 2 strings")
    kind = row.get("kind") or default_kind
    if not kind:
        kind = MULTIPLE_CHOICE if choices else ("pope" if "label" in row else "vqa")
    if kind == MULTIPLE_CHOICE and not choices:
        raise QuestionError(f"question {position}: kind {MULTIPLE_CHOICE!r} needs choices")
    objects = row.get("objects")
    return {
        "question_id": str(row.get("question_id", row.get("id", position))),
        "image": str(image) if image else None,
        "text": text,
        "answer": primary_answer(row, references),
        "references": references,
        "choices": list(choices) if choices else None,
        "kind": str(kind),
        "objects": [str(o) for o in objects] if objects is not None else None,
        "category": None if row.get("category") is None else str(row["category"]),
    }


def parse_question_lines(
    lines: Iterable[str], *, limit: int | None = None, default_kind: str | None = None
) -> list[dict]:
    """Normalized questions from JSONL lines (or the text of a JSON list, as one item)."""
    rows: list[dict] = []
    for number, line in enumerate(lines, start=1):
        if limit is not None and len(rows) >= limit:
            break
        line = line.strip()
        if not line:
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise QuestionError(f"line {number}: not JSON ({error})") from None
        for row in value if isinstance(value, list) else [value]:
            if limit is not None and len(rows) >= limit:
                break
            rows.append(normalize_question(row, len(rows), default_kind))
    ids = Counter(r["question_id"] for r in rows)
    duplicated = [q for q, n in ids.items() if n > 1]
    if duplicated:
        raise QuestionError(f"question ids must be unique; repeated: {duplicated[:5]}")
    return rows


def synthetic_questions(
    out_dir: str | Path,
    *,
    rows: int = 200,
    seed: int = 0,
    max_objects: int = 1,
    image_size: int = 32,
    kinds: Sequence[str] | None = None,
) -> tuple[list[dict], str]:
    """The synthetic suite: held-out scenes (indices from synthetic.EVAL_START, disjoint from every
    training row) with captioning, color, shape, counting and POPE-style questions; renders their
    images under `out_dir`. Returns (normalized questions, image root).

    Use the training set's `max_objects` and `image_size`: the suite is only held out, not shifted."""
    from workloads.synthetic import SINGLE_ROUND_KINDS, generate_eval_questions, write_images

    raw = list(
        generate_eval_questions(
            rows, seed=seed, max_objects=max_objects, image_size=image_size, kinds=tuple(kinds or SINGLE_ROUND_KINDS)
        )
    )
    write_images(raw, Path(out_dir), seed=seed, max_objects=max_objects, image_size=image_size)
    return [normalize_question(r, i) for i, r in enumerate(raw)], str(out_dir)


def synthetic_chair_vocabularies() -> dict[str, list[str]]:
    """CHAIR vocabularies of the synthetic world: objects are colored shapes ("red circle"), so a
    caption naming a color-shape pair that is not in the scene hallucinates (``chair_*``); the
    coarse ``chair_*_shape`` counts only shapes that are not there."""
    from workloads.synthetic import COLORS, SHAPES

    return {"": [f"{c} {s}" for c in COLORS for s in SHAPES] + list(SHAPES), "_shape": list(SHAPES)}


def question_conversation(row: dict, answer: str | None = None) -> Conversation:
    """A question row as a one-round conversation answered by `answer` (default: its reference;
    "?" stands in when it has none, which only serves to find the prompt)."""
    text = row["text"]
    images = (row["image"],) if row.get("image") else ()
    if images and IMAGE_PLACEHOLDER not in text:
        text = f"{IMAGE_PLACEHOLDER}\n{text}"
    if answer is None:
        answer = row.get("answer")
        if isinstance(answer, list):
            answer = answer[0] if answer else None
    return Conversation(
        id=str(row["question_id"]), turns=(Turn("user", text), Turn("assistant", answer or "?")), images=images
    )


# ---------------------------------------------------------------- scoring


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


def _noise(shape: tuple[int, ...], seed: int, question_id: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed((seed << 32) ^ zlib.crc32(question_id.encode()))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def _pad(rows: list[np.ndarray], value: int, left: bool) -> torch.Tensor:
    length = max(len(r) for r in rows)
    out = np.full((len(rows), length), value, dtype=np.int64)
    for i, r in enumerate(rows):
        if left:
            out[i, length - len(r) :] = r
        else:
            out[i, : len(r)] = r
    return torch.from_numpy(out)


@torch.no_grad()
def _response_logp(
    model, ids: list[np.ndarray], segments: list[np.ndarray], pixel_values, pad_id: int, device
) -> tuple[np.ndarray, np.ndarray]:
    """Summed log p of RESPONSE tokens per row, and their count."""
    input_ids = _pad(ids, pad_id, left=False).to(device)
    segs = _pad(segments, int(Segment.PAD), left=False).to(device)
    attention = (segs != int(Segment.PAD)).long()
    logits = model(input_ids=input_ids, attention_mask=attention, pixel_values=pixel_values).logits
    nll = token_nll(logits, input_ids)
    is_response = (segs[:, 1:] == int(Segment.RESPONSE)).float()
    return (-(nll * is_response).sum(dim=1)).cpu().numpy(), is_response.sum(dim=1).cpu().numpy()


def open_local_image(image_root: str | Path | None) -> Callable[[str], Any]:
    from PIL import Image

    def open_image(path: str):
        with Image.open(Path(image_root or ".", path)) as image:
            return image.convert("RGB")

    return open_image


class Evaluator:
    """Answers and scores batches of normalized questions with one loaded model.

    `max_new_tokens` bounds every answer (captions need ~24 tokens; short
    answers stop at the end-of-sequence token anyway); `num_beams` > 1 is beam
    search, 1 greedy decoding. `open_image(path) -> PIL image` reads images
    (default: local files under `image_root`).
    """

    def __init__(
        self,
        model,
        tokenizer,
        image_processor,
        spec: EncodeSpec,
        *,
        image_root: str | Path | None = None,
        open_image: Callable[[str], Any] | None = None,
        null_image: str = "noise",
        max_new_tokens: int = 32,
        num_beams: int = 1,
        seed: int = 0,
    ):
        if null_image not in NULL_IMAGES:
            raise ValueError(f"null_image must be one of {NULL_IMAGES}, got {null_image!r}")
        if num_beams < 1 or max_new_tokens < 1:
            raise ValueError("num_beams and max_new_tokens must be >= 1")
        self.model, self.tokenizer, self.image_processor, self.spec = model, tokenizer, image_processor, spec
        self.open_image = open_image or open_local_image(image_root)
        self.null_image, self.max_new_tokens, self.num_beams, self.seed = null_image, max_new_tokens, num_beams, seed
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        model.eval()

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str,
        spec: EncodeSpec | None = None,
        *,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        **options,
    ) -> "Evaluator":
        """Load model, tokenizer and image processor from a `save_pretrained` folder.

        Without `spec`, one is made with `vicuna_v1`, max_length 2048 and the
        image token count of the model's config."""
        from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        from workloads.model import num_image_tokens

        if dtype is None:
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).to(device)
        spec = spec or EncodeSpec("vicuna_v1", num_image_tokens(AutoConfig.from_pretrained(model_dir)), 2048)
        return cls(
            model,
            AutoTokenizer.from_pretrained(model_dir),
            AutoImageProcessor.from_pretrained(model_dir),
            spec,
            **options,
        )

    def _pixels(self, images: list) -> torch.Tensor | None:
        if not images:
            return None
        param = next(self.model.parameters())
        values = self.image_processor(images=images, return_tensors="np")["pixel_values"]
        return torch.as_tensor(np.asarray(values)).to(param.device, param.dtype)

    @torch.no_grad()
    def __call__(self, questions: Sequence[dict]) -> list[SampleResult]:
        """One result per question, in order (failed rows carry `error`)."""
        model = self.model
        device = next(model.parameters()).device
        results: list[SampleResult | None] = [None] * len(questions)
        encoded = encode_conversations([question_conversation(q) for q in questions], self.tokenizer, self.spec)
        kept, images = [], {}
        for i, (q, e) in enumerate(zip(questions, encoded)):
            if isinstance(e, ConversationError):
                results[i] = _failed(q, e.reason)
            elif q.get("image") and e.images_kept < 1:
                results[i] = _failed(q, "image_truncated")
            else:
                if q.get("image"):
                    try:
                        images[i] = self.open_image(q["image"])
                    except (OSError, ValueError):  # missing or unreadable: this row fails, not the batch
                        results[i] = _failed(q, "unreadable_image")
                        continue
                kept.append(i)
        if kept:
            rows = [questions[i] for i in kept]
            samples = self._score([encoded[i] for i in kept], rows, [images[i] for i in kept if i in images], device)
            for i, sample in zip(kept, samples):
                results[i] = sample
        return results  # type: ignore[return-value]

    def _score(self, encoded: list, rows: list[dict], images: list, device) -> list[SampleResult]:
        model, tokenizer = self.model, self.tokenizer
        has_image = [bool(r.get("image")) for r in rows]
        pixel_values = self._pixels(images)
        ids = [e.input_ids.astype(np.int64) for e in encoded]
        segments = [e.segments.astype(np.int64) for e in encoded]
        prompts = [i[: int(np.argmax(s == int(Segment.RESPONSE)))] for i, s in zip(ids, segments)]

        prompt_ids = _pad(prompts, self.pad_id, left=True).to(device)
        prompt_mask = _pad([np.ones(len(p), np.int64) for p in prompts], 0, left=True).to(device)
        generated = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            pixel_values=pixel_values,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            num_beams=self.num_beams,
            num_return_sequences=1,
            pad_token_id=self.pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        predictions = [
            p.strip() for p in tokenizer.batch_decode(generated[:, prompt_ids.shape[1] :], skip_special_tokens=True)
        ]

        answered = [bool(r.get("answer")) for r in rows]
        logp_real = logp_null = counts = None
        if any(answered):
            logp_real, counts = _response_logp(model, ids, segments, pixel_values, self.pad_id, device)
            if pixel_values is None:
                logp_null = logp_real
            elif self.null_image == "none":
                keep = [s != int(Segment.IMAGE) for s in segments]
                null_ids = [i[k] for i, k in zip(ids, keep)]
                null_segments = [s[k] for s, k in zip(segments, keep)]
                logp_null, _ = _response_logp(model, null_ids, null_segments, None, self.pad_id, device)
            else:
                image_ids = [str(r["question_id"]) for r in rows if r.get("image")]
                if self.null_image == "noise":
                    shape = tuple(pixel_values.shape[1:])
                    null = torch.stack([_noise(shape, self.seed, q) for q in image_ids]).to(pixel_values)
                else:
                    null = torch.zeros_like(pixel_values)
                logp_null, _ = _response_logp(model, ids, segments, null, self.pad_id, device)

        samples = []
        for k, (row, prediction) in enumerate(zip(rows, predictions)):
            scored = answered[k] and has_image[k]
            lr = float(logp_real[k]) if answered[k] else None
            ln = float(logp_null[k]) if scored else None
            n = int(counts[k]) if answered[k] else 0
            samples.append(
                SampleResult(
                    question_id=str(row["question_id"]),
                    kind=row["kind"],
                    question=row["text"],
                    answer=row.get("answer"),
                    prediction=prediction,
                    correct=score_prediction(row, prediction),
                    logp_with_image=lr,
                    logp_null_image=ln,
                    vc_sum=(lr - ln) if scored else None,
                    vc_mean=(lr - ln) / max(n, 1) if scored else None,
                    response_tokens=n,
                    references=row.get("references"),
                    choices=row.get("choices"),
                    objects=row.get("objects"),
                    category=row.get("category"),
                    image=row.get("image"),
                )
            )
        return samples


def _failed(row: dict, reason: str) -> SampleResult:
    return SampleResult(
        question_id=str(row["question_id"]),
        kind=row["kind"],
        question=row["text"],
        answer=row.get("answer"),
        prediction="",
        correct=None,
        logp_with_image=None,
        logp_null_image=None,
        vc_sum=None,
        vc_mean=None,
        response_tokens=0,
        references=row.get("references"),
        choices=row.get("choices"),
        objects=row.get("objects"),
        category=row.get("category"),
        image=row.get("image"),
        error=reason,
    )


def evaluate(
    model,
    tokenizer,
    image_processor,
    questions: Sequence[dict],
    image_root: str | Path | None,
    spec: EncodeSpec,
    *,
    null_image: str = "noise",
    max_new_tokens: int = 32,
    num_beams: int = 1,
    batch_size: int = 32,
    seed: int = 0,
    chair_vocabularies: dict[str, Sequence[str]] | None = None,
) -> tuple[dict[str, float], list[SampleResult]]:
    """Answer and score `questions` (raw LLaVA-style rows or normalized ones) in one process;
    returns (aggregate metrics, per-sample results in question order)."""
    normalized = [q if "references" in q else normalize_question(q, i) for i, q in enumerate(questions)]
    evaluator = Evaluator(
        model,
        tokenizer,
        image_processor,
        spec,
        image_root=image_root,
        null_image=null_image,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        seed=seed,
    )
    samples: list[SampleResult] = []
    for start in range(0, len(normalized), batch_size):
        samples.extend(evaluator(normalized[start : start + batch_size]))
    return summarize(samples, chair_vocabularies=chair_vocabularies), samples


# ---------------------------------------------------------------- aggregation


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


def sample_rows(samples: Sequence[SampleResult]) -> list[dict]:
    return [asdict(s) for s in samples]
