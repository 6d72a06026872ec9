"""The built-in demo corpus: seeded, template-made children's stories in the style of TinyStories.

`slm run demo` and `slm prepare demo` train on this offline, so that a small GPT on a 2-core CPU
visibly learns grammar and story shape within minutes. A story is a cast (hero, friend, grown-up),
a setting and one plot; a plot is paragraphs of slots, and each slot lists interchangeable sentences.
Only one random.Random(seed) makes choices, and only over lists and insertion-ordered dicts, so the
text never depends on PYTHONHASHSEED. This module makes text; prepare.py tokenizes and writes it. The
sentences are in story_plots.txt and story_tables.txt, beside this file.
"""

from __future__ import annotations

import random
import re
from importlib.resources import files
from typing import Iterator

from slm.errors import SlmError

# split -> (seed, number of stories): ~6.0 MB of train text, ~190 KB of validation text. The seeds differ,
# and with dozens of independent choices per story, a story repeated across splits is vanishingly unlikely.
SPLITS = {"train": (20240501, 9400), "validation": (20240502, 300)}

GIRLS = "Lily Mia Sue Anna Emma Lucy Sara Amy Zoe Ella Kate Jenny Molly Rose Ruby Sophie Ava Grace Chloe Nora \
Ellie Hannah Ivy Lola Maya Sally Jane Olive Mary Tina".split()
BOYS = "Tom Ben Max Sam Tim Leo Jack Timmy Joe Jake Bob Finn Billy Danny Alex Ollie Noah Theo Henry Oscar \
Jimmy Eli Luke Mark Peter Sammy Toby Adam Dan Ned".split()
PETS = "Spot Buddy Fluffy Coco Pip Rex Sunny Bingo Milo Scout Bongo Tweety Patch Pepper Ziggy Nutmeg Biscuit \
Cookie Peanut Muffin Snowy Benny Dot Hoppy Fuzzy Pickle Bean Squeaky".split()
ROBOTS = "Beep Bolt Zip Clank Robo Blip Sparky Tock Gizmo".split()
ANIMALS = "cat dog puppy kitten bunny bird duck frog bear mouse fox owl elephant lion monkey squirrel turtle \
pig cow horse lamb hedgehog penguin giraffe goat chick deer raccoon panda tiger zebra otter ant".split()
CHILD_ADJ = "little little small kind happy curious brave shy sweet young cheerful playful friendly".split()
ANIMAL_ADJ = "little small fluffy happy curious brave old playful friendly silly tiny young".split()
ROBOT_ADJ = "little small shiny old friendly tiny".split()
TRAITS = "kind curious brave cheerful gentle playful friendly clever helpful funny honest patient polite caring".split()
TOYS = ["ball", "kite", "doll", "teddy bear", "toy car", "toy boat", "hat", "book", "blanket", "balloon",
        "drum", "bucket", "truck", "train", "scarf", "wagon", "spinning top", "puppet", "jump rope", "toy rocket",
        "whistle", "umbrella", "yo-yo", "toy plane", "wooden horse", "music box", "snow globe", "rubber duck"]
TOY_ADJ = "red blue green yellow pink purple orange brown white new big little shiny tiny striped spotted".split()
FOODS = ["sandwiches", "sweet red apples", "juicy grapes", "warm cookies", "yellow cheese", "fresh strawberries",
         "little muffins", "ripe bananas", "crunchy carrots", "salty crackers", "sweet plums"]
PRONOUNS = {"she": ("she", "her", "her", "herself"), "he": ("he", "him", "his", "himself"),
            "it": ("it", "it", "its", "itself")}
# kind of character -> (nouns, adjectives, names); girls and boys fix the pronoun, animals draw one.
CHARACTERS = {"girl": (["girl"], CHILD_ADJ, GIRLS), "boy": (["boy"], CHILD_ADJ, BOYS),
              "animal": (ANIMALS, ANIMAL_ADJ, PETS), "robot": (["robot", "toy robot"], ROBOT_ADJ, ROBOTS)}
GROWNUPS = [("mom", "Mom", "she"), ("dad", "Dad", "he"), ("grandma", "Grandma", "she"), ("grandpa", "Grandpa", "he")]
# Keys no story sets: each use draws a fresh word, so two sentences of one story rarely read the same.
SYNONYMS = {"day": ["One day", "One sunny day", "One morning", "One afternoon", "One bright morning",
                    "One warm day", "One windy day", "Later that week", "One summer day", "Early one morning",
                    "One cool autumn day", "One spring morning", "One Saturday morning"],
            "happy": ["happy", "glad", "happy", "cheerful"], "sad": ["sad", "upset", "sad", "unhappy"],
            "scared": ["scared", "afraid", "frightened"], "ran": ["ran", "hurried", "raced", "rushed"],
            "big": ["big", "warm", "tight", "huge"]}


def _table(text: str) -> list[tuple[str, ...]]:
    """Rows of ' | '-separated fields, one row a line."""
    return [tuple(field.strip() for field in line.split("|")) for line in text.strip().splitlines()]


def _text(name: str) -> str:
    return (files("slm.data") / name).read_text(encoding="utf-8")


def _sections(text: str) -> dict[str, str]:
    """The text under each '== NAME' line, by NAME."""
    return dict(part.split("\n", 1) for part in ("\n" + text).split("\n== ")[1:])


def _plot(text: str) -> list[list[list[str]]]:
    """Paragraphs (between '--' lines) of slots (between blank lines) of alternatives (a line each; '~' is none)."""
    return [[[("" if line == "~" else line) for line in slot.splitlines()] for slot in paragraph.strip().split("\n\n")]
            for paragraph in text.strip().split("\n--\n")]


