"""Story requests made from a story alone, and the checker that scores an answer against one.

A story's facts (its main character, its content words, its sentences, whether people talk in it, its
length) give requests the story itself satisfies: "Write a story about Lily that uses the words ball, tree
and happy." The same checker scores a model's answer against the request, so training data, evaluation
and the reward of any later search agree on what "following the request" means.

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
_NOT_NAMES = frozenset("I Mom Mommy Dad Daddy Mama Papa Grandma Grandpa Granny Mr Mrs Miss Sir Mister Aunt Uncle "
                       "Teacher God Santa Christmas Monday Sunday The Once One".split())
# A sentence ends at . ! or ? (and a closing quote) before a capital letter or an opening quote.
_SENTENCE_END = re.compile(r'[.!?]["\u201d]?(?=\s+["\u201cA-Z])')
# Lower-case words of 3+ letters, not part of a contraction: candidates for "uses the words".
_WORD = re.compile(r"(?<![\w'])[a-z]{3,}(?![\w'])")
_ANY_WORD = re.compile(r"[A-Za-z']+")
_QUOTE = re.compile(r'["\u201c\u201d]')
_STOPWORDS = frozenset("""about after again also always and another any are around away back because called been before
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
    if named and named.group(1) not in _NOT_NAMES:
        return named.group(1)
    counts: Counter[str] = Counter()
    for match in _CAPITALIZED.finditer(story):
        before = story[:match.start()].rstrip()
        if match.group() not in _NOT_NAMES and before and before[-1] not in '.!?"\u201c:':
            counts[match.group()] += 1
    name, count = counts.most_common(1)[0] if counts else (None, 0)
    return name if count >= 2 else None


def sentences(text: str) -> list[str]:
    cuts = [0] + [m.end() for m in _SENTENCE_END.finditer(text)] + [len(text)]
    return [text[a:b].strip() for a, b in zip(cuts, cuts[1:]) if text[a:b].strip()]


def content_words(text: str, name: str | None = None) -> list[str]:
    """Distinct lower-case words of the text that are not function words, in order of appearance."""
    skip = _STOPWORDS | {(name or "").lower()}
    return list(dict.fromkeys(w for w in _WORD.findall(text) if w not in skip))


def uses_word(text: str, word: str) -> bool:
    """Whether `word` occurs in text as a whole word, ignoring case."""
    return re.search(rf"\b{re.escape(word)}\b", text, re.IGNORECASE) is not None


def word_count(text: str) -> int:
    return len(_ANY_WORD.findall(text))


def has_dialogue(text: str) -> bool:
    return len(_QUOTE.findall(text)) >= 2


def _normalized(text: str) -> str:
    return " ".join(_ANY_WORD.findall(text.casefold()))


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
FOLLOW_UP_WORDS = "uses the words {words}."
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


# ---- what a request asks, read from its text --------------------------------------------------------

# Words of requests that are not what the story is to hold: every phrasing's own words, and more that people
# use to ask for a story. What is left of a short request is what it names: characters, things, feelings.
_REQUEST_VOCABULARY = frozenset(w.lower() for options in PHRASINGS.values() for p in options
                                for w in _ANY_WORD.findall(p)) | frozenset("""story stories tale tales write
tell make give words word include including includes use uses using used mention mentions please character
characters named called main hero heroine keywords keyword vocabulary required require need needs want like love
bedtime kid kids child children short shorter long longer sentence sentences first last end ending start
starting begin beginning dialogue talk talking speech lines line quote quotes about featuring starring someone
somewhere inside hey hello thanks thank could would should must might also really very nice little new text all
following list these those kind sort type character's lot lots""".split())
REQUEST_WORDS_LIMIT = 40  # a longer message carries text to work on (a story to continue), not a request
# A sentence of a request that asks for the first or the last sentence of the story names it by one of these,
# and gives it in quotes or after a colon: "Open with \"Tom ran.\"", "The final line should read: They slept."
_STARTS_ASKED = re.compile(r"\b(?:start|starts|begin|begins|open|opens|opening|first|kick)\w*", re.IGNORECASE)
_ENDS_ASKED = re.compile(r"\b(?:end|ends|ending|finish|finishes|close|closes|closing|last|final)\b", re.IGNORECASE)
_QUOTED = re.compile(r'["\u201c]([^"\u201c\u201d]{3,}?)["\u201d]')
_TALK = re.compile(r"\b(?:dialog\w*|talk\w*|speak\w*|speech|spoken|conversations?|quotes?|says?|said|saying)\b",
                   re.IGNORECASE)
_NOT = re.compile(r"\b(?:no|not|without|avoid|never|none|don't|do not|leave out|keep \w+ out|skip)\b", re.IGNORECASE)


def _given_sentence(part: str) -> str | None:
    """The sentence a part of a request gives in quotes, or after its first colon; None if it gives none."""
    quoted = _QUOTED.search(part)
    if quoted and len(quoted.group(1).split()) >= 2:
        return quoted.group(1).strip()
    head, colon, tail = part.partition(":")
    return tail.strip() if colon and len(tail.split()) >= 2 else None


