"""Requests made from a story, and the checker that scores answers against them."""

import random

import pytest

from slm.assistant.constraints import check, distinct_4grams, is_story
from slm.data.requests import HELD_OUT, PHRASINGS, main_character, phrasings, story_facts, story_request, uses_word

STORY = ('Once upon a time, there was a little girl named Lily. She had a red ball. One day, Lily took the ball '
         'to the park. "Can I play?" asked a boy called Tom. "Yes!" said Lily. They played under a big tree '
         'until the sun went down. Lily was very happy. The end.')


def test_the_facts_of_a_story():
    facts = story_facts(STORY)
    assert facts.name == "Lily" and facts.dialogue and facts.whole
    assert {"ball", "park", "tree", "happy", "girl"} <= set(facts.words)
    assert not {"the", "was", "named", "lily"} & set(facts.words)
    assert facts.sentences[0] == "Once upon a time, there was a little girl named Lily."
    assert facts.sentences[-1] == "The end."
    assert main_character("The cat sat. Mom said hi.") is None


def test_a_story_satisfies_every_request_made_from_it():
    for seed in range(300):
        rng = random.Random(seed)
        request, constraints = story_request(story_facts(STORY), rng, rng.choice(["seen", "held_out"]))
        assert constraints and all(score == 1.0 for score in check(constraints, STORY).values()), request
        for word in constraints.get("words", []):
            assert word in request
        if "name" in constraints:
            assert "Lily" in request


def test_facts_of_the_visible_part_ask_only_what_that_part_holds():
    visible = STORY[:60]  # "Once upon a time, there was a little girl named Lily. She had"
    facts = story_facts(STORY, visible)
    assert not facts.whole and set(facts.words) <= set(visible.lower().split())
    for seed in range(100):
        _, constraints = story_request(facts, random.Random(seed))
        assert not {"ends", "length"} & set(constraints)
        assert all(uses_word(visible, w) for w in constraints.get("words", []))


def test_held_out_phrasings_are_disjoint_from_the_seen_ones():
    for part, options in PHRASINGS.items():
        seen, held = phrasings(part, "seen"), phrasings(part, "held_out")
        assert len(held) == HELD_OUT and len(seen) >= 3 and not set(seen) & set(held) and seen + held == options


def test_the_checker_ignores_case_and_punctuation_and_catches_misses():
    constraints = {"words": ["ball", "tree", "happy"], "name": "Lily", "starts": "Once upon a time, there was Lily.",
                   "ends": "The end.", "dialogue": True}
    good = 'ONCE upon a time there was lily! She had a Ball. "Hi," she said, happy by the tree... the END'
    assert check(constraints, good) == {"words": 1.0, "name": 1.0, "starts": 1.0, "ends": 1.0, "dialogue": 1.0}
    bad = "Tom had balls and trees. He went home."
    assert check(constraints, bad) == {"words": 0.0, "name": 0.0, "starts": 0.0, "ends": 0.0, "dialogue": 0.0}
    assert check({"words": ["ball", "cat"]}, "The cat.") == {"words": 0.5}
    assert check({"dialogue": False}, "No talk here.") == {"dialogue": 1.0}
    assert check({"length": "short"}, "word " * 50) == {"length": 1.0}
    assert check({"length": "long"}, "word " * 50) == {"length": 0.0}


def test_a_word_list_is_not_a_story_and_a_loop_is_caught():
    assert not is_story("ball\ntree\nhappy\nLily\npark\nsun\ndog\ncat")
    assert not is_story("ball, tree, happy, Lily, park, sun, dog, cat, " * 5)
    assert is_story(STORY)
    loop = "Lily went to the park. " + "She played with the ball. " * 20
    assert distinct_4grams(loop) < 0.3
    assert distinct_4grams(STORY) == pytest.approx(1.0)


