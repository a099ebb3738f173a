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
the processor's mean color), or no image at all (the image tokens removed), drawn
per image in each family's pixel layout (workloads/families.py: LLaVA-NeXT's
tiles, Qwen2-VL's flattened patches), the image grid kept, so V=∅ always takes
the same tokens and positions as the image it replaces. An image's token count
comes from its size (`families.ImageTokenCounter`), as at preparation.

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
from workloads.families import ImageTokenCounter, image_inputs, image_settings, pixel_rows
from workloads.loss import token_nll
from workloads.segment_codes import Segment
from workloads.segments import EncodeSpec, encode_conversations, image_token_id

NULL_IMAGES = ("noise", "blank", "none")


def _noise(shape: tuple[int, ...], seed: int, question_id: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed((seed << 32) ^ zlib.crc32(question_id.encode()))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def image_keys(row_id: str, images: int) -> list[str]:
    """What seeds each image's V=∅ noise: the row's (question's) id for its first image, then id#k."""
    return [row_id if k == 0 else f"{row_id}#{k}" for k in range(images)]


def image_tensors(model, image_processor, images: list) -> dict[str, torch.Tensor]:
    """The forward's image inputs for `images` (none: {}) on the model's device: pixel values in its dtype,
    and the family's image grid (`image_sizes`, `image_grid_thw`)."""
    if not images:
        return {}
    param = next(model.parameters())
    out = {k: torch.as_tensor(v).to(param.device) for k, v in image_inputs(image_processor, images).items()}
    out["pixel_values"] = out["pixel_values"].to(param.dtype)
    return out


def null_image_inputs(images: dict[str, torch.Tensor], null_image: str, seed: int, keys: list[str]) -> dict:
    """V=∅ for each image of the forward's image inputs `images` (noise seeded per key of `image_keys`, or
    blank), in its own pixel layout (LLaVA-NeXT's tiles, Qwen2-VL's patches); the image grid is kept."""
    pixels = images["pixel_values"]
    if null_image == "blank":
        return {**images, "pixel_values": torch.zeros_like(pixels)}
    rows = pixel_rows({k: v.cpu().numpy() for k, v in images.items()}).tolist()
    parts = [_noise(tuple(p.shape), seed, key) for p, key in zip(torch.split(pixels, rows), keys)]
    return {**images, "pixel_values": torch.cat(parts).to(pixels)}


def with_token_types(images: dict[str, torch.Tensor], is_image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Qwen2-VL's M-RoPE finds each image's tokens by `mm_token_type_ids` (1 on image tokens)."""
    return {**images, "mm_token_type_ids": is_image.int()} if "image_grid_thw" in images else images


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
    model, ids: list[np.ndarray], segments: list[np.ndarray], images: dict, pad_id: int, device
) -> tuple[np.ndarray, np.ndarray]:
    """Summed log p of RESPONSE tokens per row, and their count (`images`: the forward's image inputs)."""
    input_ids = _pad(ids, pad_id, left=False).to(device)
    segs = _pad(segments, int(Segment.PAD), left=False).to(device)
    attention = (segs != int(Segment.PAD)).long()
    images = with_token_types(images, segs == int(Segment.IMAGE))
    logits = model(input_ids=input_ids, attention_mask=attention, **images).logits
    nll = token_nll(logits, input_ids)
    is_response = (segs[:, 1:] == int(Segment.RESPONSE)).float()
    return (-(nll * is_response).sum(dim=1)).cpu().numpy(), is_response.sum(dim=1).cpu().numpy()


def encode_prompts(convs: Sequence, tokenizer, spec: EncodeSpec, image_tokens: Sequence | None = None) -> list:
    """Generation prompt ids (int64) of each conversation, or its ConversationError, in order.

    The prompt is `render_prompt_spans`: the turns up to the last user turn and
    the template's assistant prefix, rendered with the `RenderContext` that
    `encode_conversations` builds from `spec`; the text is tokenized the way
    segments.py tokenizes training rows (one batched call, no special tokens
    added: the template writes BOS itself) and each image placeholder becomes
    `spec.num_image_tokens` image token ids (or its image's count from `image_tokens`,
    per conversation, as `encode_conversations` takes them). Its ids are those of the answered
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
            repeats = np.where(ids == image_id, spec.num_image_tokens, 1)
            if image_tokens is not None and image_tokens[i] is not None:
                repeats[ids == image_id] = image_tokens[i]
            results[i] = np.repeat(ids, repeats)
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
        self.counter = ImageTokenCounter(model.config, image_processor)
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

        Without `spec`, one is made with the family's chat template, max_length 2048
        and the family's image token (workloads/families.py)."""
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        from workloads.families import family_of

        if dtype is None:
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).to(device)
        settings = image_settings(model.config)
        spec = spec or EncodeSpec(family_of(model.config).chat_template, max_length=2048, **settings)
        return cls(
            model,
            AutoTokenizer.from_pretrained(model_dir),
            AutoImageProcessor.from_pretrained(model_dir),
            spec,
            **options,
        )

    @torch.no_grad()
    def __call__(self, questions: Sequence[dict]) -> list[SampleResult]:
        """One result per question, in order (failed rows carry `error`)."""
        model = self.model
        device = next(model.parameters()).device
        results: list[SampleResult | None] = [None] * len(questions)
        images, counts = {}, [None] * len(questions)
        for i, q in enumerate(questions):
            if q["images"]:
                try:
                    images[i] = [self.open_image(path) for path in q["images"]]
                except (OSError, ValueError):  # missing or unreadable: this row fails, not the batch
                    results[i] = _failed(q, "unreadable_image")
                    continue
                counts[i] = self.counter.counts([image.size for image in images[i]])
        tokens = None if self.counter.family.fixed_image_tokens else counts
        conversations = [question_conversation(q) for q in questions]
        encoded = encode_conversations(conversations, self.tokenizer, self.spec, image_tokens=tokens)
        prompts = encode_prompts([question_prompt(q) for q in questions], self.tokenizer, self.spec, tokens)
        kept = []
        for i, (q, e, p) in enumerate(zip(questions, encoded, prompts)):
            if results[i] is not None:
                continue
            if isinstance(e, ConversationError) or isinstance(p, ConversationError):
                results[i] = _failed(q, (e if isinstance(e, ConversationError) else p).reason)
            elif e.images_kept < len(q["images"]):
                results[i] = _failed(q, "image_truncated")
            else:
                kept.append(i)
        if kept:
            rows = [questions[i] for i in kept]
            samples = self._score(
                [encoded[i] for i in kept],
                [prompts[i] for i in kept],
                rows,
                [image for i in kept for image in images.get(i, ())],
                device,
            )
            for i, sample in zip(kept, samples):
                results[i] = sample
        return results  # type: ignore[return-value]

    def _score(self, encoded: list, prompts: list, rows: list[dict], images: list, device) -> list[SampleResult]:
        """Generation from `prompts` (question only); teacher-forced scores from `encoded` (answered rows)."""
        model, tokenizer = self.model, self.tokenizer
        has_image = [bool(r["images"]) for r in rows]
        pixels = image_tensors(model, self.image_processor, images)
        ids = [e.input_ids.astype(np.int64) for e in encoded]
        segments = [e.segments.astype(np.int64) for e in encoded]

        prompt_ids = _pad(prompts, self.pad_id, left=True).to(device)
        prompt_mask = _pad([np.ones(len(p), np.int64) for p in prompts], 0, left=True).to(device)
        image_id = image_token_id(tokenizer, self.spec.image_token)
        generated = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            **with_token_types(pixels, (prompt_ids == image_id) & (prompt_mask > 0)),
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
            logp_real, counts = _response_logp(model, ids, segments, pixels, self.pad_id, device)
            if not pixels:
                logp_null = logp_real
            elif self.null_image == "none":
                keep = [s != int(Segment.IMAGE) for s in segments]
                null_ids = [i[k] for i, k in zip(ids, keep)]
                null_segments = [s[k] for s, k in zip(segments, keep)]
                logp_null, _ = _response_logp(model, null_ids, null_segments, {}, self.pad_id, device)
            else:
                keys = [key for r in rows for key in image_keys(str(r["question_id"]), len(r["images"]))]
                null = null_image_inputs(pixels, self.null_image, self.seed, keys)
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
                    images=row["images"] or None,
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
        images=row["images"] or None,
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
