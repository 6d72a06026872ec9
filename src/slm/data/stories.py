"""The built-in demo corpus: seeded, template-made children's stories in the style of TinyStories.

`slm run demo` and `slm prepare demo` train on this offline, so that a small GPT on a 2-core CPU
visibly learns grammar and story shape within minutes. A story is a cast (hero, friend, grown-up),
a setting and one plot; a plot is paragraphs of slots, and each slot lists interchangeable sentences.
Only one random.Random(seed) makes choices, and only over lists and insertion-ordered dicts, so the
text never depends on PYTHONHASHSEED. This module makes text; prepare.py tokenizes and writes it. The
plots' sentences are in story_plots.txt, beside this file.
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


def _plot(text: str) -> list[list[list[str]]]:
    """Paragraphs (between '--' lines) of slots (between blank lines) of alternatives (a line each; '~' is none)."""
    return [[[("" if line == "~" else line) for line in slot.splitlines()] for slot in paragraph.strip().split("\n\n")]
            for paragraph in text.strip().split("\n--\n")]


# place | preposition | four sights (with article) | four hiding spots
PLACES = [(name, prep, sights.split("; "), spots.split("; ")) for name, prep, sights, spots in _table("""
park | in | a big slide; a little pond; a tall oak tree; a red swing | under a bush; behind a big tree; near the slide; in the tall grass
garden | in | a pretty flower; a little pond; a busy bee; a big pumpkin | under a big leaf; behind the flowers; near the fence; in a flower pot
forest | in | a tall pine tree; a little stream; a big mushroom; an old log | under an old log; behind a big rock; in a hollow tree; near the stream
beach | at | a big wave; a pretty shell; a red crab; a tall sand castle | under the sand; behind a big rock; near the water; in a little hole
farm | on | a big red barn; a muddy pond; a tall haystack; a happy cow | in the haystack; behind the barn; near the pond; under a cart
meadow | in | a yellow flower; a big oak tree; a small hill; an orange butterfly | in the tall grass; under the oak tree; behind a bush; near a big flower
playground | at | a tall slide; a big sandbox; a swing; a jungle gym | in the sandbox; under the slide; behind the swings; near a bench
backyard | in | a big apple tree; a little swing; a bird house; a green fence | under the porch; behind the shed; in a bush; near the fence
lake | by | a little boat; a family of ducks; an old dock; a jumping fish | near the dock; behind a big rock; in the reeds; under a bush
hill | on | a big rock; a lonely tree; a field of flowers; a little rabbit | behind a rock; under a tree; in the grass; near a bush
river | by | a wooden bridge; a big green frog; a tall willow tree; a little waterfall | under the bridge; behind a big rock; in the reeds; near the water
orchard | in | a tree full of red apples; a busy robin; a wooden ladder; a basket of pears | under a ladder; behind a tree; in a basket; near the gate
pumpkin patch | in | a giant orange pumpkin; a funny scarecrow; a big hay bale; a black crow | behind a pumpkin; under a big leaf; near the scarecrow; in the hay
zoo | at | a tall giraffe; a big elephant; a sleepy lion; a funny monkey | near the monkey house; under a bench; behind a tree; by the duck pond
""")]
# Free of pronouns, so hero and friend can share them: (base form, -ing form).
ACTIVITIES = _table("""
run and jump | running and jumping
draw pictures | drawing pictures
sing songs | singing songs
dance | dancing
look at the clouds | looking at the clouds
read books | reading books
play hide and seek | playing hide and seek
pick flowers | picking flowers
build forts with sticks | building forts with sticks
splash in puddles | splashing in puddles
play ball | playing ball
climb trees | climbing trees
watch the birds | watching the birds
blow bubbles | blowing bubbles
fly kites | flying kites
chase butterflies | chasing butterflies
play tag | playing tag
make mud pies | making mud pies
play with toy cars | playing with toy cars
play catch | playing catch
skip and hop | skipping and hopping
look for bugs | looking for bugs
""")
# Per-plot details; their fields may use the cast's keys, filled once when the cast is made.
PLOT_DETAILS = {"problem plea fix": _table("""
was stuck high up in a tree | I climbed up, but now I cannot get down! | {hero} found a long branch and held it up. Slowly, {friend} climbed down, one step at a time.
had a hurt leg and could not walk | I fell down, and my leg hurts! | {hero} let {friend} lean on {him}, and they walked home slowly together.
was lost and could not find {fhis} home | I cannot find my way home! | {hero} held {fhis} hand, and they looked and looked until they found {fhis} house.
could not reach the apples on a tall tree | I am so hungry, but the apples are too high! | {hero} climbed onto a big rock, picked two red apples and gave one to {friend}.
was cold and wet from the rain | I am so cold and wet! | {hero} gave {fhim} {his} warm scarf, and they sat together in the sun until {friend} was dry.
had a kite stuck in a bush | My kite is stuck, and I cannot get it out! | {hero} pulled the string very gently, and the kite came out of the bush without a tear.
had dropped {fhis} hat into the water | My hat fell into the water! | {hero} found a long stick and pulled the hat out of the water.
was crying because {fhis} tower of blocks fell down | My tower fell, and I cannot build it again! | {hero} helped {fhim} build it again, block by block, and this time it was even taller.
had lost {fhis} mom | I cannot find my mom! | {hero} helped {fhim} look everywhere. Soon they saw {fhis} mom, who was looking for {fhim} too.
was hungry and had no lunch | I forgot my lunch, and my tummy is so empty! | {hero} opened {his} bag and shared {his} sandwich with {friend}.
had a balloon stuck in a tree | My balloon flew away, and now it is stuck up there! | {hero} climbed up carefully, reached out and got the balloon back for {friend}.
could not get across the stream | The water is too fast, and I cannot get across! | {hero} found big flat stones and showed {friend} how to step from one to the next.
was stuck in a muddy puddle | My feet are stuck in the mud! | {hero} took {fhis} hands and pulled and pulled, until {friend} popped out with a big squish.
"""), "fear moment comfort brave": _table("""
the dark | That night, {mom} turned off the light and said good night. | {mom} came back and sat on the bed. "The dark is just the night," {mhe} said softly. "Your room is the same as it was in the day." | {hero} looked around. {he} saw {his} books and {his} {toy} in the moonlight. Nothing had changed! Soon {he} closed {his} eyes and fell asleep.
loud thunder | {day}, big gray clouds came, and the thunder went BOOM! | {mom} held {him} close. "Thunder is just the sound the clouds make," {mhe} said. "It cannot hurt you." | {hero} listened to the rain on the roof with {mom}. Soon the storm went away, and a rainbow came out.
the big slide | {day}, {hero} and {his} friend {friend} went to the playground. {friend} ran straight to the big slide. | "We can go down together," said {friend}. "I will hold your hand." | {hero} took a deep breath and climbed up. Whee! They went down fast, and it was so much fun!
deep water | {day}, {mom} took {him} to the lake to swim. | "I will stay right next to you," said {mom}. "Just kick your legs and splash." | {hero} stepped into the water slowly. {he} kicked and splashed, and soon {he} was laughing.
the big dog next door | {day}, the big dog next door came to the fence and barked, "Woof!" | "That dog is just saying hello," said {mom}. "His name is Bruno, and he is very friendly." | {hero} held out {his} hand. Bruno sniffed it and wagged his tail. {hero} laughed and patted his soft head.
buzzing bees | {day}, {hero} was picking flowers when a bee flew by. Buzz, buzz! | "Bees are busy helping the flowers," said {mom}. "If you stay calm, they will not bother you." | {hero} stood very still. The bee landed on a flower and then flew away. Bees were not so bad after all.
the first day of school | {day}, it was time for {hero} to go to school for the first time. | "You will make new friends and learn fun things," said {mom}, and {mhe} gave {him} a big hug. | At school, {a_friend} named {friend} said hello and asked {hero} to play. Soon {hero} was laughing and having fun.
"""), "risky why oops": _table("""
climb the tall tree | You might fall and get hurt. | {hero} climbed higher and higher. Then {his} foot slipped, and {he} fell down and hurt {his} knee.
eat all the cookies before dinner | You will get a tummy ache. | {hero} ate one cookie, then another, and another. Soon {his} tummy hurt a lot.
jump in the mud in your new shoes | They will get all dirty. | {hero} jumped right into the biggest puddle. Splash! {his} new shoes were brown and wet.
play ball in the house | Something might break. | {hero} threw the ball up high. Crash! It hit a vase, and the vase broke into many pieces.
go near the pond alone | The water is deep and cold. | {hero} leaned over to look at a fish. Splash! {he} fell into the cold water and climbed out, wet and shaking.
touch the hot stove | It will burn you. | {hero} touched the stove with one finger. "Ouch!" {he} cried. It hurt a lot.
go too far into the woods | You could get lost. | {hero} followed a pretty butterfly deeper and deeper into the woods. Soon {he} did not know the way home.
"""), "found reveal": _table("""
an old map | They followed the map past a big rock and over a little bridge. At the end, they found a box full of shiny buttons and toys.
a shiny key | They looked and looked until they found a little door in an old tree. The key fit! Inside were sweet berries and a note that said, "Please share."
a blue egg | They kept the egg warm in a soft blanket. The next day, it cracked, and a tiny baby bird came out. "Peep!" said the bird.
a little seed | They planted the seed in the ground and gave it water every day. Soon it grew into a big, tall sunflower.
a pretty shell | {hero} held the shell to {his} ear and heard the sound of the sea. They took turns listening and laughing.
a glass bottle with a note inside | They pulled out the note. It said, "Whoever finds this, be kind today." So they helped everyone they met that day.
a golden feather | They looked up and saw a big, bright bird in the tree. The feather was from its wing! The bird sang a sweet song just for them.
a little wooden box | They opened the box slowly. Inside was a tiny music box that played a sweet song, and they danced and danced.
a tiny lost kitten | They gave the kitten some warm milk and a soft bed. Soon it was purring, and it followed them everywhere.
an old coin | They washed the coin until it shone like the sun. They put it in a jar and called it their treasure.
"""), "creation made trouble redo": _table("""
a tall tower of blocks | tower | Just as {he} put the last block on top, the tower wobbled and fell down. | This time, {hero} put the big blocks at the bottom and the small blocks on top. The tower stood tall and strong.
a cake | cake | {he} mixed too fast, and flour flew all over the kitchen. | This time, {hero} mixed slowly and carefully. Soon the cake was warm and smelled sweet.
a pretty picture | picture | {he} spilled the paint, and the picture got all messy. | This time, {hero} painted slowly. {he} painted a yellow sun, a green tree and a little house.
a flower crown | crown | The flowers fell apart because their stems were too short. | This time, {hero} picked flowers with long stems and tied them together very carefully.
a paper boat | boat | When {he} put it in the water, it got soggy and began to sink. | This time, {hero} folded the paper twice, and the little boat floated on the water.
a birthday card | card | {he} wrote the letters too big, and they did not fit on the card. | This time, {hero} wrote small letters and drew a big red heart in the middle.
a necklace of beads | necklace | The string broke, and the beads rolled all over the floor. | This time, {hero} used a strong string and tied a big knot at the end.
""")}

OPENING = _plot("""
Once upon a time, there was {a_hero} named {hero}.
Once upon a time, in a small town, there lived {a_hero} named {hero}.
Long ago, in a land full of tall trees, there lived {a_hero} named {hero}.
In a sunny little village, there lived {a_hero} named {hero}.
Once upon a time, there was {a_hero}. {his} name was {hero}.
There once was {a_hero} named {hero}.
{hero} was {a_hero} who lived in a little house near the {place}.
Once upon a time, in a house with a red door, there lived {a_hero} named {hero}.
Not far from the {place}, there lived {a_hero} named {hero}.

{he} loved to {activity}.
{he} liked to {activity} every day.
Every day, {hero} liked to {activity}.
{hero} loved {doing} more than anything.
{hero} spent every afternoon {doing}.
{hero} was very {trait}, and {he} loved to {activity}.
{his} favorite thing was {doing}.

~
~
{he} had a big smile and a kind heart.
Everyone who knew {hero} liked {him} very much.
{he} lived with {mom}, who loved {him} very much.
{hero} was always {trait} and full of smiles.
""")
# The plots live in story_plots.txt: one after another, separated by '==' lines, each in _plot's format.
PLOTS = [_plot(text) for text in (files("slm.data") / "story_plots.txt").read_text(encoding="utf-8").split("\n==\n")]
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
