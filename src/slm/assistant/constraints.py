"""What a request asks, read from its own words (`read_request`), and the checker that scores an answer against
it (`check`; `flaws`: what reads as forced or broken). slm.data.requests makes requests in the same words."""

from __future__ import annotations

import re
from typing import Any

from slm.data.requests import (ANY_WORD, LONG_WORDS, NOT_NAMES, PHRASINGS, SHORT_WORDS, STOPWORDS, has_dialogue,
                               normalized, sentences, uses_word, word_count)

# ---- what a request asks, read from its text --------------------------------------------------------

# Words of requests that are not what the story is to hold: every phrasing's own words, and more that people
# use to ask for a story. What is left of a short request is what it names: characters, things, feelings.
_REQUEST_VOCABULARY = frozenset(w.lower() for options in PHRASINGS.values() for p in options
                                for w in ANY_WORD.findall(p)) | frozenset("""story stories tale tales write
tell make give words word include including includes use uses using used mention mentions please character
characters named called main hero heroine keywords keyword vocabulary required require need needs want like love
bedtime kid kids child children short shorter long longer sentence sentences first last end ending start
starting begin beginning dialogue talk talking speech lines line quote quotes about featuring starring someone
somewhere inside hey hello thanks thank could would should must might also really very nice little new text all
following list these those kind sort type character's lot lots today tonight tomorrow yesterday i'm i'd i've i'll""".split())
REQUEST_WORDS_LIMIT = 40  # a longer message carries text to work on (a story to continue), not a request
# A sentence of a request that asks for the first or the last sentence of the story names it by one of these,
# and gives it in quotes or after a colon: "Open with \"Tom ran.\"", "The final line should read: They slept."
_STARTS_ASKED = re.compile(r"\b(?:start|starts|begin|begins|open|opens|opening|first|kick)\w*", re.IGNORECASE)
_ENDS_ASKED = re.compile(r"\b(?:end|ends|ending|finish|finishes|close|closes|closing|last|final|wrap|wraps)\b",
                         re.IGNORECASE)
_QUOTED = re.compile(r'["\u201c]([^"\u201c\u201d]{3,}?)["\u201d]')
_TALK = re.compile(r"\b(?:dialog\w*|talk\w*|speak\w*|speech|spoken|conversations?|quotes?|says|said|saying)\b",
                   re.IGNORECASE)
# A length asked of the story: the word describes the story ("a short one", "Make it long.", "short and sweet"),
# not something in it ("long hair", "a long time ago", "a short walk").
_LENGTH_ASKED = re.compile(r"\b(?P<short>not too long|short|shorter|brief|quick|tiny)\b|\b(?P<long>long|longer|lengthy|"
                           r"length)\b", re.IGNORECASE)
_DESCRIBES_STORY = re.compile(r"\s*(?:[.,!?;)]|$|and\b|but\b|please\b|(?:story|stories|tale|one|version|piece|read|"
                              r"bedtime|text|answer)\b)", re.IGNORECASE)
_NOT = re.compile(r"\b(?:no|not|without|avoid|never|none|don't|do not|leave out|keep \w+ out|skip)\b", re.IGNORECASE)


def _given_sentences(part: str) -> list[tuple[str, int]]:
    """The sentences a part of a request may give, each with where it starts: the one in quotes, else what
    follows each colon ("Use this first sentence: There were two friends: Bob and Sue." tries both)."""
    quoted = _QUOTED.search(part)
    if quoted and len(quoted.group(1).split()) >= 2:
        return [(quoted.group(1).strip(), quoted.start())]
    colons = [i for i, ch in enumerate(part) if ch == ":"]
    return [(part[i + 1:].strip(), i) for i in colons if len(part[i + 1:].split()) >= 2]


# How an ask for a sentence begins when no sentence end comes before it: "... box Use this first sentence:",
# "... near Have it end with": a capitalized word at most three words before the cue.
_ASK_OPENS = re.compile(r"\b[A-Z][a-z]*(?:\s+[a-z]+){0,3}\s*$")


