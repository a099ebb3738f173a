"""CHAIR as published: caption hallucination over the 80 COCO objects (Rohrbach et al., EMNLP 2018).

This is the metric of the reference implementation (``LisaAnne/Hallucination``,
``utils/chair.py`` and ``data/synonyms.txt``), which the CHAIR numbers of
LLaVA-era papers come from:

- A caption's words are lower-cased and tokenized (the reference uses nltk's
  Treebank ``word_tokenize``; here the PTB tokenizer of ptb_tokenizer.py, which
  splits words the same way), then singularized word by word (the reference
  uses ``pattern.en.singularize``; `singularize` here is a small pure-Python
  singularizer exact on every word of the synonym list and the two-word rules).
- Two-word objects are merged left to right: "hot dog", "teddy bear", "traffic
  light", "cell phone", ... stay themselves (so a hot dog is not a dog), "baby
  bird" / "adult cow" become the animal (not a person), "passenger train" the
  train, "bow tie" a tie, "toilet seat" the toilet; a caption with both
  "toilet" and "seat" drops the seat (it is not a chair).
- Every remaining word on the synonym list is a mention of its COCO object
  ("men" -> person, "motorbike" -> motorcycle, "sofa" -> couch); repeats count.
- An image's ground truth is its COCO objects (segmentation labels) plus the
  objects its reference captions mention, both through the same rules.

CHAIR_i is hallucinated mentions over all mentions, CHAIR_s captions with a
hallucination over all captions. Quirks of the reference are kept: the
synonym list is split on ", " as the reference splits it, so its two entries
written after a double space (" motor bike", " cheesecake") never match, and
"motor bike", merged as a two-word object, then counts as nothing; "iPhone"
never matches lower-cased text; "pitcher" and "orange" are objects in any sense.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence

from workloads.ptb_tokenizer import ptb_tokenize

# data/synonyms.txt of the reference, verbatim (the double spaces included): the first word of a line is
# the COCO object, the others its synonyms.
SYNONYMS_TXT = """\
person, girl, boy, man, woman, kid, child, chef, baker, people, adult, rider, children, baby, worker, passenger, \
sister, biker, policeman, cop, officer, lady, cowboy, bride, groom, male, female, guy, traveler, mother, father, \
gentleman, pitcher, player, skier, snowboarder, skater, skateboarder, person, woman, guy, foreigner, child, \
gentleman, caller, offender, coworker, trespasser, patient, politician, soldier, grandchild, serviceman, walker, \
drinker, doctor, bicyclist, thief, buyer, teenager, student, camper, driver, solider, hunter, shopper, villager
bicycle, bike, bicycle, bike, unicycle, minibike, trike
car, automobile, van, minivan, sedan, suv, hatchback, cab, jeep, coupe, taxicab, limo, taxi
motorcycle, scooter,  motor bike, motor cycle, motorbike, scooter, moped
airplane, jetliner, plane, air plane, monoplane, aircraft, jet, jetliner, airbus, biplane, seaplane
bus, minibus, trolley
train, locomotive, tramway, caboose
truck, pickup, lorry, hauler, firetruck
boat, ship, liner, sailboat, motorboat, dinghy, powerboat, speedboat, canoe, skiff, yacht, kayak, catamaran, \
pontoon, houseboat, vessel, rowboat, trawler, ferryboat, watercraft, tugboat, schooner, barge, ferry, sailboard, \
paddleboat, lifeboat, freighter, steamboat, riverboat, battleship, steamship
traffic light, street light, traffic signal, stop light, streetlight, stoplight
fire hydrant, hydrant
stop sign
parking meter
bench, pew
bird, ostrich, owl, seagull, goose, duck, parakeet, falcon, robin, pelican, waterfowl, heron, hummingbird, \
mallard, finch, pigeon, sparrow, seabird, osprey, blackbird, fowl, shorebird, woodpecker, egret, chickadee, quail, \
bluebird, kingfisher, buzzard, willet, gull, swan, bluejay, flamingo, cormorant, parrot, loon, gosling, waterbird, \
pheasant, rooster, sandpiper, crow, raven, turkey, oriole, cowbird, warbler, magpie, peacock, cockatiel, lorikeet, \
puffin, vulture, condor, macaw, peafowl, cockatoo, songbird
cat, kitten, feline, tabby
dog, puppy, beagle, pup, chihuahua, schnauzer, dachshund, rottweiler, canine, pitbull, collie, pug, terrier, \
poodle, labrador, doggie, doberman, mutt, doggy, spaniel, bulldog, sheepdog, weimaraner, corgi, cocker, greyhound, \
retriever, brindle, hound, whippet, husky
horse, colt, pony, racehorse, stallion, equine, mare, foal, palomino, mustang, clydesdale, bronc, bronco
sheep, lamb, ram, lamb, goat, ewe
cow, cattle, oxen, ox, calf, cattle, holstein, heifer, buffalo, bull, zebu, bison
elephant
bear, panda
zebra
giraffe
backpack, knapsack
umbrella
handbag, wallet, purse, briefcase
tie, bow, bow tie
suitcase, suit case, luggage
frisbee
skis, ski
snowboard
sports ball, ball
kite
baseball bat
baseball glove
skateboard
surfboard, longboard, skimboard, shortboard, wakeboard
tennis racket, racket
bottle
wine glass
cup
fork
knife, pocketknife, knive
spoon
bowl, container
banana
apple
sandwich, burger, sub, cheeseburger, hamburger
orange
broccoli
carrot
hot dog
pizza
donut, doughnut, bagel
cake,  cheesecake, cupcake, shortcake, coffeecake, pancake
chair, seat, stool
couch, sofa, recliner, futon, loveseat, settee, chesterfield
potted plant, houseplant
bed
dining table, table, desk
toilet, urinal, commode, toilet, lavatory, potty
tv, monitor, televison, television
laptop, computer, notebook, netbook, lenovo, macbook, laptop computer
mouse
remote
keyboard
cell phone, mobile phone, phone, cellphone, telephone, phon, smartphone, iPhone
microwave
oven, stovetop, stove, stove top oven
toaster
sink
refrigerator, fridge, fridge, freezer
book
clock
vase
scissors
teddy bear, teddybear
hair drier, hairdryer
toothbrush
"""

_DOUBLE_WORDS = (
    "motor bike, motor cycle, air plane, traffic light, street light, traffic signal, stop light, fire hydrant, "
    "stop sign, parking meter, suit case, sports ball, baseball bat, baseball glove, tennis racket, wine glass, "
    "hot dog, cell phone, mobile phone, teddy bear, hair drier, potted plant, bow tie, laptop computer, "
    "stove top oven, hot dog, teddy bear, home plate, train track"
).split(", ")
_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")


def _tables() -> tuple[dict[str, str], dict[str, str]]:
    """(synonym -> COCO object, two-word phrase -> what it counts as), built as the reference builds them."""
    objects: dict[str, str] = {}
    for line in SYNONYMS_TXT.splitlines():
        names = line.strip().split(", ")
        for name in names:
            objects[name] = names[0]
    double = {w: w for w in _DOUBLE_WORDS}
    for animal in _ANIMALS:
        double[f"baby {animal}"] = animal
        double[f"adult {animal}"] = animal
    for vehicle in ("jet", "train"):
        double[f"passenger {vehicle}"] = vehicle
    double.update({"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"})
    return objects, double


COCO_SYNONYMS, DOUBLE_WORDS = _tables()
COCO_OBJECTS = tuple(dict.fromkeys(COCO_SYNONYMS.values()))
"""The 80 COCO object names, in the synonym list's order."""

