"""Evaluation metrics for vision-language answers: VQA accuracy, multiple choice,
BLEU-4, CIDEr-D, POPE and CHAIR-style hallucination rates.

Why these exact definitions: the L2T paper (and every LLaVA-style paper it is
compared with) reports numbers produced by a handful of standard scripts, and
small differences in those scripts move scores by whole points. A λ sweep is
only worth reading against published numbers if each metric here is computed
the way the reference tool computes it, quirks included:

- VQA normalization and soft accuracy: the official VQAv2 evaluation script
  (GT-Vision-Lab/VQA, ``vqaEval.py``: ``processPunctuation`` and
  ``processDigitArticle``), which EvalAI and LLaVA's evaluators reuse.
- BLEU and CIDEr-D: pycocoevalcap (the COCO caption evaluation code:
  ``bleu_scorer.py`` with the "closest" reference length, ``cider_scorer.py``),
  on text tokenized roughly as its PTBTokenizer does.
- POPE: the yes/no rule of the POPE ``evaluate.py`` script (also LLaVA's
  ``eval_pope.py``).
- CHAIR: the instance / sentence hallucination rates of Rohrbach et al. 2018,
  over a caller-given object vocabulary instead of the COCO synonym list.

Where a reference script has a quirk that changes numbers, the code keeps it
and a comment says so. Everything is plain Python; no model or framework.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Collection, Sequence

# ---------------------------------------------------------------------------
# VQA answer normalization (official VQAv2 eval script, vqaEval.py)
# ---------------------------------------------------------------------------

_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    # Sic: the official table maps this one backwards; kept for fidelity.
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}

_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

_ARTICLES = frozenset({"a", "an", "the"})

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]

# The official pattern, verbatim. "(?!<=\d)" is a look-ahead (the script meant a
# look-behind), so in effect it removes every period not followed by a digit:
# "yes." -> "yes", while "1.5" keeps its decimal point.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")


def _process_punctuation(text: str) -> str:
    """``processPunctuation`` of vqaEval.py.

    Each punctuation mark is deleted when it touches a space somewhere in the
    input (or when the input has a comma between two digits, as in "1,000"),
    and replaced by a space otherwise ("black/white" -> "black white").
    """
    out = text
    digit_comma = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The script calls periodStrip.sub("", outText, re.UNICODE): the flag lands
    # in the positional `count` argument, so at most 32 periods are removed.
    return _PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def _process_digit_article(text: str) -> str:
    """``processDigitArticle`` of vqaEval.py: lowercase, split on whitespace,
    number words to digits, drop articles, restore contractions, rejoin."""
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(word)
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def normalize_vqa_answer(text: str) -> str:
    """Normalize an answer as the official VQAv2 evaluation does.

    Newlines and tabs become spaces, the text is stripped, then punctuation is
    handled (``processPunctuation``) and the words are lowercased, number words
    turned into digits, articles dropped and contractions restored
    (``processDigitArticle``).

    Examples: ``"Two dogs."`` -> ``"2 dogs"``; ``"yes."`` -> ``"yes"``;
    ``"dont"`` -> ``"don't"``; ``"1,000"`` -> ``"1000"`` (the comma between
    digits is deleted, never turned into a space); ``"3.5"`` -> ``"3.5"``.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against its human answers.

    With 10 (or more) reference answers this is the official soft score: for
    each answer left out in turn, ``min(1, matches among the others / 3)``,
    averaged over the leave-one-out subsets. So 0 matches -> 0, 1 -> 0.3,
    2 -> 0.6, 3 -> 0.9, 4 or more -> 1.0.

    With fewer than 10 references (GQA-style single answers, or a short list of
    acceptable answers) the soft score would cap below 1, so this returns exact
    match instead: 1.0 when the prediction equals any reference, else 0.0.

    Both sides go through :func:`normalize_vqa_answer`. The official script
    only runs ``processPunctuation`` on references, because VQAv2 annotations
    were normalized at collection time; normalizing them fully (as LLaVA's
    TextVQA evaluator does) gives the same result on those and is robust on
    other data.
    """
    if len(answers) == 0:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    refs = [normalize_vqa_answer(a) for a in answers]
    if len(refs) < 10:
        return 1.0 if pred in refs else 0.0
    matches = [ref == pred for ref in refs]
    total = sum(matches)
    scores = [min(1.0, (total - left_out) / 3.0) for left_out in matches]
    return sum(scores) / len(scores)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when prediction and reference are equal after VQA normalization, else 0.0."""
    return 1.0 if normalize_vqa_answer(prediction) == normalize_vqa_answer(reference) else 0.0


# ---------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_MC_PREFIX = re.compile(
    r"^(?:the\s+)?(?:correct\s+|best\s+)?(?:answer|option|choice)(?:\s+is)?\s*[:\-]?\s*",
    re.IGNORECASE,
)


def _letter_index(letter: str, n_choices: int) -> int | None:
    idx = _LETTERS.find(letter.upper())
    return idx if 0 <= idx < n_choices else None