def requested_sentences(message: str) -> tuple[dict[str, str], str]:
    """({"starts": ..., "ends": ...}, the message without the parts that asked for them): the first and last
    sentences a request gives, in whatever words it asks for them, so long as it quotes them or puts them
    after a colon, with the ask in the few words before them."""
    found: dict[str, str] = {}
    rest = message
    # A request's parts end at a sentence end; a given sentence ends one part and the next asks anew.
    for part in re.split(r"(?<=[.!?\"\u201d])\s+(?=[A-Z\"\u201c])", message):
        for sentence, at in _given_sentences(part):
            lead_start = max(0, at - 50)
            cues = [(key, cue) for key, asked in (("starts", _STARTS_ASKED), ("ends", _ENDS_ASKED))
                    if (cue := asked.search(part[lead_start:at])) and key not in found]
            if len(cues) == 1:
                found[cues[0][0]] = sentence
                cut = lead_start + cues[0][1].start()
                opens = _ASK_OPENS.search(part[:cut])
                # From the ask on: what comes before it stays, the words a request lists among them.
                rest = rest.replace(part[opens.start() if opens else cut:], " ")
                break
    return found, rest


# Where a request lists its words: after the last of these in a sentence ("Words to use: a, b and c",
# "Use the words ball and tree", "mention slip, cold and tried", "a story that includes heard", "asked for a,
# b and c to be in it", "must have a, b", "needs x, y", "I want to hear x, y and z", "fit in x, y", "with x,
# y and z in it"). Only a run of single words makes a list, so a cue as common as "in" or "with" is safe.
_LIST_CUE = re.compile(r"\b(?:words?|use[sd]?|using|includ\w*|mention\w*|keywords?|contain\w*|vocabulary|these|for|"
                       r"ha(?:ve|s)|say|put|get|needs?|hear|with|in)\b|:", re.IGNORECASE)
# A story's topic, up to whom it is for ("about Tom for my little brother" is about Tom)
_ABOUT = re.compile(r"\b(?:about|featuring|starring)\b((?:(?!\bfor\b)[^.,;:!?])*)", re.IGNORECASE)
_LABEL = re.compile(r"([A-Za-z']+)\s*:")  # "Star: Mia", "Hero: Max": the word before a colon names a field
# A verb that starts a sentence ("Invent a story.", "Give me one", "Dream up a tale") has a capital, as a name
# would; the object after it shows it is a verb ("Remember to use"). "Max the dog" is a name, so "the" is not
# among them.
_IMPERATIVE = re.compile(r"(?:^|[.!?;]\s+)([A-Z][a-z']+)\s+(?:a|an|me|us|my|our|some|up|him|her|them|it|this|to)\b")
_PRONOUNS = frozenset("it them there this that here".split())  # "Somewhere in it, mention x": "in" has its object
_LIST_SPLIT = re.compile(r"\s*(?:,\s*(?:and\s+|&\s+)?|\s+(?:and|&)\s+)")


def listed_words(message: str) -> list[str]:
    """The words a request lists (see _LIST_CUE), whatever they are: a request for "new, all and kind" asks
    for those words even though they are common ones. A list is a run of single words; an item of more words
    after two or more, or the last one, ends it and its first word counts ("the words ball, tree, sun in it,
    starring Tom" lists ball, tree and sun). One word alone is a list unless it says whom the story is for ("a
    tale for kids"); a cue's object is none ("with Sue in it", "in it, mention x"). The first cue of a sentence
    that a list follows counts: a cue may be a listed word ("words: carefully, put and hesitated")."""
    found: list[str] = []
    for part in re.split(r"(?<=[.!?;])\s+", message):
        for cue in _LIST_CUE.finditer(part):
            listed = re.sub(r"[\s,]+(?:please|thanks)$", "", part[cue.end():].strip(" .!?;"), flags=re.IGNORECASE)
            items = [item for item in map(ANY_WORD.findall, _LIST_SPLIT.split(listed)) if item]
            run = next((i for i, item in enumerate(items) if len(item) > 1), len(items))
            words = [item[0].strip("'") for item in items[:run + 1] if item[0].lower() not in ("the", "a", "an")]
            ends_list = run >= 2 or run >= len(items) - 1  # "with Lucy, and put a, b" is no list of Lucy, put
            audience = cue.group().lower() == "for" and bool(words) and words[0].lower() in _REQUEST_VOCABULARY
            lone = len(words) == 1 == len(items) and len(words[0]) >= 3 and not audience
            if run > 0 and ends_list and (len(words) > 1 or lone) and words[0].lower() not in _PRONOUNS:
                found += words
                break
    return [w for w in found if not _TALK.fullmatch(w) and len(w) >= 2]


def _mid_sentence_capitals(text: str) -> list[str]:
    """The capitalized words that do not start a sentence: names, whatever else they might be."""
    return re.findall(r"(?<![.!?;]\s)(?<!^)(?<=\s)[A-Z][a-z']+", text)