_KNOWN = frozenset(COCO_SYNONYMS) | {w for phrase in DOUBLE_WORDS for w in phrase.split()}
_IRREGULAR = {
    "men": "man", "women": "woman", "people": "person", "children": "child", "mice": "mouse", "geese": "goose",
    "feet": "foot", "teeth": "tooth", "knives": "knife", "wives": "wife", "leaves": "leaf", "calves": "calf",
    "halves": "half", "wolves": "wolf", "shelves": "shelf", "loaves": "loaf", "thieves": "thief", "lice": "louse",
    "dice": "die", "oxen": "oxen", "cattle": "cattle", "sheep": "sheep", "bison": "bison", "fish": "fish",
    "deer": "deer", "species": "species", "series": "series", "scissors": "scissors", "glasses": "glass",
}  # fmt: skip


@functools.lru_cache(maxsize=8192)
def singularize(word: str) -> str:
    """A lower-case word's singular, as the reference's ``pattern.en.singularize`` gives it for COCO's words.

    Irregular plurals first ("men" -> "man", "people" -> "person", "mice" -> "mouse"), then words the synonym
    list and the two-word rules spell as they are ("bus", "skis", "scissors"), then "-men" -> "-man", then
    the regular endings (-s, -ies, -ves, -es), taking the first result the list knows ("phones" -> "phone",
    "buses" -> "bus", "horses" -> "horse", "ponies" -> "pony", "taxis" -> "taxi"). Words the list does not
    know only need to stay unknown.
    """
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word in _KNOWN or len(word) < 3:
        return word
    if word.endswith("men"):
        return word[:-3] + "man"
    if word.endswith("children"):
        return word[:-3]
    candidates = [word[:-1]] if word.endswith("s") else []
    if word.endswith("ies"):
        candidates.append(word[:-3] + "y")
    if word.endswith("ves"):
        candidates += [word[:-3] + "f", word[:-3] + "fe"]
    if word.endswith("es"):
        candidates.append(word[:-2])
    for candidate in candidates:
        if candidate in _KNOWN:
            return candidate
    if not candidates or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    return word[:-2] if word.endswith(("ses", "xes", "zes", "ches", "shes")) else word[:-1]


