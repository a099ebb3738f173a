"""Held-out evaluation of a trained model: answers, scores and visual contribution.

Every question (a normalized row of eval_questions.py) is answered from its
generation prompt: the question's user turn and the template's assistant
prefix (chat_templates.render_prompt_spans; e.g. vicuna_v1's ``"... USER:
<image>\\nQ ASSISTANT:"``, what LLaVA's ``conv.get_prompt()`` gives), rendered
with the same template, system prompt and image placement as training rows,
so the prompt never depends on the reference answer. The model answers it
with greedy or beam-search decoding. For scoring, the question is encoded
exactly as training data is (same chat template, same segments) with its
reference answer as the assistant turn; that row, scored with the real image
and with V=∅, gives the visual contribution over the response tokens:

    VC = log p(A | V, I) - log p(A | V=∅, I)

reported per sample as the sum over response tokens (``vc_sum``) and as the
per-token mean (``vc_mean``); the aggregates are their means over samples.
V=∅ is random noise (the paper's choice: a standard normal draw in the image
processor's normalized pixel space, seeded per question so that a sample's
score does not depend on batching), a blank image (zeros in normalized space:
the processor's mean color), or no image at all (the image tokens removed).

Per-sample scores and their aggregation are in eval_summary.py. This module
knows nothing of Ray: `Evaluator` scores a list of questions in one process;
orchestrator/evaluate.py runs it inside Ray Data actors.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workloads.chat_templates import RenderContext, render_prompt_spans
from workloads.conversations import ConversationError
from workloads.eval_questions import normalize_question, question_conversation, question_prompt
from workloads.eval_summary import SampleResult, score_prediction, summarize
from workloads.loss import token_nll
from workloads.segment_codes import Segment
from workloads.segments import EncodeSpec, encode_conversations, image_token_id

NULL_IMAGES = ("noise", "blank", "none")


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


def encode_prompts(convs: Sequence, tokenizer, spec: EncodeSpec) -> list:
    """Generation prompt ids (int64) of each conversation, or its ConversationError, in order.

    The prompt is `render_prompt_spans`: the turns up to the last user turn and
    the template's assistant prefix, rendered with the `RenderContext` that
    `encode_conversations` builds from `spec`; the text is tokenized the way
    segments.py tokenizes training rows (one batched call, no special tokens
    added: the template writes BOS itself) and each image placeholder becomes
    `spec.num_image_tokens` image token ids. Its ids are those of the answered
    row up to the assistant marker.
    """
    context = RenderContext.create(
        spec.template, tokenizer, spec.task_templates, spec.image_token, spec.system_prompt, spec.image_placement
    )
    image_id = image_token_id(tokenizer, spec.image_token)
    results: list = [None] * len(convs)
    texts, positions = [], []
    for i, conv in enumerate(convs):
        try:
            texts.append(render_prompt_spans(conv, context)[0])
            positions.append(i)
        except ConversationError as error:
            results[i] = error
    if texts:
        for i, ids in zip(positions, tokenizer(texts, add_special_tokens=False)["input_ids"]):
            ids = np.asarray(ids, dtype=np.int64)
            results[i] = np.repeat(ids, np.where(ids == image_id, spec.num_image_tokens, 1))
    return results


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
        prompts = encode_prompts([question_prompt(q) for q in questions], self.tokenizer, self.spec)
        kept, images = [], {}
        for i, (q, e, p) in enumerate(zip(questions, encoded, prompts)):
            if isinstance(e, ConversationError) or isinstance(p, ConversationError):
                results[i] = _failed(q, (e if isinstance(e, ConversationError) else p).reason)
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
            samples = self._score(
                [encoded[i] for i in kept],
                [prompts[i] for i in kept],
                rows,
                [images[i] for i in kept if i in images],
                device,
            )
            for i, sample in zip(kept, samples):
                results[i] = sample
        return results  # type: ignore[return-value]

    def _score(self, encoded: list, prompts: list, rows: list[dict], images: list, device) -> list[SampleResult]:
        """Generation from `prompts` (question only); teacher-forced scores from `encoded` (answered rows)."""
        model, tokenizer = self.model, self.tokenizer
        has_image = [bool(r.get("image")) for r in rows]
        pixel_values = self._pixels(images)
        ids = [e.input_ids.astype(np.int64) for e in encoded]
        segments = [e.segments.astype(np.int64) for e in encoded]

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