def request_words(message: str) -> list[str]:
    """The words a short request names that an answer should use: its names and content words, in order,
    without function words, the words people ask with, the first or last sentence it gives and what it says
    of talk. [] for a message of over REQUEST_WORDS_LIMIT words."""
    rest = requested_sentences(message)[1]
    words = [w for w in ANY_WORD.findall(rest) if not (_TALK.fullmatch(w) or _NOT.fullmatch(w))]
    if len(words) > REQUEST_WORDS_LIMIT:
        return []
    skip = STOPWORDS | _REQUEST_VOCABULARY | {x.lower() for x in NOT_NAMES} | {w.lower() for w in _LABEL.findall(rest)}
    capitals = set(_mid_sentence_capitals(rest))  # names, two letters long ones too ("The hero is Ed.")
    skip |= {verb.lower() for verb in _IMPERATIVE.findall(rest)} - {w.lower() for w in capitals}
    named = [w.strip("'") for w in words if (len(w.strip("'")) >= 3 or w in capitals)
             and w.strip("'").lower().removesuffix("'s") not in skip]  # "Tonight's" as "tonight"
    listed = listed_words(rest)
    if len(listed) >= 2:  # a request that lists its words asks for those, its names and what it is about,
        topic = {w.lower() for clause in _ABOUT.findall(rest) for w in ANY_WORD.findall(clause)}
        named = [w for w in named if w[0].isupper() or w.lower() in topic]  # not "my daughter ... tonight"
    found = [w if w[0].isupper() and w.lower() not in STOPWORDS | _REQUEST_VOCABULARY else w.lower()
             for w in named + listed]
    return list(dict.fromkeys(found))


def dialogue_asked(message: str) -> bool | None:
    """True where a request asks for talk ("Let the characters speak."), False where it asks for none ("Leave
    out any spoken lines."), None where it says nothing of it."""
    for part in re.split(r"(?<=[.!?;])\s+", requested_sentences(message)[1]):
        if _TALK.search(part):
            return _NOT.search(part) is None
    return None


def length_asked(message: str) -> str | None:
    """"short" or "long" where a request asks for a story of that length, in words such as those of
    _LENGTH_ASKED; None where it says nothing of length."""
    rest = requested_sentences(message)[1]
    for asked in _LENGTH_ASKED.finditer(rest):
        if _DESCRIBES_STORY.match(rest, asked.end()) or asked.group("short") == "not too long":
            return "short" if asked.group("short") else "long"
    return None


def read_request(message: str) -> dict[str, Any]:
    """The constraints a request's text asks for, as check() takes them: "words" (names among them:
    capitalized), "starts" / "ends" where it gives those sentences, "dialogue" where it asks for talk or
    none, "length" where it asks for a short or a long story. The assistant answers and picks its best
    candidate by these alone; the structured constraints of a prompts file are for scoring."""
    sentences_asked, _ = requested_sentences(message)
    words, dialogue, length = request_words(message), dialogue_asked(message), length_asked(message)
    return {**({"words": words} if words else {}), **sentences_asked,
            **({} if dialogue is None else {"dialogue": dialogue}), **({"length": length} if length else {})}


# ---- scoring an answer ------------------------------------------------------------------------------

def distinct_4grams(text: str) -> float:
    """The share of an answer's word 4-grams that are distinct: 1.0 for no repetition, low for a loop."""
    words = normalized(text).split()
    grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
    return len(set(grams)) / len(grams) if grams else 1.0


def is_story(text: str) -> bool:
    """Prose, not a word list or a fragment: at least 30 words in at least 3 sentences, most lines long."""
    lines = [line for line in text.splitlines() if line.strip()]
    return (word_count(text) >= 30 and len(sentences(text)) >= 3
            and sum(word_count(line) >= 5 for line in lines) >= len(lines) / 2)


def repeats_a_sentence(text: str) -> bool:
    """Whether a sentence of 3 or more words comes twice (case and punctuation ignored): the mark of a loop."""
    seen = [normalized(s) for s in sentences(text) if word_count(s) >= 3]
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
        scores["starts"] = float(normalized(answer).startswith(normalized(constraints["starts"])))
    if "ends" in constraints:
        scores["ends"] = float(normalized(answer).endswith(normalized(constraints["ends"])))
    if "dialogue" in constraints:
        scores["dialogue"] = float(has_dialogue(answer) == constraints["dialogue"])
    if "length" in constraints:
        n = word_count(answer)
        scores["length"] = float(n <= SHORT_WORDS if constraints["length"] == "short" else n >= LONG_WORDS)
    return scores
