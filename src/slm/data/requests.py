"""Story requests made from a story alone: "Write a story about Lily that uses the words ball, tree and happy."

A story's facts (its main character, its content words, its sentences, whether people talk in it, its
length) give requests the story itself satisfies: chat data (`slm make-instructions`) and instruction-conditioned
pretraining rows (windows.ConditionedRows) come from a corpus alone. slm.assistant.constraints reads requests and
scores answers in the same words, so training data, evaluation and the reward of any later search agree on what
"following the request" means.

Wordings. Each part of a request (how it asks for a story, how it names the character, lists the words,
gives the first or last sentence, asks for talk or none, for a short or long story) has many phrasings.
Every phrasing list ends with HELD_OUT phrasings that training never uses: `wording="held_out"` builds a
request from those only, so `slm eval-assistant` reports how the model does on wordings it never saw, and a
test checks that no training row holds one.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

# ---- the facts of a story ---------------------------------------------------------------------------

_NAMED = re.compile(r"\b(?:named|name was|name is|called) ([A-Z][a-z]+)\b")
_CAPITALIZED = re.compile(r"\b[A-Z][a-z]+\b")
# Capitalized words that are not names, or not the main character's (grown-ups are named by their role).
NOT_NAMES = frozenset("I Mom Mommy Dad Daddy Mama Papa Grandma Grandpa Granny Mr Mrs Miss Sir Mister Aunt Uncle "
                       "Teacher God Santa Christmas Monday Sunday The Once One".split())
# A sentence ends at . ! or ? (and a closing quote) before a capital letter or an opening quote.
_SENTENCE_END = re.compile(r'[.!?]["\u201d]?(?=\s+["\u201cA-Z])')
# Lower-case words of 3+ letters, not part of a contraction: candidates for "uses the words".
_WORD = re.compile(r"(?<![\w'])[a-z]{3,}(?![\w'])")
ANY_WORD = re.compile(r"[A-Za-z']+")
_QUOTE = re.compile(r'["\u201c\u201d]')
STOPWORDS = frozenset("""about after again also always and another any are around away back because called been before
being best both but came can come could did didn does doing done down each even ever every for from gave get
give going gone good got had has have her here him his how into its just know let like little look made make
many more most much must named next not now once one only other our out over said same saw say saying says see she
should some something soon still such sure take than that the their them then there these they thing things
this those through time told too took two upon very want wanted wants was way well went were what when where
which while who why will with would yes you your""".split())
SHORT_WORDS, LONG_WORDS = 110, 170  # a "short" story has at most this many words, a "long" one at least


def main_character(story: str) -> str | None:
    """The first "named X" / "name was X" of the story, else its most frequent capitalized word that does not
    start a sentence (seen at least twice); None when it names no one."""
    named = _NAMED.search(story)
    if named and named.group(1) not in NOT_NAMES:
        return named.group(1)
    counts: Counter[str] = Counter()
    for match in _CAPITALIZED.finditer(story):
        before = story[:match.start()].rstrip()
        if match.group() not in NOT_NAMES and before and before[-1] not in '.!?"\u201c:':
            counts[match.group()] += 1
    name, count = counts.most_common(1)[0] if counts else (None, 0)
    return name if count >= 2 else None


def sentences(text: str) -> list[str]:
    cuts = [0] + [m.end() for m in _SENTENCE_END.finditer(text)] + [len(text)]
    return [text[a:b].strip() for a, b in zip(cuts, cuts[1:]) if text[a:b].strip()]


def content_words(text: str, name: str | None = None) -> list[str]:
    """Distinct lower-case words of the text that are not function words, in order of appearance."""
    skip = STOPWORDS | {(name or "").lower()}
    return list(dict.fromkeys(w for w in _WORD.findall(text) if w not in skip))


def uses_word(text: str, word: str) -> bool:
    """Whether `word` occurs in text as a whole word, ignoring case."""
    return re.search(rf"\b{re.escape(word)}\b", text, re.IGNORECASE) is not None


def word_count(text: str) -> int:
    return len(ANY_WORD.findall(text))


def has_dialogue(text: str) -> bool:
    return len(_QUOTE.findall(text)) >= 2


def normalized(text: str) -> str:
    return " ".join(ANY_WORD.findall(text.casefold()))


@dataclass(frozen=True)
class Facts:
    name: str | None
    words: list[str]      # candidates for "uses the words", from the part of the story a model sees
    sentences: list[str]
    dialogue: bool
    words_in_story: int
    whole: bool           # whether the model sees the whole story (else only "visible" facts are asked for)


def story_facts(story: str, visible: str | None = None) -> Facts:
    """What requests the story satisfies. `visible` is the part of the story a training window holds: words
    and the name are drawn from it, and facts about the whole story's end are asked only when it is whole."""
    seen = story if visible is None else visible
    name = main_character(story)
    if name and not uses_word(seen, name):
        name = None
    return Facts(name, content_words(seen, name), sentences(seen), has_dialogue(story), word_count(story),
                 whole=visible is None or len(visible) >= len(story))


