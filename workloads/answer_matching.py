"""Answer matching for short answers: VQA normalization and accuracy, exact match,
multiple-choice parsing and the POPE yes/no rule with its scores.

Why these exact definitions: the L2T paper (and every LLaVA-style paper it is
compared with) reports numbers produced by a handful of standard scripts, and
small differences in those scripts move scores by whole points. A λ sweep is
only worth reading against published numbers if each metric here is computed
the way the reference tool computes it, quirks included:

- VQA normalization and soft accuracy: the official VQAv2 evaluation script
  (GT-Vision-Lab/VQA, ``vqaEval.py``: ``processPunctuation`` and
  ``processDigitArticle``), which EvalAI and LLaVA's evaluators reuse.
- POPE: the yes/no rule of the POPE ``evaluate.py`` script (also LLaVA's
  ``eval_pope.py``).
- GQA: LLaVA's ``scripts/convert_gqa_for_eval.py`` (trailing periods stripped,
  lower-cased) and the official GQA ``eval.py`` (exact string match).
- Multiple choice: LLaVA's ``llava/eval/eval_science_qa.py`` letter parser.

Each published number uses one of these rules, so the rule is a named choice:
`ANSWER_RULES` for short answers (`score_short_answer`), `CHOICE_PARSERS` for
multiple choice (`multiple_choice_accuracy`).

Caption metrics (BLEU-4, CIDEr-D, CHAIR) are in caption_metrics.py. Where a
reference script has a quirk that changes numbers, the code keeps it and a
comment says so. Everything is plain Python; no model or framework.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

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


def gqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the prediction, as LLaVA's GQA conversion writes it, equals a reference answer, else 0.0.

    ``convert_gqa_for_eval.py`` keeps ``text.rstrip('.').lower()`` of the (already stripped) model output
    and GQA's ``eval.py`` compares it with the answer as it is: no article, number or punctuation
    normalization, so "Yes." and "yes" match but "the table" and "table" do not."""
    if len(answers) == 0:
        raise ValueError("gqa_accuracy needs at least one reference answer")
    pred = prediction.strip().rstrip(".").lower()
    return 1.0 if any(pred == a for a in answers) else 0.0


ANSWER_RULES = ("vqa", "gqa", "exact")
"""Short-answer rules: `vqa` (`vqa_accuracy`: VQAv2's normalization and soft score), `gqa`
(`gqa_accuracy`: LLaVA's GQA evaluation), `exact` (exact match against any reference after the VQA
normalization, which drops articles and turns number words into digits)."""


def score_short_answer(prediction: str, answers: Sequence[str], rule: str = "vqa") -> float:
    """The score of a short answer under one of `ANSWER_RULES`."""
    if rule == "vqa":
        return vqa_accuracy(prediction, answers)
    if rule == "gqa":
        return gqa_accuracy(prediction, answers)
    if rule == "exact":
        if len(answers) == 0:
            raise ValueError("exact match needs at least one reference answer")
        return max(exact_match(prediction, a) for a in answers)
    raise ValueError(f"answer rule must be one of {ANSWER_RULES}, got {rule!r}")


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


CHOICE_PARSERS = ("llava", "lenient")
"""Multiple-choice parsers: `llava` (`parse_choice_llava`, LLaVA's ScienceQA rule), `lenient`
(`parse_multiple_choice`, which also reads "(B)", "B." and the option text)."""

_LLAVA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")  # sic: "." is any character, as in LLaVA


def parse_choice_llava(prediction: str, n_choices: int) -> int | None:
    """Index of the option a prediction picks under LLaVA's ``eval_science_qa.py`` rule, or None ("FAILED").

    The prediction must be exactly a letter ("B"), start with a letter, a period and a space ("B. blue"),
    or contain "The answer is B" once with one more character after the letter; so "B.", "(B)", "b" and
    "blue" fail. Letters are A-E as in the script (``--options``), or as many as there are options beyond
    five; a letter past the last option fails too.
    """
    letters = _LETTERS[: max(5, n_choices)]
    if prediction in letters:
        letter = prediction
    elif len(prediction) >= 3 and prediction[0] in letters and prediction[1:3] == ". ":
        letter = prediction[0]
    else:
        found = _LLAVA_ANSWER_IS.findall(prediction)
        letter = found[0] if len(found) == 1 else None
    if letter is None or letter not in letters[:n_choices]:
        return None
    return letters.index(letter)


def multiple_choice_accuracy(prediction: str, choices: Sequence[str], answer: str, parser: str = "lenient") -> float:
    """1.0 when the prediction picks the correct option, else 0.0.

    ``answer`` is either the correct option's text (exactly one of ``choices``)
    or its letter ("B", "(B)"). The prediction is parsed with ``parser``, one of
    `CHOICE_PARSERS` (:func:`parse_multiple_choice` for ``lenient``,
    :func:`parse_choice_llava` for ``llava``); an unparseable prediction scores 0.0.
    """
    if parser not in CHOICE_PARSERS:
        raise ValueError(f"choice parser must be one of {CHOICE_PARSERS}, got {parser!r}")
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
    if parser == "llava":
        picked = parse_choice_llava(prediction, len(choices))
    else:
        picked = parse_multiple_choice(prediction, choices)
    return 1.0 if picked == target else 0.0


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