def parse_multiple_choice(prediction: str, choices: Sequence[str]) -> int | None:
    """Index of the option a free-text prediction picks, or None.

    In order: a bare letter ("B", "b", "(B)", "B."), a letter in parentheses or
    with a delimiter before more text ("(B) red", "B. red", "B: red", "B) red"),
    the option text itself (after VQA normalization, so "A red circle" matches
    the option "red circle"), an uppercase letter followed by that option's
    text ("B red"), and finally exactly one option text appearing as whole
    words inside the prediction. Leading "Answer:" / "The answer is" is
    ignored. Options are lettered A, B, C, ... in the order given.
    """
    n = len(choices)
    s = _MC_PREFIX.sub("", prediction.strip()).strip()
    if not s:
        return None
    m = re.fullmatch(r"\(?([A-Za-z])\)?[.:)]?", s)
    if m:
        return _letter_index(m.group(1), n)
    m = re.match(r"\(([A-Za-z])\)", s) or re.match(r"([A-Z])[.:)](?:\s|$)", s)
    if m:
        return _letter_index(m.group(1), n)
    norm_choices = [normalize_vqa_answer(c) for c in choices]
    norm_pred = normalize_vqa_answer(s)
    if norm_pred in norm_choices:
        return norm_choices.index(norm_pred)
    m = re.match(r"([A-Z])\s+(.+)", s)
    if m:
        idx = _letter_index(m.group(1), n)
        if idx is not None and normalize_vqa_answer(m.group(2)) == norm_choices[idx]:
            return idx
    found = [i for i, c in enumerate(norm_choices) if c and re.search(r"(?<!\S)" + re.escape(c) + r"(?!\S)", norm_pred)]
    # "red circle" also contains the option "circle": keep the longest matches.
    found = [i for i in found if not any(j != i and norm_choices[i] in norm_choices[j] for j in found)]
    return found[0] if len(found) == 1 else None


def multiple_choice_accuracy(prediction: str, choices: Sequence[str], answer: str) -> float:
    """1.0 when the prediction picks the correct option, else 0.0.

    ``answer`` is either the correct option's text (exactly one of ``choices``)
    or its letter ("B", "(B)"). The prediction is parsed with
    :func:`parse_multiple_choice`; an unparseable prediction scores 0.0.
    """
    if answer in choices:
        target = list(choices).index(answer)
    else:
        m = re.fullmatch(r"\s*\(?([A-Za-z])\)?[.:)]?\s*", answer)
        target = _letter_index(m.group(1), len(choices)) if m else None
        if target is None:
            norm = [normalize_vqa_answer(c) for c in choices]
            norm_answer = normalize_vqa_answer(answer)
            if norm_answer not in norm:
                raise ValueError(f"answer {answer!r} is neither an option nor an option letter")
            target = norm.index(norm_answer)
    return 1.0 if parse_multiple_choice(prediction, choices) == target else 0.0


# ---------------------------------------------------------------------------
# Caption tokenization (approximates pycocoevalcap's PTBTokenizer)
# ---------------------------------------------------------------------------

_CLITIC_NT = re.compile(r"(\w)n't\b")
_CLITIC = re.compile(r"(\w)'(s|re|ve|ll|d|m)\b")
_CAPTION_TOKEN = re.compile(r"n't\b|'[a-z]+|\d+(?:[.,]\d+)+|[a-z0-9]+(?:-[a-z0-9]+)*|\S")
# PTBTokenizer output tokens that pycocoevalcap drops; PTB turns quotes and
# brackets into ``, '', -LRB- ... which are in its list too.
_DROPPED = frozenset({"'", "`", '"', "(", ")", "[", "]", "{", "}", ".", "?", "!", ",", ":", "-", ";"})


def tokenize_caption(text: str) -> list[str]:
    """Tokenize a caption roughly as pycocoevalcap's PTBTokenizer does.

    Lowercase; split off clitics as the Penn Treebank does ("dog's" -> "dog 's",
    "don't" -> "do n't"); keep numbers ("1,000", "3.5") and hyphenated words
    whole; drop the punctuation tokens pycocoevalcap removes (. , ? ! : ; - and
    quotes, brackets). Other symbols ("&", "%") stay as tokens, as in PTB.
    """
    text = _CLITIC_NT.sub(r"\1 n't", text.lower())
    text = _CLITIC.sub(r"\1 '\2", text)
    return [t for t in _CAPTION_TOKEN.findall(text) if t not in _DROPPED]


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
    for cand, refs in zip(candidates, references):
        words = tokenize_caption(cand)
        counts = _ngram_counts(words, max_n)
        maxcounts: dict[tuple, int] = {}
        reflens = []
        for ref in refs:
            ref_words = tokenize_caption(ref)
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
    cand_counts = [_ngram_counts(tokenize_caption(c), n) for c in candidates]
    ref_counts = [[_ngram_counts(tokenize_caption(r), n) for r in refs] for refs in references]

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
# POPE
# ---------------------------------------------------------------------------


def pope_yes_no(text: str) -> str:
    """Map a free-text answer to "yes" / "no" with the POPE script's rule.

    Keep the text before the first period, delete commas, split on spaces; the
    answer is "no" when a word is exactly "No", "no" or "not", else "yes". The
    rule is case-sensitive and splits on single spaces, as the script does
    ("NO" and "no!" count as yes there too).
    """
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict:
    """POPE scores: accuracy, precision, recall, F1 (positive = "yes"), yes_ratio,
    and the counts tp, fp, tn, fn.

    Predictions are free text mapped by :func:`pope_yes_no`; labels must be
    "yes" or "no" (any case). A ratio with a zero denominator is reported as 0.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if len(predictions) == 0:
        raise ValueError("no predictions")
    tp = fp = tn = fn = 0
    for pred, label in zip(predictions, labels):
        gold = label.strip().lower()
        if gold not in ("yes", "no"):
            raise ValueError(f"POPE label must be 'yes' or 'no', got {label!r}")
        said_yes = pope_yes_no(pred) == "yes"
        if said_yes and gold == "yes":
            tp += 1
        elif said_yes:
            fp += 1
        elif gold == "no":
            tn += 1
        else:
            fn += 1
    total = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / total,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / total,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


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


# ---------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------


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