# story_tables.txt: a table (_table's rows) under each '== NAME' line. story_plots.txt: the opening, then every
# plot, separated by '==' lines, each in _plot's format.
TABLES = {name: _table(rows) for name, rows in _sections(_text("story_tables.txt")).items()}
# place | preposition | four sights (with article) | four hiding spots
PLACES = [(name, prep, sights.split("; "), spots.split("; ")) for name, prep, sights, spots in TABLES["places"]]
# Free of pronouns, so hero and friend can share them: (base form, -ing form).
ACTIVITIES = TABLES["activities"]
# Per-plot details, by their fields; the fields may use the cast's keys, filled once when the cast is made.
PLOT_DETAILS = {name: rows for name, rows in TABLES.items() if name not in ("places", "activities")}
OPENING, *PLOTS = [_plot(text) for text in _text("story_plots.txt").split("\n==\n")]
# One more slot at the end of every plot; kept free of the friend, whom some plots never meet.
CLOSING = ["", "", "", "And they all lived happily ever after.", "It was a very good day.",
           "{hero} went to bed that night with a big smile.",
           "That evening, the stars came out, twinkling over the {place}."]
# Sentence starts: string start, after '. ', '! ', '? ', or after a quote that ends a sentence ('." ').
# After '!" ' or '?" ' comes a speech tag ("Hi!" she said), which stays lower case.
_SENTENCE_START = re.compile(r'(^|[.!?] |\." )([a-z])')


class _Words(dict):
    """One story's words by key; a key no story sets (e.g. {happy}) draws a fresh synonym at each use."""

    def __init__(self, rng: random.Random):
        super().__init__()
        self.rng = rng

    def __missing__(self, key: str) -> str:
        return self.rng.choice(SYNONYMS[key])


def _article(phrase: str) -> str:
    """'a' or 'an' before phrase, by its first letter: right for every word in this module's lists."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _character(rng: random.Random, kind: str, avoid: str = "") -> tuple[str, str, tuple[str, ...]]:
    """(name, described with article, pronouns) of a character of the given kind."""
    nouns, adjectives, names = CHARACTERS[kind]
    pronoun = {"girl": "she", "boy": "he", "robot": "it"}.get(kind) or rng.choice(["she", "he"])
    name = rng.choice([n for n in names if n != avoid])
    return name, _article(f"{rng.choice(adjectives)} {rng.choice(nouns)}"), PRONOUNS[pronoun]


def _cast(rng: random.Random) -> _Words:
    """Everyone and everything one story talks about, under the keys its templates use."""
    w = _Words(rng)
    kind = rng.choices(list(CHARACTERS), weights=[3, 3, 3, 1])[0]  # girl, boy, animal, and now and then a robot
    hero, w["a_hero"], pronouns = _character(rng, kind)
    w.update(hero=hero, **dict(zip(("he", "him", "his", "himself"), pronouns)))
    w["friend"], w["a_friend"], pronouns = _character(rng, rng.choice(["girl", "boy", "animal"]), avoid=hero)
    w.update(zip(("fhe", "fhim", "fhis"), pronouns))
    if w["he"] == "it":  # a robot's grown-up is the one who made it; "its mom" would read oddly
        w["mom"], w["Mom"], pronoun = "the old toymaker", "Mr. Toymaker", "he"
    else:
        word, w["Mom"], pronoun = rng.choice(GROWNUPS)
        w["mom"] = f"{w['his']} {word}"
    w.update(zip(("mhe", "mhim", "mhis"), PRONOUNS[pronoun]))
    place, prep, sights, spots = rng.choice(PLACES)
    w.update(place=place, at_place=f"{prep} the {place}", spot=rng.choice(spots), trait=rng.choice(TRAITS))
    w["sight"], w["sight2"] = rng.sample(sights, 2)
    w["activity"], w["doing"] = rng.choice(ACTIVITIES)
    w["food"] = " and ".join(rng.sample(FOODS, 2))
    w["toy"] = rng.choice(TOYS)
    w["adj_toy"] = f"{rng.choice(TOY_ADJ)} {w['toy']}"
    w["a_toy"] = _article(w["adj_toy"])
    for fields, rows in PLOT_DETAILS.items():  # last, because their text uses the keys above
        w.update((key, text.format_map(w)) for key, text in zip(fields.split(), rng.choice(rows)))
    return w


def _story(rng: random.Random) -> str:
    """One story: the opening paragraph, then one plot's paragraphs, the last one closed by CLOSING."""
    words = _cast(rng)
    paragraphs = [*OPENING, *rng.choice(PLOTS)]
    paragraphs[-1] = [*paragraphs[-1], CLOSING]
    text = []
    for slots in paragraphs:
        sentences = (rng.choice(alternatives).format_map(words) for alternatives in slots)
        paragraph = " ".join(s for s in sentences if s)
        text.append(_SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), paragraph))
    return "\n".join(text)


def generate_stories(count: int, seed: int) -> Iterator[str]:
    """count stories, the same ones for the same seed on every machine and Python run."""
    rng = random.Random(seed)
    for _ in range(count):
        yield _story(rng)


def demo_documents(split: str) -> Iterator[str]:
    """Stories of the built-in demo corpus; split is "train" or "validation" (another seed; no story is in both)."""
    if split not in SPLITS:
        raise SlmError(f"unknown demo split {split!r}; valid splits are: {', '.join(SPLITS)}")
    seed, count = SPLITS[split]
    return generate_stories(count, seed)