def test_the_words_a_request_names_are_its_names_and_content_words_in_any_wording():
    from slm.assistant.constraints import request_words

    assert request_words("Write a story about Lily that uses the words ball, tree and happy.") == [
        "Lily", "ball", "tree", "happy"]
    assert request_words("hey can you make up a bedtime story for my kid? it should be about Max and mention "
                         "dinosaurs, rain") == ["Max", "dinosaurs", "rain"]
    assert request_words('Story time! Character: Sue. Keywords: "jump", "blue".') == ["Sue", "jump", "blue"]
    assert request_words("Tell me a story.") == []
    # a request that lists its words asks for those, its names and its topic, not for every word it says
    assert request_words("my daughter wants a story tonight. the main kid is Tim, and she asked for play, found "
                         "and sad to be in it") == ["Tim", "play", "found", "sad"]
    assert request_words("Can u do a kids story w/ Tom? must have cookies, and fight") == ["Tom", "cookies", "fight"]
    assert request_words("A story about a dog named Rex. Use the words ball and tree.") == ["dog", "Rex", "ball",
                                                                                            "tree"]
    # a sentence that starts with a verb is not about a character of that name; a name mid-sentence is
    assert request_words("Invent a story. Hero: Ben. Use cat, sun.") == ["Ben", "cat", "sun"]
    assert request_words("Dream up a tale where Sue finds a kite.") == ["Sue", "finds", "kite"]
    assert request_words("Max a dog? Write about Max.") == ["Max", "dog"]
    assert request_words("Tell us one about Max the dog.") == ["Max", "dog"]
    assert request_words("The hero is Ed. Use cat, sun. So go on.") == ["Ed", "cat", "sun"]
    assert request_words("word " * 41) == []  # a long message holds text to work on, not a request
    # lists after any cue, common words in them too; the words that frame a request are not asked for
    assert request_words("Tonight's tale is about Jo, and I'd love to hear lot, new and kite in it.") == [
        "Jo", "lot", "new", "kite"]
    assert request_words('My class reads about Ned today. Write one that includes "put", "love" and "map".') == [
        "Ned", "put", "love", "map"]
    assert request_words("a story about Kim for my little sister? needs small, set, lots") == [
        "Kim", "small", "set", "lots"]
    assert request_words("Write a tale for kids. Star: Pip. Use: cup, red, and hat.") == ["Pip", "cup", "red", "hat"]
    assert request_words("I'm after a story. Remember to put in fox, mud and rain, please.") == ["fox", "mud", "rain"]
    assert request_words("Could you make one with bee, sock, and jam in it, starring Al?") == [
        "Al", "bee", "sock", "jam"]
    assert request_words("Tell a story with Mo in it. Words: cake, sun, bed.") == ["Mo", "cake", "sun", "bed"]
    assert request_words("A tale, please. Somewhere in it, mention need.") == ["need"]
    assert request_words("Tell me a tale. Work in the word off.") == ["off"]