def requested_sentences(message: str) -> tuple[dict[str, str], str]:
    """({"starts": ..., "ends": ...}, the message without the parts that asked for them): the first and last
    sentences a request gives, in whatever words it asks for them, so long as it quotes them or puts them
    after a colon."""
    found: dict[str, str] = {}
    rest = message
    # A request's parts end at a sentence end; a given sentence ends one part and the next asks anew.
    for part in re.split(r"(?<=[.!?\"\u201d])\s+(?=[A-Z\"\u201c])", message):
        asks = [key for key, asked in (("starts", _STARTS_ASKED), ("ends", _ENDS_ASKED))
                if asked.search(part.split(":")[0]) and key not in found]
        given = _given_sentence(part) if len(asks) == 1 else None
        if given:
            found[asks[0]] = given
            rest = rest.replace(part, " ")
    return found, rest


# Where a request lists its words: after the last of these in a sentence ("Words to use: a, b and c",
# "Use the words ball and tree", "mention slip, cold and tried", "Please include heard").
_LIST_CUE = re.compile(r"\b(?:words?|use|using|include|including|mention|keywords?|contains?|containing|"
                       r"vocabulary|these)\b|:", re.IGNORECASE)
_LIST_SPLIT = re.compile(r"\s*(?:,\s*(?:and\s+|&\s+)?|\s+(?:and|&)\s+)")


def listed_words(message: str) -> list[str]:
    """The words a request lists (see _LIST_CUE), whatever they are: a request for "new, all and kind" asks
    for those words even though they are common ones. A list is a run of single words apart from its last
    item, of which the first word counts ("the words ball, tree in it" lists ball and tree)."""
    words: list[str] = []
    for part in re.split(r"(?<=[.!?;])\s+", message):
        cues = list(_LIST_CUE.finditer(part))
        if not cues:
            continue
        items = [_ANY_WORD.findall(item) for item in _LIST_SPLIT.split(part[cues[-1].end():].strip(" .!?;"))]
        items = [item for item in items if item]
        if items and all(len(item) == 1 for item in items[:-1]) and (len(items) > 1 or len(items[0]) == 1):
            words += [item[0].strip("'") for item in items if item[0].lower() not in ("the", "a", "an")]
    return [w for w in words if not _TALK.fullmatch(w) and len(w) >= 2]


def request_words(message: str) -> list[str]:
    """The words a short request names that an answer should use: its names and content words, in order,
    without function words, the words people ask with, the first or last sentence it gives and what it says
    of talk. [] for a message of over REQUEST_WORDS_LIMIT words."""
    rest = requested_sentences(message)[1]
    words = [w for w in _ANY_WORD.findall(rest) if not (_TALK.fullmatch(w) or _NOT.fullmatch(w))]
    if len(words) > REQUEST_WORDS_LIMIT:
        return []
    skip = _STOPWORDS | _REQUEST_VOCABULARY | {x.lower() for x in _NOT_NAMES}
    named = [w.strip("'") for w in words if len(w.strip("'")) >= 3 and w.strip("'").lower() not in skip]
    found = [w if w[0].isupper() and w.lower() not in _STOPWORDS | _REQUEST_VOCABULARY else w.lower()
             for w in named + listed_words(rest)]
    return list(dict.fromkeys(found))


def dialogue_asked(message: str) -> bool | None:
    """True where a request asks for talk ("Let the characters speak."), False where it asks for none ("Leave
    out any spoken lines."), None where it says nothing of it."""
    for part in re.split(r"(?<=[.!?;])\s+", requested_sentences(message)[1]):
        if _TALK.search(part):
            return _NOT.search(part) is None
    return None


def read_request(message: str) -> dict[str, Any]:
    """The constraints a request's text asks for, as check() takes them: "words" (names among them:
    capitalized), "starts" / "ends" where it gives those sentences, "dialogue" where it asks for talk or
    none. The assistant answers and picks its best candidate by these alone; the structured constraints
    of a prompts file are for scoring."""
    sentences_asked, _ = requested_sentences(message)
    words, dialogue = request_words(message), dialogue_asked(message)
    return {**({"words": words} if words else {}), **sentences_asked,
            **({} if dialogue is None else {"dialogue": dialogue})}


@dataclass(frozen=True)
class WordForms:
    """The first ids of a requested word's written forms, by where in the text each fits: mid-sentence after a
    space (" ball"; a name: " Lily"), a sentence's first word (" Ball"), and with no space before it, as after
    a newline or an opening quote ("Ball"). A word never gets a form without a space after a letter: that
    form glues onto the word before ("aTogether"). `rest`: after a form's first id, the ids that finish it
    (" R" -> "oxy"), so that a name of several ids is written whole once begun."""

    word: str
    name: bool
    mid: frozenset[int]
    start: frozenset[int]
    bare: frozenset[int]
    rest: dict[int, tuple[int, ...]]


Words = list[WordForms]  # the requested words of one row


