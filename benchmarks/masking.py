"""How much does exact token segmentation cost, against tokenizing alone and against LLaVA's per-round masks?

Run: ``python benchmarks/masking.py [--rows N] [--family byte_bpe|sentencepiece_bpe] [--template vicuna_v1]``

On the same rows, in one process, in batches of ``--batch-size`` rows:

(a) floor: one batched tokenization of the already rendered texts
    (``tokenizer(texts, add_special_tokens=False)``), what any pipeline pays;
(b) ours: ``encode_conversations`` (render, batched tokenization with
    offsets, vectorized segment lookup, image expansion) and the weights of every token via
    ``token_weights``;
(c) LLaVA-style reference: LLaVA's ``preprocess_v1`` as written there: per
    row, tokenize the whole conversation (``tokenizer_image_token``), then
    tokenize each round and its instruction separately and add up lengths
    (with LLaVA's Llama-tuned "- 2" / "- 1" corrections) to place the mask.

Prints the ratios and writes ``benchmarks/results/masking.json`` with
``ratio_vs_tokenize`` (b/a, goal <= 1.3) and ``speedup_vs_per_round`` (c/b,
goal >= 5), ``rows`` and ``rows_per_s`` of (b). It also reports what (c) does
to these rows: ``per_round_whole_sample_masked`` counts rows it drops with
"tokenization mismatch" (its length arithmetic does not add up for this
tokenizer), ``per_round_wrong_labels`` rows it keeps but whose trained text
differs from the responses. Timings are wall clock, best of ``--repeats``,
(a) and (b) interleaved; on a shared machine they move with its load, so the
CPU-time ratio (all threads of this process) and the load average are
reported too.

Both run on one thread, as preparation's encode tasks run them (``orchestrator/encoding.py``: one
task per CPU): the tokenizer without its thread pool (``TOKENIZERS_PARALLELISM=false`` unless set
otherwise) and (b) without its tokenizer thread (``overlap=False``), so the ratio is the CPU cost
of segmentation over tokenization whatever else the machine runs.
With the Rust tokenizer's own thread pool on, (a) spreads over every idle core of the machine while
(b) shares them with its Python work, so the ratio would measure how many cores sat idle (1.24
at load 2.3, 1.51 on a quiet machine, for the same code) rather than the cost of segmentation.

The rows are a LLaVA-665k-like mix made here (no download): VQA rounds ending
in "Answer the question using a single word or phrase.", short captions,
detailed descriptions and multi-turn conversations.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # before the tokenizer is loaded: see the docstring

from workloads.chat_templates import render  # noqa: E402
from workloads.conversations import Conversation, Turn  # noqa: E402
from workloads.segment_codes import Segment, token_weights  # noqa: E402
from workloads.segments import EncodeSpec, encode_conversations  # noqa: E402
from workloads.tokenizer_factory import train_tokenizer  # noqa: E402

VQA_SUFFIX = "Answer the question using a single word or phrase."
CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "Provide a one-sentence caption for the provided image.",
    "Summarize the visual content of the image.",
    "Give a brief description of the image.",
)
DETAIL_PROMPTS = (
    "Describe the following image in detail.",
    "What do you see happening in this image?",
    "Can you elaborate on the elements of the picture provided?",
    "Explain the visual content of the image in great detail.",
)
NOUNS = (
    "man",
    "woman",
    "dog",
    "cat",
    "bus",
    "train",
    "table",
    "plate",
    "pizza",
    "bicycle",
    "umbrella",
    "street",
    "kitchen",
    "window",
    "giraffe",
    "elephant",
    "surfboard",
    "clock",
    "building",
    "tree",
    "car",
    "horse",
    "sign",
    "laptop",
    "bench",
    "boat",
    "field",
    "sky",
    "shirt",
    "hat",
    "skateboard",
    "sandwich",
    "banana",
    "phone",
)
ADJECTIVES = (
    "red",
    "white",
    "black",
    "blue",
    "small",
    "large",
    "wooden",
    "old",
    "green",
    "busy",
    "bright",
    "yellow",
    "tall",
    "empty",
    "crowded",
    "sunny",
    "striped",
    "metal",
    "brown",
    "young",
)
VERBS = (
    "standing",
    "sitting",
    "holding",
    "riding",
    "walking",
    "looking at",
    "parked near",
    "eating",
    "playing with",
    "lying on",
    "waiting for",
    "carrying",
)
PLACES = (
    "on the left",
    "in the background",
    "near the center",
    "on the right side",
    "in the foreground",
    "next to the window",
    "under the tree",
    "on the table",
)
QUESTIONS = (
    "What color is the {n}?",
    "What is the {n} doing?",
    "How many {n}s are there?",
    "Is the {n} {a}?",
    "What is on the {n}?",
    "Where is the {n}?",
    "What kind of {n} is this?",
    "Is there a {n} in the image?",
    "What is the man holding?",
    "What room is this?",
    "Which side of the photo is the {n} on?",
)


def sentence(rng: random.Random) -> str:
    return (
        f"A {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} is {rng.choice(VERBS)} "
        f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(PLACES)}."
    )


def question(rng: random.Random) -> str:
    return rng.choice(QUESTIONS).format(n=rng.choice(NOUNS), a=rng.choice(ADJECTIVES))


def make_conversation(index: int, rng: random.Random) -> Conversation:
    kind = rng.choices(("vqa", "caption", "detail", "chat"), weights=(5, 2, 1, 2))[0]
    turns: list[Turn] = []
    if kind == "vqa":  # VQAv2/GQA rows: several short rounds, the template sentence on each
        for r in range(rng.randint(1, 8)):
            prefix = "<image>\n" if r == 0 else ""
            turns += [
                Turn("user", f"{prefix}{question(rng)}\n{VQA_SUFFIX}"),
                Turn(
                    "assistant",
                    rng.choice((rng.choice(ADJECTIVES), rng.choice(NOUNS), "Yes", "No", str(rng.randint(0, 9)))),
                ),
            ]
    elif kind == "caption":
        turns += [Turn("user", f"<image>\n{rng.choice(CAPTION_PROMPTS)}"), Turn("assistant", sentence(rng))]
    elif kind == "detail":
        body = " ".join(sentence(rng) for _ in range(rng.randint(4, 10)))
        turns += [Turn("user", f"{rng.choice(DETAIL_PROMPTS)}\n<image>"), Turn("assistant", body)]
    else:  # LLaVA-Instruct conversations: longer free-form answers
        for r in range(rng.randint(2, 5)):
            prefix = "<image>\n" if r == 0 else ""
            answer = " ".join(sentence(rng) for _ in range(rng.randint(1, 4)))
            turns += [Turn("user", prefix + question(rng)), Turn("assistant", answer)]
    return Conversation(id=f"bench-{index}", turns=tuple(turns), images=("img.jpg",))


def make_rows(n: int, seed: int = 0) -> list[Conversation]:
    rng = random.Random(seed)
    return [make_conversation(i, rng) for i in range(n)]


# --- the three measured procedures ----------------------------------------------------------------


def floor_tokenize(texts: list[str], tokenizer, batch_size: int) -> int:
    n = 0
    for i in range(0, len(texts), batch_size):
        ids = tokenizer(texts[i : i + batch_size], add_special_tokens=False)["input_ids"]
        n += sum(map(len, ids))
    return n


def ours(convs: list[Conversation], tokenizer, spec: EncodeSpec, batch_size: int) -> int:
    n = 0
    for i in range(0, len(convs), batch_size):
        rows = encode_conversations(convs[i : i + batch_size], tokenizer, spec, overlap=False)
        segments = np.concatenate([row.segments for row in rows])
        weights = token_weights(segments, "l2t", 1.0, 1.0)
        n += len(weights)
    return n


IGNORE = -100
IMAGE_TOKEN_INDEX = -200


def tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    """LLaVA's `tokenizer_image_token`: tokenize around each <image>, splice in the image index."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    input_ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(chunks[0][0])
    separated = [x for chunk in chunks for x in (chunk, [IMAGE_TOKEN_INDEX] * (offset + 1))][:-1]
    for x in separated:
        input_ids.extend(x[offset:])
    return input_ids