def caption_objects(caption: str) -> list[tuple[str, str]]:
    """The COCO object mentions of a caption, in order: (the words as merged, the COCO object), repeats kept.

    ``"Two men eat hot dogs near a teddy bear."`` -> ``[("man", "person"), ("hot dog", "hot dog"),
    ("teddy bear", "teddy bear")]``.
    """
    words = [singularize(w) for w in ptb_tokenize(caption.lower())]
    merged, i = [], 0
    while i < len(words):
        pair = " ".join(words[i : i + 2])
        if pair in DOUBLE_WORDS:
            merged.append(DOUBLE_WORDS[pair])
            i += 2
        else:
            merged.append(words[i])
            i += 1
    if "toilet" in merged and "seat" in merged:  # the seat of a toilet is not a chair
        merged = [w for w in merged if w != "seat"]
    return [(w, COCO_SYNONYMS[w]) for w in merged if w in COCO_SYNONYMS]


def ground_truth_objects(objects: Collection[str], references: Sequence[str] = ()) -> set[str]:
    """An image's COCO objects: its labels (COCO category names or any synonym, e.g. "dining table", "men";
    other names are ignored) and the objects its reference captions mention."""
    truth: set[str] = set()
    for name in objects:
        key = " ".join(str(name).lower().split())
        if key in COCO_SYNONYMS:
            truth.add(COCO_SYNONYMS[key])
        else:
            truth.update(obj for _, obj in caption_objects(key))
    for ref in references:
        truth.update(obj for _, obj in caption_objects(ref))
    return truth


def coco_chair(
    captions: Sequence[str],
    objects: Sequence[Collection[str]],
    references: Sequence[Sequence[str]] | None = None,
) -> dict:
    """CHAIR_i and CHAIR_s of generated captions on COCO-style images.

    ``objects[k]``: image k's object labels; ``references[k]``: its human captions, whose objects also count
    as ground truth (as in the published metric; pass None for labels only). Returns ``chair_i``,
    ``chair_s`` and the counts ``mentions``, ``hallucinated_mentions``, ``captions``,
    ``hallucinated_captions``, plus ``hallucinated``: per caption, the (words, object) pairs not in the image.
    ``chair_i`` is 0 when nothing is mentioned.
    """
    if len(captions) != len(objects) or (references is not None and len(references) != len(captions)):
        raise ValueError(f"{len(captions)} captions, {len(objects)} object lists, references for each caption")
    mentions = bad_mentions = bad_captions = 0
    hallucinated: list[list[tuple[str, str]]] = []
    for k, caption in enumerate(captions):
        truth = ground_truth_objects(objects[k], references[k] if references is not None else ())
        found = caption_objects(caption)
        wrong = [(words, obj) for words, obj in found if obj not in truth]
        mentions += len(found)
        bad_mentions += len(wrong)
        bad_captions += bool(wrong)
        hallucinated.append(wrong)
    return {
        "chair_i": bad_mentions / mentions if mentions else 0.0,
        "chair_s": bad_captions / len(captions) if captions else 0.0,
        "mentions": mentions,
        "hallucinated_mentions": bad_mentions,
        "captions": len(captions),
        "hallucinated_captions": bad_captions,
        "hallucinated": hallucinated,
    }
