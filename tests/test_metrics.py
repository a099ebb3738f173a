"""Hand-computed checks of answer_matching, caption_metrics and mean_std against the reference tools' definitions."""

from __future__ import annotations

import math

import pytest

from workloads.answer_matching import (
    exact_match,
    gqa_accuracy,
    multiple_choice_accuracy,
    normalize_vqa_answer,
    parse_choice_llava,
    parse_multiple_choice,
    pope_metrics,
    pope_yes_no,
    score_short_answer,
    vqa_accuracy,
)
from workloads.caption_metrics import bleu, bleu4, cider_d, cider_d_scores, hallucination_rate, tokenize_caption
from workloads.chair import COCO_OBJECTS, caption_objects, coco_chair, ground_truth_objects, singularize
from workloads.eval_summary import mean_std

# ---------------------------------------------------------------------------
# VQA
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("yes.", "yes"),
        ("Yes", "yes"),
        ("The two dogs.", "2 dogs"),  # article dropped, number word -> digit
        ("an apple", "apple"),
        ("a", ""),
        ("none", "0"),
        ("\tTen\n", "10"),
        ("dont", "don't"),
        ("Dont know", "don't know"),
        ("3.5", "3.5"),  # a period followed by a digit stays
        ("black/white", "black white"),  # no space next to "/": it becomes a space
        ("black / white", "black white"),  # space next to "/": deleted, spaces collapse
        ("red, white", "red white"),
        ("x-ray", "x ray"),
        ("left!", "left"),  # "!" not touching a space -> space, then stripped by split
        # The official script never turns a comma between digits into a space
        # ("1 000"); it deletes it, and with it every other punctuation mark.
        ("1,000", "1000"),
        ("1,000 dogs, 2 cats", "1000 dogs 2 cats"),
    ],
)
def test_normalize_vqa_answer(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


def test_vqa_soft_score_leave_one_out():
    # 2 of 10 humans said "2". Leave-one-out over the 10 answers:
    #   leaving out one of the 2 matching answers (2 subsets): 1 match left -> min(1, 1/3) = 1/3
    #   leaving out one of the 8 others (8 subsets):            2 matches   -> min(1, 2/3) = 2/3
    #   mean = (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6 / 10 = 0.6
    answers = ["2", "2"] + ["3"] * 8
    assert vqa_accuracy("two", answers) == pytest.approx(0.6)
    assert vqa_accuracy("Two.", answers) == pytest.approx(0.6)
    # 1 match: (1 * 0 + 9 * 1/3) / 10 = 0.3; 3 matches: (3 * 2/3 + 7 * 1) / 10 = 0.9
    assert vqa_accuracy("2", ["2"] + ["3"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    # 4 matches: every subset keeps >= 3 -> 1.0
    assert vqa_accuracy("2", ["2"] * 4 + ["3"] * 6) == pytest.approx(1.0)
    assert vqa_accuracy("4", answers) == 0.0


def test_vqa_few_references_is_exact_match():
    assert vqa_accuracy("The cat", ["cat"]) == 1.0
    assert vqa_accuracy("dog", ["cat"]) == 0.0
    assert vqa_accuracy("kitten", ["cat", "kitten"]) == 1.0
    with pytest.raises(ValueError):
        vqa_accuracy("cat", [])


def test_exact_match():
    assert exact_match("Yes.", "yes") == 1.0
    assert exact_match("three", "3") == 1.0
    assert exact_match("no", "yes") == 0.0


# ---------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------

CHOICES = ["blue square", "red circle", "green triangle"]


@pytest.mark.parametrize(
    ("prediction", "index"),
    [
        ("B", 1),
        ("b", 1),
        ("(B)", 1),
        ("B.", 1),
        ("B. red circle", 1),
        ("(B) red circle", 1),
        ("B: red circle", 1),
        ("B red circle", 1),
        ("Answer: C", 2),
        ("The answer is A.", 0),
        ("red circle", 1),
        ("A red circle.", 1),  # "A" is the article here: the option text decides
        ("It is a green triangle", 2),
        ("D", None),  # no fourth option
        ("purple star", None),
        ("red circle or blue square", None),  # ambiguous
    ],
)
def test_parse_multiple_choice(prediction, index):
    assert parse_multiple_choice(prediction, CHOICES) == index


def test_multiple_choice_accuracy():
    assert multiple_choice_accuracy("(B)", CHOICES, "red circle") == 1.0
    assert multiple_choice_accuracy("B. red circle", CHOICES, "B") == 1.0
    assert multiple_choice_accuracy("A", CHOICES, "B") == 0.0
    assert multiple_choice_accuracy("I am not sure", CHOICES, "B") == 0.0
    with pytest.raises(ValueError):
        multiple_choice_accuracy("A", CHOICES, "purple star")


@pytest.mark.parametrize(
    ("prediction", "index"),
    [
        ("B", 1),  # a bare letter
        ("B. red circle", 1),  # letter, period, space
        ("The answer is C. Because it is green.", 2),
        ("The answer is Cx", 2),  # sic: LLaVA's "." after the letter is any character
        ("B.", None),  # no space after the period: LLaVA's parser fails where the lenient one reads B
        ("(B)", None),
        ("b", None),
        ("red circle", None),  # the option's text is not a letter
        ("The answer is A. The answer is B.", None),  # two answers
        ("The answer is B", None),  # nothing after the letter
        ("D", None),  # past the last option
    ],
)
def test_parse_choice_llava(prediction, index):
    assert parse_choice_llava(prediction, len(CHOICES)) == index


def test_choice_parsers_are_a_named_choice():
    assert multiple_choice_accuracy("B.", CHOICES, "B") == 1.0  # lenient (the default)
    assert multiple_choice_accuracy("B.", CHOICES, "B", parser="llava") == 0.0
    assert multiple_choice_accuracy("Blue square.", CHOICES, "A", parser="lenient") == 1.0
    assert multiple_choice_accuracy("Blue square.", CHOICES, "A", parser="llava") == 0.0
    assert multiple_choice_accuracy("A. blue square", CHOICES, "blue square", parser="llava") == 1.0
    with pytest.raises(ValueError, match="choice parser"):
        multiple_choice_accuracy("A", CHOICES, "A", parser="strict")


def test_gqa_rule_is_llavas():
    # convert_gqa_for_eval.py: prediction.rstrip('.').lower(); GQA's eval.py: exact string match.
    assert gqa_accuracy("Yes.", ["yes"]) == 1.0
    assert gqa_accuracy("Table...", ["table"]) == 1.0
    assert gqa_accuracy("The table", ["table"]) == 0.0  # no article dropping, unlike the VQA normalization
    assert gqa_accuracy("two", ["2"]) == 0.0  # no number words
    assert gqa_accuracy("left side", ["left"]) == 0.0
    assert score_short_answer("The table", ["table"], "exact") == 1.0
    assert score_short_answer("two", ["2"], "exact") == 1.0
    assert score_short_answer("The table", ["table"], "gqa") == 0.0
    answers = ["2", "2"] + ["3"] * 8
    assert score_short_answer("two", answers, "vqa") == pytest.approx(0.6)  # soft score
    assert score_short_answer("two", answers, "exact") == 1.0  # any reference
    with pytest.raises(ValueError, match="answer rule"):
        score_short_answer("x", ["x"], "fuzzy")


# ---------------------------------------------------------------------------
# Captions: tokenization, BLEU, CIDEr-D
# ---------------------------------------------------------------------------


def test_tokenize_caption():
    assert tokenize_caption("A red circle, on the LEFT.") == ["a", "red", "circle", "on", "the", "left"]
    assert tokenize_caption("The dog's ball isn't 1,000 x-rays!") == [
        "the",
        "dog",
        "'s",
        "ball",
        "is",
        "n't",
        "1,000",
        "x-rays",
    ]


def test_bleu4_worked_example():
    # Sentence 1, candidate "a big red circle next to a square" (8 tokens)
    #   r1 "a red circle next to a blue square" (8), r2 "the big red circle beside the square" (7)
    #   unigrams: a x2 (r1 has 2), big, red, circle, next, to, square -> 8/8 clipped matches
    #   bigrams:  a-big x, big-red (r2), red-circle, circle-next, next-to, to-a, a-square x -> 5/7
    #   trigrams: a-big-red x, big-red-circle (r2), red-circle-next, circle-next-to, next-to-a,
    #             to-a-square x -> 4/6
    #   4-grams:  red-circle-next-to, circle-next-to-a match; the other 3 do not -> 2/5
    #   closest reference length to 8: 8
    c1 = "a big red circle next to a square"
    r1 = ["a red circle next to a blue square", "the big red circle beside the square"]
    # Alone: BLEU-4 = (8/8 * 5/7 * 4/6 * 2/5) ** (1/4) = (4/21) ** 0.25, no brevity penalty
    assert bleu4([c1], [r1]) == pytest.approx((4 / 21) ** 0.25, rel=1e-6)
    # Sentence 2, candidate "blue square" (2 tokens), refs of 3 and 4 tokens:
    #   unigrams 2/2, bigrams 1/1, no trigram or 4-gram guesses; closest reference length 3
    c2 = "Blue square."
    r2 = ["a blue square", "one small blue square"]
    # Corpus sums: correct [10, 6, 4, 2], guesses [10, 8, 6, 5], c = 10 tokens, r = 8 + 3 = 11
    #   BLEU-4 = (10/10 * 6/8 * 4/6 * 2/5) ** (1/4) * exp(1 - 11/10) = 0.2 ** 0.25 * exp(-0.1)
    expected = 0.2**0.25 * math.exp(-0.1)
    assert bleu4([c1, c2], [r1, r2]) == pytest.approx(expected, rel=1e-6)
    # BLEU-1 = 10/10 * exp(-0.1); BLEU-2 = (1 * 6/8) ** 0.5 * exp(-0.1)
    b = bleu([c1, c2], [r1, r2])
    assert b[0] == pytest.approx(math.exp(-0.1), rel=1e-6)
    assert b[1] == pytest.approx(0.75**0.5 * math.exp(-0.1), rel=1e-6)


def test_bleu_closest_reference_length_ties_to_shorter():
    # 7-token candidate, references of 6 and 8 tokens: both 1 away; pycocoevalcap picks 6,
    # so no brevity penalty (picking 8 would multiply by exp(1 - 8/7)).
    cand = "the red circle is on the left"
    refs = ["the red circle is on the left side", "a red circle on the left"]
    assert bleu4([cand], [refs]) == pytest.approx(1.0, rel=1e-6)


# The CIDEr-D worked example corpus: two images.
#   image A: refs "a red circle", "one red circle"
#   image B: ref  "a blue square"
# N = 2 images, so idf = log 2 - log(max(1, df)):
#   "a" is in both images' references (df 2) -> weight 0;
#   every other reference n-gram has df 1 -> weight tf * log 2, and so does an
#   n-gram never seen in a reference (df 0 -> max(1, 0) = 1).
# All weights are multiples of log 2, which cancels in the cosines; below they
# are written in units of log 2.
CIDER_REFS = [["a red circle", "one red circle"], ["a blue square"]]


def test_cider_d_worked_example():
    # Candidate A "a red circle": n1 {a:0, red:1, circle:1} |.|=sqrt2; n2 {a red:1, red circle:1}
    #   |.|=sqrt2; n3 {a red circle:1} |.|=1; n4 empty |.|=0; length (bigrams) 2.
    #   vs "a red circle": identical -> cos 1, 1, 1, and 0 for n4 (zero norm); delta 0.
    #   vs "one red circle": n1 ref {one:1, red:1, circle:1} |.|=sqrt3, dot = 1+1 -> 2/sqrt6;
    #     n2 ref {one red:1, red circle:1}: dot 1 -> 1/(sqrt2*sqrt2) = 1/2; n3 0; n4 0; delta 0.
    #   score = 10 * (mean over n, summed over refs) / 2 refs
    #         = 10 * (1 + 1 + 1 + 0 + 2/sqrt6 + 1/2 + 0 + 0) / 4 / 2 = 5.3956...
    score_a = 10 * (3.5 + 2 / math.sqrt(6)) / 4 / 2
    # Candidate B "blue square": n1 {blue:1, square:1} sqrt2; n2 {blue square:1} 1; n3, n4 empty;
    #   length 1 bigram. Ref "a blue square": n1 {a:0, blue:1, square:1} sqrt2;
    #   n2 {a blue:1, blue square:1} sqrt2; n3 {a blue square:1}; length 2 -> delta -1,
    #   penalty exp(-1 / (2 * 6^2)) = exp(-1/72).
    #   n1 cos 2/2 = 1; n2 cos 1/sqrt2; n3, n4 0 (zero candidate norm).
    #   score = 10 * (1 + 1/sqrt2) * exp(-1/72) / 4 / 1 ref = 4.2089...
    score_b = 10 * (1 + 1 / math.sqrt(2)) * math.exp(-1 / 72) / 4
    scores = cider_d_scores(["a red circle", "blue square"], CIDER_REFS)
    assert scores == pytest.approx([score_a, score_b], rel=1e-9)
    assert score_a == pytest.approx(5.39562, abs=1e-5)
    assert score_b == pytest.approx(4.20890, abs=1e-5)
    assert cider_d(["a red circle", "blue square"], CIDER_REFS) == pytest.approx((score_a + score_b) / 2)


def test_cider_d_clips_candidate_counts():
    # Candidate A "red red circle" (df comes from references only, so weights are as above):
    #   n1 {red:2, circle:1} |.|=sqrt5; n2 {red red:1, red circle:1} sqrt2; n3 {red red circle:1}.
    #   vs "a red circle":   n1 dot min(2,1)*1 + 1*1 = 2 -> 2/(sqrt5*sqrt2); n2 dot 1 -> 1/2; n3 0
    #   vs "one red circle": n1 dot 2 -> 2/(sqrt5*sqrt3); n2 1/2; n3 0. Lengths equal (2 bigrams).
    #   Unclipped, each n1 dot would be 2*1 + 1 = 3.
    expected = 10 * (2 / math.sqrt(10) + 0.5 + 2 / math.sqrt(15) + 0.5) / 4 / 2
    scores = cider_d_scores(["red red circle", "blue square"], CIDER_REFS)
    assert scores[0] == pytest.approx(expected, rel=1e-9)


def test_cider_d_sanity():
    # Identical candidate and reference, 4+ words, no n-gram shared between the two
    # images: every order has cosine 1 and no length penalty -> 10 * 4/4 = 10.
    refs = [["red circle above blue square"], ["green triangle left of yellow star"]]
    cands = ["red circle above blue square", "green triangle left of yellow star"]
    assert cider_d_scores(cands, refs) == pytest.approx([10.0, 10.0])
    assert cider_d(cands, refs) == pytest.approx(10.0)
    # A 3-word caption has no 4-grams: that order contributes 0 -> 10 * 3/4.
    assert cider_d_scores(
        ["red circle above", "green triangle left"], [["red circle above"], ["green triangle left"]]
    ) == pytest.approx([7.5, 7.5])
    # No overlap with the references -> 0.
    assert cider_d_scores(["purple star", "green triangle left of yellow star"], refs)[0] == 0.0
    assert cider_d_scores(["", "green triangle left of yellow star"], refs)[0] == 0.0
    with pytest.raises(ValueError):
        cider_d(["a"], [["a"], ["b"]])


# ---------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------


def test_pope_yes_no_rule():
    assert pope_yes_no("Yes, there is a cat.") == "yes"
    assert pope_yes_no("No, there is no cat.") == "no"
    assert pope_yes_no("There is not a cat in the image.") == "no"
    assert pope_yes_no("Yes. No other animals are visible.") == "yes"  # first sentence only
    assert pope_yes_no("There is a cat, no dog") == "no"  # commas removed before splitting
    assert pope_yes_no("Nothing of the sort") == "yes"  # whole words only
    assert pope_yes_no("NO") == "yes"  # the script's rule is case-sensitive


def test_pope_metrics_counts():
    # label  yes  yes  yes  no   no   no   no   yes
    # pred   yes  yes  no   no   yes  no   no   yes
    #        tp   tp   fn   tn   fp   tn   tn   tp
    # tp 3, fp 1, tn 3, fn 1 -> accuracy 6/8, precision 3/4, recall 3/4, F1 3/4,
    # yes_ratio (3 + 1) / 8 = 0.5
    preds = ["Yes", "yes, there is", "No.", "no", "Yes", "There is not.", "No", "yes"]
    labels = ["yes", "yes", "yes", "no", "no", "no", "no", "yes"]
    m = pope_metrics(preds, labels)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 1, 3, 1)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["precision"] == pytest.approx(0.75)
    assert m["recall"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(0.75)
    assert m["yes_ratio"] == pytest.approx(0.5)
    # Always "no": precision, recall and F1 have no positive predictions -> 0.
    m = pope_metrics(["no", "no"], ["yes", "no"])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (0, 0, 1, 1)
    assert m["precision"] == m["recall"] == m["f1"] == m["yes_ratio"] == 0.0
    with pytest.raises(ValueError):
        pope_metrics(["yes"], ["maybe"])


# ---------------------------------------------------------------------------
# CHAIR
# ---------------------------------------------------------------------------


def test_hallucination_rate():
    vocabulary = ["circle", "square", "triangle", "red circle", "blue square", "cross"]
    captions = [
        "A red circle next to two squares.",  # red circle (present), square (present)
        "Circles and a blue square and crosses.",  # circle ok; blue square, cross hallucinated
        "A triangle. Another triangle!",  # triangle twice, hallucinated twice
        "An empty canvas.",  # no mention
    ]
    present = [{"red circle", "square"}, {"Circle"}, {"square"}, set()]
    m = hallucination_rate(captions, present, vocabulary)
    # mentions: 2 + 3 + 2 + 0 = 7; hallucinated: 0 + 2 + 2 = 4 -> CHAIR_i 4/7
    # captions with a hallucination: 2 of 4 -> CHAIR_s 0.5
    assert m["mentions"] == 7
    assert m["hallucinated_mentions"] == 4
    assert m["chair_i"] == pytest.approx(4 / 7)
    assert m["hallucinated_captions"] == 2
    assert m["chair_s"] == pytest.approx(0.5)


def test_hallucination_rate_longest_match_and_coverage():
    vocabulary = ["circle", "red circle", "blue circle"]
    # "red circle" is one mention (longest match), not also "circle".
    m = hallucination_rate(["a red circle"], [{"blue circle"}], vocabulary)
    assert (m["mentions"], m["hallucinated_mentions"]) == (1, 1)
    # A present "red circle" also makes a plain "circle" present; "blue circles" is not.
    m = hallucination_rate(["a circle and two blue circles"], [{"red circle"}], vocabulary)
    assert (m["mentions"], m["hallucinated_mentions"]) == (2, 1)
    # Whole words only: "circles" counts, "encircled" does not.
    m = hallucination_rate(["encircled"], [set()], vocabulary)
    assert m["mentions"] == 0 and m["chair_i"] == 0.0 and m["chair_s"] == 0.0


def test_coco_chair_worked_example():
    captions = [
        "Two men eat hot dogs next to a teddy bear.",  # man -> person, hot dog (not a dog), teddy bear (not a bear)
        "A man rides a motorbike past a baby giraffe.",  # motorbike -> motorcycle; a baby giraffe is no person
        "A cat sits on a toilet seat beside a sink.",  # toilet seat -> toilet: the seat is no chair
        "A sofa and tables in a room.",  # sofa -> couch, tables -> table -> dining table
        "An empty street.",
    ]
    objects = [["person", "hot dog"], ["person", "motorcycle"], ["toilet"], ["couch", "dining table"], []]
    references = [[], ["A person on a motorcycle near a giraffe."], [], [], []]
    m = coco_chair(captions, objects, references)
    # mentions: 3 + 3 + 3 + 2 + 0 = 11; hallucinated: teddy bear; none (the giraffe is in a reference
    # caption); cat and sink -> 3 -> CHAIR_i 3/11; captions with one: 1st and 3rd -> CHAIR_s 2/5
    assert m["mentions"] == 11 and m["hallucinated_mentions"] == 3
    assert m["chair_i"] == pytest.approx(3 / 11) and m["chair_s"] == pytest.approx(2 / 5)
    assert m["hallucinated"] == [[("teddy bear", "teddy bear")], [], [("cat", "cat"), ("sink", "sink")], [], []]
    # Without the reference captions the giraffe is not in the ground truth.
    assert coco_chair(captions, objects)["hallucinated"][1] == [("giraffe", "giraffe")]


def test_coco_chair_rules_and_synonyms():
    assert len(COCO_OBJECTS) == 80
    assert caption_objects("Children and women with puppies, buses and wine glasses.") == [
        ("child", "person"),
        ("woman", "person"),
        ("puppy", "dog"),
        ("bus", "bus"),
        ("wine glass", "wine glass"),
    ]
    assert caption_objects("Passenger trains on train tracks.") == [("train", "train")]  # a train track is not
    assert caption_objects("A bow tie and a cell phone.") == [("tie", "tie"), ("cell phone", "cell phone")]
    # Quirk of the reference's synonym list (" motor bike" after a double space never matches): nothing.
    assert caption_objects("A man on a motor bike.") == [("man", "person")]
    assert ground_truth_objects(["Dining Table", "men", "unicorn"]) == {"dining table", "person"}
    assert [singularize(w) for w in ["men", "people", "mice", "knives", "buses", "horses", "ponies", "phones"]] == [
        "man",
        "person",
        "mouse",
        "knife",
        "bus",
        "horse",
        "pony",
        "phone",
    ]
    assert [singularize(w) for w in ["bus", "skis", "scissors", "glass", "taxis", "sheep"]] == [
        "bus",
        "skis",
        "scissors",
        "glass",
        "taxi",
        "sheep",
    ]
    with pytest.raises(ValueError):
        coco_chair(["a dog"], [])


# ---------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------


def test_mean_std():
    # values 1, 2, 3, 4: mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    # sample std sqrt(5 / 3), population std sqrt(5 / 4)
    assert mean_std([1, 2, 3, 4]) == pytest.approx((2.5, math.sqrt(5 / 3)))
    assert mean_std([1, 2, 3, 4], ddof=0) == pytest.approx((2.5, math.sqrt(5 / 4)))
    assert mean_std([0.7]) == (0.7, 0.0)
    with pytest.raises(ValueError):
        mean_std([])