@pytest.mark.parametrize("message, asked", [
    ('Write a story about Lily. Open with "Lily had a red ball." Use the words tree and happy.',
     {"starts": "Lily had a red ball.", "words": ["Lily", "tree", "happy"]}),
    ("Tell me a tale. The final line should read: They all went home happy.",
     {"ends": "They all went home happy."}),
    ("Begin it exactly like this: \u201cTom ran to the park.\u201d Then make it end on: The sun went down.",
     {"starts": "Tom ran to the park.", "ends": "The sun went down."}),
    ("Write a story that starts with a dog.", {"words": ["dog"]}),  # no sentence given: a word, not an opening
    ("A story about Sue. Leave out any spoken lines.", {"words": ["Sue"], "dialogue": False}),
    ("A story about Sue where the characters talk a lot.", {"words": ["Sue"], "dialogue": True}),
    ("A story about Sam with a kite and a dog in it Use this as the opening sentence: Sam ran.",  # no "." before
     {"words": ["Sam", "kite", "dog"], "starts": "Sam ran."}),
    ('A story about Sam. Wrap it up with "They all slept well."', {"words": ["Sam"], "ends": "They all slept well."}),
    ("Story please: Ben, words lift, coat, and box Use this first sentence: Sara and Ben are friends.",
     {"words": ["Ben", "lift", "coat", "box"], "starts": "Sara and Ben are friends."}),  # ask with no "." before
    ('Story please: Tom, words happy, try, near Have it end with "He made a new friend."',
     {"words": ["Tom", "happy", "try", "near"], "ends": "He made a new friend."}),  # a colon earlier
    ("About Abby. Use this as the opening sentence: There were two friends: Bobby and Abby.",
     {"words": ["Abby"], "starts": "There were two friends: Bobby and Abby."}),  # a colon inside it
    ("The little one is named Ben; it has to say heart, inside and balls somewhere.",
     {"words": ["Ben", "heart", "inside", "balls"]}),  # "say" lists words, it does not ask for talk
    ("Can you do a story with Lucy, and put liked, treat, and mom in it?", {"words": ["Lucy", "liked", "treat", "mom"]}),
    ("Hero: Sam. It needs these three words: carefully, put and hesitated.",
     {"words": ["Sam", "carefully", "put", "hesitated"]}),  # a listed word that could cue a list
    ("Write a story about Sue. Keep it short.", {"words": ["Sue"], "length": "short"}),
    ("hey, a long story about a dragon please", {"words": ["dragon"], "length": "long"}),
])
def test_a_request_is_read_from_its_own_words_whatever_its_wording(message, asked):
    from slm.assistant.constraints import read_request

    assert read_request(message) == asked


def test_the_checker_catches_repeats_glued_and_miscased_words_and_a_stuffed_first_sentence():
    from slm.assistant.constraints import first_sentence_words, flaws, glued_words, miscased_words, repeats_a_sentence

    asked = {"name": "Lily", "words": ["together", "sun", "ball"]}
    assert glued_words(asked, "She heard aTogether Lily.") == 1
    assert glued_words(asked, "You are a greatSun!") == 1
    assert glued_words(asked, "They played together in the sun. The Sun was up.") == 0
    assert miscased_words(asked, "Then lily ran.") == 1  # a name in lower case
    assert miscased_words(asked, "Max was a happy Ball.") == 1  # a word capitalized mid-sentence
    assert miscased_words(asked, 'Lily ran. "Ball!" she said. Sun was up.') == 0  # a sentence may start with one
    assert repeats_a_sentence("She did not listen to her mom. Then she ran. She did not listen to her mom!")
    assert not repeats_a_sentence("Lily ran. Lily ran far. Yes. Yes.")  # short sentences come twice in stories
    assert first_sentence_words(asked, "Lily played together with the ball in the sun. Then she slept.") == 3
    assert first_sentence_words(asked, "Lily woke up. She played with a ball.") == 0
    assert flaws(asked, STORY) == {"repeats": 0.0, "glued": 0.0, "miscased": 0.0,
                                   "first_words": float(first_sentence_words(asked, STORY))}


@pytest.mark.parametrize("message, length", [
    *[(m, "short") for m in PHRASINGS["short"]], *[(m, "long") for m in PHRASINGS["long"]],
    ("Can you make the story brief?", "short"), ("It should be long, with a dragon.", "long"),
    ("Write a short story about Max and a ball.", "short"), ("A long, long tale for my son", "long"),
    ("Tell me a story about a girl with long hair.", None),  # what is in the story, not how long it is
    ("A story from long ago about Tom.", None), ("Write about a short walk in the park.", None),
    ('Start with "It was a long day." and use the word sun.', None),  # in the given sentence
])
def test_a_request_for_a_short_or_long_story_is_read_in_any_wording(message, length):
    from slm.assistant.constraints import length_asked

    assert length_asked(message) == length
