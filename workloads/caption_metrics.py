"""Caption metrics: BLEU-4, CIDEr-D on COCO's tokenization, and CHAIR-style hallucination rates.

Why these exact definitions: published captioning numbers come from the COCO
caption evaluation code, and small differences in it move scores by whole
points, so each metric here is computed the way the reference tool computes
it, quirks included:

- Tokenization: pycocoevalcap's PTBTokenizer (Stanford PTBTokenizer,
  lower-cased, then its punctuation list removed), reproduced in pure Python
  by ptb_tokenizer.py. References and candidates are tokenized as two batches,
  in corpus order, as ``COCOEvalCap.evaluate`` does.
- BLEU and CIDEr-D: pycocoevalcap (``bleu_scorer.py`` with the "closest"
  reference length, ``cider_scorer.py``) on those tokens; both equal
  pycocoevalcap's scores to 1e-4 on the corpora recorded in tests/test_ptb_tokenizer.py.
- CHAIR: `hallucination_rate` gives the instance / sentence rates of Rohrbach
  et al. 2018 over a caller-given object vocabulary (the synthetic world's);
  the published COCO CHAIR, with its synonym list and rules, is chair.py.

Short-answer metrics (VQA, multiple choice, POPE) are in answer_matching.py.
Where a reference script has a quirk that changes numbers, the code keeps it
and a comment says so. Everything is plain Python; no model or framework.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Collection, Sequence

from workloads.ptb_tokenizer import caption_words

# ---------------------------------------------------------------------------
# Caption tokenization (pycocoevalcap's PTBTokenizer, see ptb_tokenizer.py)
# ---------------------------------------------------------------------------


def tokenize_caption(text: str) -> list[str]:
    """The words BLEU and CIDEr count for one caption: pycocoevalcap's PTBTokenizer output without its
    punctuation list (``"A dog's (red) ball."`` -> ``a dog 's -lrb- red -rrb- ball``); see ptb_tokenizer.py."""
    return caption_words([text])[0]


def _tokenized(
    candidates: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[list[list[str]], list[list[list[str]]]]:
    """Candidate and reference words, each side tokenized as one batch in corpus order (as pycocoevalcap)."""
    cand_words = caption_words(list(candidates))
    flat = caption_words([r for refs in references for r in refs])
    ref_words, start = [], 0
    for refs in references:
        ref_words.append(flat[start : start + len(refs)])
        start += len(refs)
    return cand_words, ref_words


def _ngram_counts(words: Sequence[str], n: int) -> Counter:
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def _check_corpus(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if isinstance(candidates, str):
        raise TypeError("candidates must be a sequence of strings, not one string")
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if len(candidates) == 0:
        raise ValueError("empty corpus")
    for refs in references:
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError("each candidate needs a non-empty list of reference strings")


# ---------------------------------------------------------------------------
# BLEU (pycocoevalcap bleu_scorer.py)
# ---------------------------------------------------------------------------


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..``max_n`` as pycocoevalcap's ``Bleu`` computes them.

    Clipped n-gram matches (a candidate n-gram counts at most as often as in
    the reference where it is most frequent) and n-gram guesses are summed over
    the corpus; BLEU-n is the geometric mean of the first n precisions times
    the brevity penalty ``exp(1 - r / c)`` when the candidate total ``c`` is
    shorter than the reference total ``r``. Each sentence contributes the
    reference length closest to its own (ties: the shorter one). The tiny
    smoothing constants of the original are kept, so a zero precision gives a
    score of about 0, not an error.
    """
    _check_corpus(candidates, references)
    tiny, small = 1e-15, 1e-9
    correct = [0] * max_n
    guess = [0] * max_n
    testlen_total = reflen_total = 0
    for words, refs in zip(*_tokenized(candidates, references)):
        counts = _ngram_counts(words, max_n)
        maxcounts: dict[tuple, int] = {}
        reflens = []
        for ref_words in refs:
            reflens.append(len(ref_words))
            for ngram, c in _ngram_counts(ref_words, max_n).items():
                maxcounts[ngram] = max(maxcounts.get(ngram, 0), c)
        testlen = len(words)
        testlen_total += testlen
        reflen_total += min((abs(rl - testlen), rl) for rl in reflens)[1]
        for k in range(max_n):
            guess[k] += max(0, testlen - k)
        for ngram, c in counts.items():
            correct[len(ngram) - 1] += min(maxcounts.get(ngram, 0), c)
    ratio = (testlen_total + tiny) / (reflen_total + small)
    brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    scores = []
    product = 1.0
    for k in range(max_n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)) * brevity)
    return scores


def bleu4(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 (pycocoevalcap, "closest" reference length); see :func:`bleu`."""
    return bleu(candidates, references, max_n=4)[3]


# ---------------------------------------------------------------------------
# CIDEr-D (pycocoevalcap cider_scorer.py)
# ---------------------------------------------------------------------------


def cider_d_scores(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    n: int = 4,
    sigma: float = 6.0,
) -> list[float]:
    """Per-candidate CIDEr-D, as pycocoevalcap's ``Cider`` computes it.

    For each n-gram order 1..n, candidate and reference are tf-idf vectors:
    term frequency is the raw n-gram count, idf is
    ``log(N) - log(max(1, df))`` with N the number of evaluated images and df
    the number of images whose references contain the n-gram (so the idf
    depends on the evaluated set, and an n-gram in every image's references
    weighs 0). The similarity per order is
    ``sum(min(cand, ref) * ref) / (|cand| |ref|)`` (candidate weights clipped
    by the reference's; 0 when either norm is 0), times the Gaussian length
    penalty ``exp(-delta^2 / (2 sigma^2))``. The score averages the orders,
    averages over the references, and multiplies by 10.

    Quirk kept from the original: the "length" in ``delta`` is the number of
    bigrams (``len - 1`` for a non-empty caption), not words; the difference
    equals the word-length difference except against an empty caption.
    """
    _check_corpus(candidates, references)
    cand_words, ref_words = _tokenized(candidates, references)
    cand_counts = [_ngram_counts(words, n) for words in cand_words]
    ref_counts = [[_ngram_counts(words, n) for words in refs] for refs in ref_words]

    doc_freq: Counter = Counter()
    for refs in ref_counts:
        doc_freq.update({ngram for ref in refs for ngram in ref})
    log_n_images = math.log(float(len(ref_counts)))

    def to_vec(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for ngram, tf in counts.items():
            k = len(ngram) - 1
            weight = float(tf) * (log_n_images - math.log(max(1.0, doc_freq[ngram])))
            vec[k][ngram] = weight
            norm[k] += weight * weight
            if k == 1:  # sic: bigram count, see the docstring
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for cand, refs in zip(cand_counts, ref_counts):
        vec, norm, length = to_vec(cand)
        total = [0.0] * n
        for ref in refs:
            vec_r, norm_r, length_r = to_vec(ref)
            penalty = math.exp(-((length - length_r) ** 2) / (2 * sigma**2))
            for k in range(n):
                val = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec[k].items())
                if norm[k] != 0 and norm_r[k] != 0:
                    val /= norm[k] * norm_r[k]
                total[k] += val * penalty
        scores.append(sum(total) / n / len(refs) * 10.0)
    return scores


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus CIDEr-D: the mean of :func:`cider_d_scores` (pycocoevalcap's "CIDEr")."""
    scores = cider_d_scores(candidates, references)
    return sum(scores) / len(scores)


# ---------------------------------------------------------------------------
# CHAIR-style hallucination
# ---------------------------------------------------------------------------


def _plural(word: str) -> str:
    if re.search(r"(?:s|x|z|ch|sh)$", word):
        return word + "es"
    if re.search(r"[^aeiou]y$", word):
        return word[:-1] + "ies"
    return word + "s"


def _surface_forms(entry: str) -> set[str]:
    """Singular and plural spellings of a vocabulary entry (plural on the last word)."""
    words = entry.split()
    return {entry, " ".join(words[:-1] + [_plural(words[-1])])}


def _phrase_pattern(forms: Collection[str]) -> re.Pattern:
    """Whole-word, case-folded-text pattern for any of ``forms``, longest first."""
    ordered = sorted(forms, key=lambda f: (-len(f.split()), -len(f), f))
    alternatives = "|".join(r"\s+".join(map(re.escape, f.split())) for f in ordered)
    # "(?!)" never matches: an empty vocabulary finds no mentions.
    return re.compile(r"(?<![a-z0-9])(" + (alternatives or "(?!)") + r")(?![a-z0-9])")


def hallucination_rate(
    captions: Sequence[str],
    present_objects: Sequence[Collection[str]],
    vocabulary: Collection[str],
) -> dict:
    """CHAIR-style hallucination rates of captions against the objects really present.

    An object mention is a vocabulary entry found in a caption as whole words,
    case-insensitive, singular or plural ("circle", "circles"; "red circles"
    for the entry "red circle"). Multi-word entries are matched longest first,
    so with "circle" and "red circle" in the vocabulary, "a red circle" is one
    mention of "red circle". Every mention counts, repeats included. A mention
    is hallucinated when its entry is not among the image's present objects
    (compared case-insensitively; plural spellings there are accepted too). A
    present object also covers the vocabulary entries inside it: with "red
    circle" present, a mention of plain "circle" is not a hallucination, but a
    mention of "blue circle" is.

    Returns ``chair_i`` (hallucinated mentions / all mentions), ``chair_s``
    (captions with at least one hallucinated mention / captions), and the
    counts ``mentions``, ``hallucinated_mentions``, ``captions``,
    ``hallucinated_captions``. ``chair_i`` is 0 when nothing is mentioned.
    """
    if len(captions) != len(present_objects):
        raise ValueError(f"{len(captions)} captions but {len(present_objects)} object sets")
    if isinstance(vocabulary, str):
        raise TypeError("vocabulary must be a collection of strings, not one string")
    canonical: dict[str, str] = {}
    for entry in vocabulary:
        entry_norm = " ".join(entry.lower().split())
        if not entry_norm:
            continue
        for form in _surface_forms(entry_norm):
            # An exact entry always wins over another entry's plural spelling.
            if form == entry_norm or form not in canonical:
                canonical[form] = entry_norm
    pattern = _phrase_pattern(canonical)
    entry_patterns = {
        entry: _phrase_pattern([f for f, e in canonical.items() if e == entry]) for entry in set(canonical.values())
    }
    covered: dict[str, set[str]] = {}

    def present_entries(obj: str) -> set[str]:
        # The object itself, plus every vocabulary entry inside it: a present
        # "red circle" also makes "circle" present.
        obj_norm = " ".join(obj.lower().split())
        if obj_norm not in covered:
            found = {canonical.get(obj_norm, obj_norm)}
            found.update(e for e, pat in entry_patterns.items() if pat.search(obj_norm))
            covered[obj_norm] = found
        return covered[obj_norm]

    mentions = hallucinated = bad_captions = 0
    for caption, present in zip(captions, present_objects):
        present_norm: set[str] = set()
        for obj in present:
            present_norm |= present_entries(obj)
        caption_bad = False
        for m in pattern.finditer(caption.lower()):
            entry = canonical[" ".join(m.group(1).split())]
            mentions += 1
            if entry not in present_norm:
                hallucinated += 1
                caption_bad = True
        bad_captions += caption_bad
    n_captions = len(captions)
    return {
        "chair_i": hallucinated / mentions if mentions else 0.0,
        "chair_s": bad_captions / n_captions if n_captions else 0.0,
        "mentions": mentions,
        "hallucinated_mentions": hallucinated,
        "captions": n_captions,
        "hallucinated_captions": bad_captions,
    }