def per_round_labels(conv: Conversation, tokenizer):
    """LLaVA's `preprocess_v1` for one row (vicuna_v1, sep " ", sep2 EOS), as written there.

    The prompt is rendered without "<s>" since LLaVA lets the tokenizer add
    BOS; the "- 2" and "- 1" corrections are LLaVA's own, tuned to Llama's
    tokenizer.
    """
    import torch

    prompt = render(conv, "vicuna_v1", tokenizer=tokenizer).text.removeprefix(tokenizer.bos_token)
    input_ids = torch.tensor(tokenizer_image_token(prompt, tokenizer), dtype=torch.long)
    target = input_ids.clone()
    total_len = int(target.ne(tokenizer.pad_token_id).sum())
    sep = " ASSISTANT: "
    cur_len = 1
    target[:cur_len] = IGNORE
    for i, rou in enumerate(prompt.split(tokenizer.eos_token)):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(tokenizer_image_token(rou, tokenizer))
        instruction_len = len(tokenizer_image_token(parts[0], tokenizer)) - 2
        if i != 0:  # LLaVA: `not tokenizer.legacy` with tokenizers >= 0.14
            round_len -= 1
            instruction_len -= 1
        target[cur_len : cur_len + instruction_len] = IGNORE
        cur_len += round_len
    target[cur_len:] = IGNORE
    if cur_len != total_len:  # LLaVA prints "tokenization mismatch" and ignores the whole sample
        target[:] = IGNORE
    return input_ids, target


def per_round(convs: list[Conversation], tokenizer) -> list:
    return [per_round_labels(conv, tokenizer) for conv in convs]


