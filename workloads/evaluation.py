"""Held-out evaluation of a trained model: answers, accuracy and visual contribution.

Every question is encoded exactly as training data is (same chat template,
same segments), with its reference answer as the assistant turn. The prompt
is everything before the first response token; the model answers it greedily.
The same encoded row, scored with the real image and with V=∅, gives the
visual contribution over the response tokens:

    VC = log p(A | V, I) - log p(A | V=∅, I)

reported per sample (sum over response tokens) and per token (mean).
V=∅ is random noise (the paper's choice), a blank image, or no image at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from workloads.conversations import IMAGE_PLACEHOLDER, Conversation, ConversationError, Turn
from workloads.loss import token_nll
from workloads.metrics import cider_d, exact_match, hallucination_rate, pope_metrics
from workloads.segments import EncodeSpec, Segment, encode_conversations

NULL_IMAGES = ("noise", "blank", "none")


@dataclass
class SampleResult:
    question_id: str
    kind: str
    question: str
    answer: str
    prediction: str
    correct: float | None
    """Exact match after VQA normalization; None for captions."""
    logp_with_image: float
    logp_null_image: float
    vc_sum: float
    vc_mean: float
    response_tokens: int


def question_conversation(row: dict) -> Conversation:
    """A LLaVA-style question row as a one-round conversation answered by its reference."""
    text = row["text"]
    images = (row["image"],) if row.get("image") else ()
    if images and IMAGE_PLACEHOLDER not in text:
        text = f"{IMAGE_PLACEHOLDER}\n{text}"
    answer = row["answer"] if isinstance(row["answer"], str) else row["answer"][0]
    return Conversation(id=str(row["question_id"]), turns=(Turn("user", text), Turn("assistant", answer)), images=images)


def _null_pixels(pixel_values: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    if kind == "noise":
        return torch.randn(pixel_values.shape, generator=generator, dtype=torch.float32).to(pixel_values)
    return torch.zeros_like(pixel_values)


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
def _response_logp(model, ids: list[np.ndarray], segments: list[np.ndarray], pixel_values, pad_id: int, device) -> tuple[np.ndarray, np.ndarray]:
    """Summed log p of RESPONSE tokens per row, and their count."""
    input_ids = _pad(ids, pad_id, left=False).to(device)
    segs = _pad(segments, int(Segment.PAD), left=False).to(device)
    attention = (segs != int(Segment.PAD)).long()
    logits = model(input_ids=input_ids, attention_mask=attention, pixel_values=pixel_values).logits
    nll = token_nll(logits, input_ids)
    is_response = (segs[:, 1:] == int(Segment.RESPONSE)).float()
    return (-(nll * is_response).sum(dim=1)).cpu().numpy(), is_response.sum(dim=1).cpu().numpy()


def evaluate(
    model,
    tokenizer,
    image_processor,
    questions: Sequence[dict],
    image_root: str | Path | None,
    spec: EncodeSpec,
    *,
    null_image: str = "noise",
    max_new_tokens: int = 8,
    batch_size: int = 32,
    seed: int = 0,
) -> tuple[dict[str, float], list[SampleResult]]:
    """Answer and score `questions`; returns (aggregate metrics, per-sample results)."""
    from PIL import Image

    if null_image not in NULL_IMAGES:
        raise ValueError(f"null_image must be one of {NULL_IMAGES}, got {null_image!r}")
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    generator = torch.Generator().manual_seed(seed)
    samples: list[SampleResult] = []
    skipped: dict[str, int] = {}

    for start in range(0, len(questions), batch_size):
        rows = list(questions[start : start + batch_size])
        encoded = encode_conversations([question_conversation(r) for r in rows], tokenizer, spec)
        kept = [(r, e) for r, e in zip(rows, encoded) if not isinstance(e, ConversationError)]
        for e in encoded:
            if isinstance(e, ConversationError):
                skipped[e.reason] = skipped.get(e.reason, 0) + 1
        if not kept:
            continue
        rows, encoded = [k[0] for k in kept], [k[1] for k in kept]
        images = [Image.open(Path(image_root or ".", r["image"])).convert("RGB") for r in rows if r.get("image")]
        pixel_values = None
        if images:
            pixel_values = torch.as_tensor(image_processor(images=images, return_tensors="np")["pixel_values"]).to(device, dtype)

        ids = [e.input_ids.astype(np.int64) for e in encoded]
        segments = [e.segments.astype(np.int64) for e in encoded]
        prompts = [i[: int(np.argmax(s == int(Segment.RESPONSE)))] for i, s in zip(ids, segments)]

        prompt_ids = _pad(prompts, pad_id, left=True).to(device)
        prompt_mask = _pad([np.ones(len(p), np.int64) for p in prompts], 0, left=True).to(device)
        generated = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            pixel_values=pixel_values,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        predictions = tokenizer.batch_decode(generated[:, prompt_ids.shape[1] :], skip_special_tokens=True)

        logp_real, counts = _response_logp(model, ids, segments, pixel_values, pad_id, device)
        if null_image == "none" or pixel_values is None:
            keep = [s != int(Segment.IMAGE) for s in segments]
            null_ids = [i[k] for i, k in zip(ids, keep)]
            null_segments = [s[k] for s, k in zip(segments, keep)]
            logp_null, _ = _response_logp(model, null_ids, null_segments, None, pad_id, device)
        else:
            null = _null_pixels(pixel_values, null_image, generator)
            logp_null, _ = _response_logp(model, ids, segments, null, pad_id, device)

        for row, prediction, lr, ln, n in zip(rows, predictions, logp_real, logp_null, counts):
            answer = row["answer"] if isinstance(row["answer"], str) else row["answer"][0]
            kind = row.get("kind", "vqa")
            prediction = prediction.strip()
            samples.append(
                SampleResult(
                    question_id=str(row["question_id"]),
                    kind=kind,
                    question=row["text"],
                    answer=answer,
                    prediction=prediction,
                    correct=None if kind == "caption" else exact_match(prediction, answer),
                    logp_with_image=float(lr),
                    logp_null_image=float(ln),
                    vc_sum=float(lr - ln),
                    vc_mean=float((lr - ln) / max(n, 1)),
                    response_tokens=int(n),
                )
            )
    return summarize(samples, questions, skipped), samples


def summarize(samples: list[SampleResult], questions: Sequence[dict], skipped: dict[str, int] | None = None) -> dict[str, float]:
    """Aggregate metrics: accuracy overall and by kind, VC, POPE, caption CIDEr-D and CHAIR."""
    metrics: dict[str, float] = {"eval_samples": float(len(samples))}
    if not samples:
        return metrics
    scored = [s for s in samples if s.correct is not None]
    if scored:
        metrics["accuracy"] = float(np.mean([s.correct for s in scored]))
    for kind in sorted({s.kind for s in scored}):
        metrics[f"accuracy_{kind}"] = float(np.mean([s.correct for s in scored if s.kind == kind]))
    metrics["vc_mean"] = float(np.mean([s.vc_mean for s in samples]))
    metrics["vc_sum"] = float(np.mean([s.vc_sum for s in samples]))
    exists = [s for s in samples if s.kind == "exists"]
    if exists:
        pope = pope_metrics([s.prediction for s in exists], [s.answer.lower() for s in exists])
        metrics.update({f"pope_{k}": float(v) for k, v in pope.items() if k in ("accuracy", "precision", "recall", "f1", "yes_ratio")})
    captions = [s for s in samples if s.kind == "caption"]
    if captions:
        metrics["caption_cider"] = float(cider_d([s.prediction for s in captions], [[s.answer] for s in captions]))
        by_id = {str(q["question_id"]): q for q in questions}
        objects = [by_id[s.question_id].get("objects") for s in captions]
        if all(o is not None for o in objects):
            from workloads.synthetic import SHAPES

            chair = hallucination_rate([s.prediction for s in captions], objects, SHAPES)
            metrics["chair_i"] = float(chair["chair_i"])
            metrics["chair_s"] = float(chair["chair_s"])
    for reason, count in (skipped or {}).items():
        metrics[f"eval_skipped_{reason}"] = float(count)
    return metrics


def sample_rows(samples: list[SampleResult]) -> list[dict]:
    return [asdict(s) for s in samples]