def word_forms(tokenizer: Any, words: list[str]) -> Words:
    """Each word's WordForms. A common word keeps only first ids that hold 3 or more of its letters (all of a
    shorter word): a first id such as " st" would push every word that starts so. A name keeps any first id,
    as its rest follows it."""
    result = []
    for word in words:
        name, capital = word[0].isupper(), word[0].upper() + word[1:]
        rest: dict[int, tuple[int, ...]] = {}

        def first_ids(text: str) -> frozenset[int]:
            ids = tokenizer.encode(text)
            if not name and len(tokenizer.decode(ids[:1]).strip()) < min(3, len(text.strip())):
                return frozenset()
            rest[ids[0]] = tuple(ids[1:])
            return frozenset(ids[:1])

        forms = WordForms(word, name, first_ids(" " + (capital if name else word)), first_ids(" " + capital),
                          first_ids(capital), rest)
        if forms.mid or forms.start or forms.bare:
            result.append(forms)
    return result


# ---- scoring an answer ------------------------------------------------------------------------------

def distinct_4grams(text: str) -> float:
    """The share of an answer's word 4-grams that are distinct: 1.0 for no repetition, low for a loop."""
    words = _normalized(text).split()
    grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
    return len(set(grams)) / len(grams) if grams else 1.0


def is_story(text: str) -> bool:
    """Prose, not a word list or a fragment: at least 30 words in at least 3 sentences, most lines long."""
    lines = [line for line in text.splitlines() if line.strip()]
    return (word_count(text) >= 30 and len(sentences(text)) >= 3
            and sum(word_count(line) >= 5 for line in lines) >= len(lines) / 2)


def repeats_a_sentence(text: str) -> bool:
    """Whether a sentence of 3 or more words comes twice (case and punctuation ignored): the mark of a loop."""
    seen = [_normalized(s) for s in sentences(text) if word_count(s) >= 3]
    return len(set(seen)) < len(seen)


def _requested(constraints: dict[str, Any]) -> list[str]:
    """The requested words and the name, each once; a capitalized word is a name."""
    words = list(constraints.get("words", [])) + ([constraints["name"]] if constraints.get("name") else [])
    return list(dict.fromkeys(words))


def glued_words(constraints: dict[str, Any], answer: str) -> int:
    """Requested words written onto the word before or after with no space: "aTogether", "greatSun", "ballThe"."""
    glued = 0
    for word in _requested(constraints):
        capital = re.escape(word[0].upper() + word[1:])
        glued += re.search(rf"[a-z]{capital}|(?i:{re.escape(word)})(?=[A-Z])", answer) is not None
    return glued


def miscased_words(constraints: dict[str, Any], answer: str) -> int:
    """Requested words in the wrong case: a name in lower case ("lily"), a word capitalized mid-sentence
    ("a happy Celery")."""
    miscased = 0
    for word in _requested(constraints):
        if word[0].isupper():
            miscased += re.search(rf"\b{re.escape(word.lower())}\b", answer) is not None
            continue
        for match in re.finditer(rf"\b{re.escape(word.capitalize())}\b", answer):
            before = answer[:match.start()].rstrip()
            if before and before[-1] not in '.!?"\u201c\u201d:\n':
                miscased += 1
                break
    return miscased


def first_sentence_words(constraints: dict[str, Any], answer: str) -> int:
    """How many of the requested words (not the name) the answer's first sentence holds: a first sentence
    stuffed with every word reads as forced."""
    first = sentences(answer)[:1]
    return sum(uses_word(first[0], w) for w in constraints.get("words", [])) if first else 0


def flaws(constraints: dict[str, Any], answer: str) -> dict[str, float]:
    """What reads as forced or broken in an answer: a repeated sentence, glued or mis-cased requested words,
    and how many requested words its first sentence holds."""
    return {"repeats": float(repeats_a_sentence(answer)), "glued": float(glued_words(constraints, answer) > 0),
            "miscased": float(miscased_words(constraints, answer) > 0),
            "first_words": float(first_sentence_words(constraints, answer))}


def check(constraints: dict[str, Any], answer: str) -> dict[str, float]:
    """Each constraint's score in [0, 1] for this answer: the share of requested words used, whether the
    character is named, the answer starts or ends with the given sentence, has dialogue as asked, is as
    short or long as asked. Case, spacing and punctuation are ignored where text is compared."""
    scores: dict[str, float] = {}
    if "words" in constraints:
        scores["words"] = sum(uses_word(answer, w) for w in constraints["words"]) / len(constraints["words"])
    if "name" in constraints:
        scores["name"] = float(uses_word(answer, constraints["name"]))
    if "starts" in constraints:
        scores["starts"] = float(_normalized(answer).startswith(_normalized(constraints["starts"])))
    if "ends" in constraints:
        scores["ends"] = float(_normalized(answer).endswith(_normalized(constraints["ends"])))
    if "dialogue" in constraints:
        scores["dialogue"] = float(has_dialogue(answer) == constraints["dialogue"])
    if "length" in constraints:
        n = word_count(answer)
        scores["length"] = float(n <= SHORT_WORDS if constraints["length"] == "short" else n >= LONG_WORDS)
    return scores