def trained_runs(ids: np.ndarray, trained: np.ndarray, tokenizer) -> list[str]:
    """Decoded text of each run of trained tokens, whitespace-normalized."""
    runs, start = [], None
    for i, flag in enumerate(list(trained) + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append(" ".join(tokenizer.decode(ids[start:i].tolist()).split()))
            start = None
    return runs


def timed(fn) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, all threads, result)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--family", default="byte_bpe", choices=("byte_bpe", "sentencepiece_bpe"))
    parser.add_argument("--template", default="vicuna_v1")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument(
        "--reference-rows",
        type=int,
        default=None,
        help="rows for the slow per-round reference (default: all; timing is scaled if fewer)",
    )
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "masking.json"))
    args = parser.parse_args(argv)

    convs = make_rows(args.rows)
    corpus = [render(c, args.template).text for c in make_rows(3000, seed=1)]
    tokenizer = train_tokenizer(corpus, family=args.family, vocab_size=8000)
    spec = EncodeSpec(args.template, num_image_tokens=576, max_length=4096, task_templates=(VQA_SUFFIX,))
    texts = [render(c, args.template, tokenizer=tokenizer, task_templates=spec.task_templates).text for c in convs]

    load_before = round(os.getloadavg()[0], 2)
    # Interleaved (a, b, a, b, ...) so that drifting load on a shared machine hits both alike.
    floor_s = ours_s = floor_cpu = ours_cpu = float("inf")
    for _ in range(args.repeats):
        wall, cpu, n_tokens = timed(lambda: floor_tokenize(texts, tokenizer, args.batch_size))
        floor_s, floor_cpu = min(floor_s, wall), min(floor_cpu, cpu)
        wall, cpu, _ = timed(lambda: ours(convs, tokenizer, spec, args.batch_size))
        ours_s, ours_cpu = min(ours_s, wall), min(ours_cpu, cpu)

    reference_convs = convs[: args.reference_rows] if args.reference_rows else convs
    reference_s, _, reference_labels = timed(lambda: per_round(reference_convs, tokenizer))
    reference_s *= len(convs) / len(reference_convs)

    # What LLaVA's per-round code makes of these rows with this tokenizer (vicuna_v1 only: that is what it is):
    # rows it masks entirely ("tokenization mismatch"), and rows where the text it trains on differs from
    # the response text (compared as decoded runs of trained tokens, so tokenizations need not agree).
    mismatched = wrong_labels = 0
    if args.template == "vicuna_v1":
        exact_rows = encode_conversations(reference_convs, tokenizer, EncodeSpec("vicuna_v1", 1, 10**6))
        for exact, (input_ids, target) in zip(exact_rows, reference_labels):
            if bool((target == IGNORE).all()):
                mismatched += 1
                continue
            ours_trained = np.isin(exact.segments, (Segment.RESPONSE, Segment.END_OF_TURN))
            llava_trained = (target != IGNORE).numpy() & (input_ids >= 0).numpy()
            ours_runs = trained_runs(exact.input_ids, ours_trained, tokenizer)
            llava_runs = trained_runs(input_ids.numpy(), llava_trained, tokenizer)
            wrong_labels += int(ours_runs != llava_runs)

    result = {
        "rows": args.rows,
        "family": args.family,
        "template": args.template,
        "tokens": int(n_tokens),
        "cpu_count": os.cpu_count(),
        "floor_tokenize_s": round(floor_s, 4),
        "encode_conversations_s": round(ours_s, 4),
        "per_round_reference_s": round(reference_s, 4),
        "ratio_vs_tokenize": round(ours_s / floor_s, 3),
        "cpu_ratio_vs_tokenize": round(ours_cpu / floor_cpu, 3),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "load_average_before": load_before,
        "tokenizers_parallelism": os.environ["TOKENIZERS_PARALLELISM"],
        "speedup_vs_per_round": round(reference_s / ours_s, 2),
        "rows_per_s": round(args.rows / ours_s, 1),
        "per_round_reference_rows": len(reference_convs),
        "per_round_whole_sample_masked": mismatched,
        "per_round_wrong_labels": wrong_labels,
    }
    print(f"rows {args.rows}, {n_tokens} tokens, {args.family}, {args.template}, {os.cpu_count()} CPUs")
    print(f"(a) tokenize only         {floor_s:8.3f} s")
    print(f"(b) encode_conversations  {ours_s:8.3f} s   {result['rows_per_s']:.0f} rows/s")
    print(f"(c) per-round reference   {reference_s:8.3f} s")
    print(
        f"ratio b/a {result['ratio_vs_tokenize']} (goal <= 1.3; CPU-time ratio {result['cpu_ratio_vs_tokenize']}), "
        f"speedup c/b {result['speedup_vs_per_round']} (goal >= 5); load average {result['load_average_1min']}"
    )
    if args.template == "vicuna_v1":
        print(
            f"LLaVA's per-round code on these rows: {mismatched}/{len(reference_convs)} whole samples masked "
            f"(tokenization mismatch), {wrong_labels} more with trained text other than the responses"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