# ---- wordings ---------------------------------------------------------------------------------------
# Each list's last HELD_OUT entries are held out of training.
HELD_OUT = 2
ASK = ["Write a story", "Tell me a story", "Write me a story", "Please write a story", "Can you write a story",
       "Make up a story", "I would like a story", "Write a children's story", "Could you tell me a story",
       "Create a story", "Compose a story", "Give me a story",
       "Spin me a little tale", "I'd love to hear a story"]
ABOUT = [" about {name}", " about a character named {name}", " where the main character is {name}",
         " featuring {name}", " starring {name}", " about someone called {name}", " with {name} in it",
         " whose hero is {name}", " centered on {name}"]
WORDS = ["that uses the words {words}", "Use the words {words}.", "Include these words: {words}.",
         "Make sure it has the words {words}.", "The story should contain the words {words}.",
         "with the words {words}", "It must use {words}.", "Please include {words}.", "Words to use: {words}.",
         "Somewhere in it, mention {words}.", "Work in the words {words}."]
STARTS = ["Start with: {sentence}", "Begin the story with this sentence: {sentence}",
          "The first sentence should be: {sentence}", "Open with \"{sentence}\"", "It starts like this: {sentence}",
          "Kick it off with: {sentence}", "Let the opening line be: {sentence}"]
ENDS = ["End with: {sentence}", "The last sentence must be: {sentence}", "Finish the story with: {sentence}",
        "Make it end like this: {sentence}", "Close with: {sentence}", "The final line should read: {sentence}"]
DIALOGUE = ["Include some dialogue.", "Have the characters talk to each other.", "Let the characters speak.",
            "Put some conversation in it.", "Use dialogue.", "Make sure someone says something out loud.",
            "Add a few lines of speech."]
NO_DIALOGUE = ["Do not use any dialogue.", "No one should speak in it.", "Avoid dialogue.",
               "Tell it without any talking.", "Leave out any spoken lines.", "Keep quotes out of it."]
SHORT = ["Keep it short.", "Make it brief.", "A short one, please.", "Not too long.", "Keep it quick and small."]
LONG = ["Make it long.", "Write a long story.", "Make it a longer story.", "Take your time and make it long.",
        "I want a lengthy one.", "Make it nice and long."]
CONTINUE = ["Continue this story: {text}", "What happens next? {text}", "Finish this story: {text}",
            "Keep going with this story: {text}", "Carry on from here: {text}", "Please continue: {text}",
            "Pick up where this leaves off: {text}", "Go on with this tale: {text}"]
WHO = ["What is the name of the main character in this story?", "Who is the main character?",
       "What is the main character called?", "Who is this story about?", "Name the main character.",
       "Which character is the story mostly about?", "Tell me the hero's name."]
FOLLOW_UP = ["Now write another one that also {clause}", "Write a new one, and this time {clause}",
             "Another story please, but {clause}", "Again, but {clause}", "Try once more, and {clause}",
             "One more, where it {clause}", "Do another, making sure it {clause}"]
PHRASINGS = {"ask": ASK, "about": ABOUT, "words": WORDS, "starts": STARTS, "ends": ENDS, "dialogue": DIALOGUE,
             "no_dialogue": NO_DIALOGUE, "short": SHORT, "long": LONG, "continue": CONTINUE, "who": WHO,
             "follow_up": FOLLOW_UP}


def phrasings(part: str, wording: str) -> list[str]:
    """The phrasings of one part of a request that `wording` ("seen" or "held_out") may use."""
    options = PHRASINGS[part]
    return options[-HELD_OUT:] if wording == "held_out" else options[:-HELD_OUT]


def word_list(words: list[str], rng: random.Random) -> str:
    """The requested words written one of several ways: "a, b and c", "a, b, and c", quoted, or "a, b, c"."""
    style = rng.randrange(4)
    shown = [f'"{w}"' for w in words] if style == 2 else words
    if len(shown) == 1:
        return shown[0]
    if style == 3:
        return ", ".join(shown)
    return ", ".join(shown[:-1]) + ("," if style == 1 and len(shown) > 2 else "") + " and " + shown[-1]


def story_request(facts: Facts, rng: random.Random, wording: str = "seen") -> tuple[str, dict[str, Any]] | None:
    """(request text, constraints) for a story these facts satisfy: a random subset of a character, 1 to 4
    words, the first or last sentence, dialogue or none, short or long. None if the facts allow nothing."""
    pick = lambda part: rng.choice(phrasings(part, wording))  # noqa: E731
    options = []
    if facts.name:
        options.append("name")
    if len(facts.words) >= 1:
        options.append("words")
    if facts.sentences and len(facts.sentences[0]) < 160:
        options.append("starts")
    if facts.whole and len(facts.sentences) >= 3 and len(facts.sentences[-1]) < 160:
        options.append("ends")
    if facts.whole or facts.dialogue:
        options.append("dialogue")
    if facts.whole and (facts.words_in_story <= SHORT_WORDS or facts.words_in_story >= LONG_WORDS):
        options.append("length")
    if not options:
        return None
    # Characters and words are what people ask for most: weigh them up, then add 0-2 other constraints.
    chosen = {c for c in ("name", "words") if c in options and rng.random() < 0.75}
    others = [c for c in options if c not in ("name", "words")]
    chosen |= set(rng.sample(others, min(len(others), rng.choice([0, 0, 1, 1, 2]))))
    if not chosen:
        chosen = {rng.choice(options)}
    constraints: dict[str, Any] = {}
    text = pick("ask")
    if "name" in chosen:
        constraints["name"] = facts.name
        text += pick("about").format(name=facts.name)
    extra = []
    if "words" in chosen:
        constraints["words"] = rng.sample(facts.words, min(len(facts.words), rng.choice([1, 2, 3, 3, 3, 4])))
        clause = pick("words").format(words=word_list(constraints["words"], rng))
        if len(constraints["words"]) == 1:
            clause = clause.replace("the words", "the word").replace("these words", "this word")
        if clause[0].islower():  # joins the first sentence
            text += " " + clause.rstrip(".")
        else:
            extra.append(clause)
    text += "?" if text.startswith(("Can ", "Could ")) else "."
    if "starts" in chosen:
        constraints["starts"] = facts.sentences[0]
        extra.append(pick("starts").format(sentence=facts.sentences[0]))
    if "ends" in chosen:
        constraints["ends"] = facts.sentences[-1]
        extra.append(pick("ends").format(sentence=facts.sentences[-1]))
    if "dialogue" in chosen:
        constraints["dialogue"] = facts.dialogue
        extra.append(pick("dialogue" if facts.dialogue else "no_dialogue"))
    if "length" in chosen:
        constraints["length"] = "short" if facts.words_in_story <= SHORT_WORDS else "long"
        extra.append(pick(constraints["length"]))
    rng.shuffle(extra)
    return " ".join([text, *extra]), constraints
