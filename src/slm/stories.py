"""The built-in demo corpus: seeded, template-made children's stories in the style of TinyStories.

`slm run demo` and `slm prepare demo` train on this offline, so that a small GPT on a 2-core CPU
visibly learns grammar and story shape within minutes. A story is a cast (hero, friend, grown-up),
a setting and one plot; a plot is paragraphs of slots, and each slot lists interchangeable sentences.
Only one random.Random(seed) makes choices, and only over lists and insertion-ordered dicts, so the
text never depends on PYTHONHASHSEED. This module makes text; prepare.py tokenizes and writes it.
"""

from __future__ import annotations

import random
import re
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
PLOTS = [_plot(text) for text in ("""
{hero} had {a_toy}. {he} loved it more than anything.
{his} favorite toy was {a_toy}. {he} took it everywhere.
{hero} had {a_toy} that {mom} gave {him} for {his} birthday.

{day}, {he} took the {toy} to the {place}.
{day}, {hero} went to the {place} with {his} {toy}.

{he} saw {sight} and {ran} to look at it.
{he} played and played until the sun went down.
{he} played there all afternoon.

When it was time to go home, the {toy} was gone!
But when {he} wanted to go home, {he} could not find {his} {toy}.
--
{hero} felt very {sad}, and {he} began to cry.
{hero} was {sad}. "Where is my {toy}?" {he} cried.
"Oh no! My {toy}!" said {hero}. {he} felt like crying.

Just then, {his} friend {friend} came by. "Why are you crying?" asked {friend}.
Then {a_friend} named {friend} walked by and saw {hero}. "What is wrong?" {fhe} asked.

"I lost my {toy}," said {hero}. "I will help you find it," said {friend}.
{hero} told {friend} about the {toy}. "Don't worry. We can look for it together," said {friend}.

They looked everywhere. They looked high and low.
They searched near {sight} and all around {sight2}, but the {toy} was not there.
They looked behind trees and under rocks, but the {toy} was not there.
--
At last, {friend} saw something {spot}. It was the {toy}!
Finally, they found the {toy} {spot}.

{hero} hugged {his} {toy} and said, "Thank you, {friend}! You are a good friend."
{hero} was so {happy}. "Thank you for helping me," {he} said to {friend}.

From that day on, {hero} always took good care of {his} {toy}.
{hero} learned that friends are there to help when things go wrong.
After that, {hero} and {friend} played together every day.
""", """
{day}, {hero} got {a_toy} as a present. {he} was so {happy}!
{hero} had {a_toy}. {he} loved it very much.
{day}, {hero} was playing with {his} {adj_toy} {at_place}.

Then {his} friend {friend} came to play.
{a_friend} named {friend} saw the {toy}.

"Can I play with your {toy}?" asked {friend}.
"Wow, what a nice {toy}! Can I have a turn?" asked {friend}.
"Please, can I play too?" {friend} asked.
--
But {hero} did not want to share. "No! It is my {toy}!" {he} said.
{hero} held the {toy} close. "No, it is mine," {he} said.

{friend} felt {sad} and walked away.
{friend} looked down and went to sit all alone.

{hero} played with the {toy} by {himself}, but it was not fun anymore.
Soon {hero} felt bad inside. Playing alone was not much fun at all.
{hero} tried to play alone, but {he} kept looking at {friend}, who looked so lonely.
--
{hero} walked over to {friend}. "I am sorry," {he} said. "Do you want to play with my {toy}?"
{hero} thought about how {friend} felt. {he} went to {fhim} and said, "Let's play together."

{friend} smiled a big smile. "Yes, please!" {fhe} said.
"Thank you, {hero}!" said {friend}.

They took turns with the {toy} and played all day.
Together they had much more fun than before.

{hero} learned that sharing makes everyone {happy}.
From that day on, {hero} always shared {his} toys.
{hero} learned that playing together is better than playing alone.
""", """
{day}, {hero} went for a walk {at_place}.
{day}, {hero} went to the {place} to {activity}.
{day}, {hero} was {doing} {at_place}.

Suddenly, {he} heard someone crying. It was {a_friend} named {friend}.
Then {he} saw {a_friend} named {friend}.
Not far away, {he} saw {a_friend} named {friend}.

{friend} {problem}.
Poor {friend} {problem}.
--
"What is wrong?" asked {hero}.
{hero} {ran} over to {friend}. "Are you okay?" {he} asked.
"Hello, {friend}. Why are you so {sad}?" asked {hero}.

"{plea}" said {friend}.
"{plea}" {fhe} cried.

{hero} wanted to help. {he} thought and thought, and then {he} had an idea.
"Don't worry," said {hero}. "I will help you."
{hero} was small, but {he} was brave. "I can help!" {he} said.
--
{fix}

"Thank you, {hero}!" said {friend}. "You are a true friend."
{friend} was so {happy}. {fhe} gave {hero} a {big} hug.
"You helped me so much," {friend} said. "Thank you!"

{hero} felt warm inside. Helping others made {him} {happy} too.
{hero} learned that being kind is the best thing you can be.
{hero} learned that a little kindness goes a long way.
From that day on, {hero} and {friend} were best friends.
After that day, {hero} and {friend} played together all the time.
""", """
But there was one thing {hero} did not like: {fear}.
{hero} was very {scared} of {fear}.
{hero} was brave about many things, but {he} was {scared} of {fear}.

{moment}

{hero} felt very {scared}. {his} heart went thump, thump, thump.
{hero} wanted to run and hide.
"I don't like this," {hero} said in a small voice.
--
{comfort}

{hero} was not sure, but {he} wanted to try.
{hero} nodded slowly.
{hero} thought about it. Maybe {he} could be brave.
--
{brave}

{hero} was not {scared} of {fear} anymore.
{hero} felt so proud. {he} had been brave!
{hero} learned that being brave means trying even when you are a little {scared}.
""", """
{day}, {mom} said, "{hero}, please do not {risky}. {why}"
{mom} told {hero}, "Do not {risky}. {why}"
{day}, before {mhe} went to the kitchen, {mom} said, "Remember, do not {risky}. {why}"

But {hero} did not listen.
{hero} nodded, but {he} did not really listen.
{hero} looked around. Nobody was watching, so {he} decided to do it anyway.
{hero} thought, "Just this once will be fine."
--
{oops}

{hero} began to cry.
{hero} felt {sad} and a little silly.
"Oh no," said {hero}. "I should have listened."
--
{mom} came running and gave {him} a {big} hug.
{mom} came and helped {him}. "I am glad you are okay," {mhe} said.

"I am sorry, {Mom}," said {hero}. "I should have listened to you."
{hero} said, "I am sorry, {Mom}. Next time I will listen."

From that day on, {hero} always listened to {mom}.
{hero} learned that rules are there to keep us safe.
{mom} smiled. "Everyone makes mistakes. What matters is that you learn from them."
""", """
{day}, {hero} went for a walk {at_place}.
{day}, {hero} was {doing} {at_place}.

Suddenly, {he} saw something {spot}. It was {found}!
{he} looked down and found {found} {spot}.

"What is this?" {he} wondered.
{hero} picked it up carefully. "Wow!" {he} said.
{hero} brushed off the dirt and held it up to the light.
--
{he} {ran} to show it to {his} friend {friend}. "Look what I found!" said {hero}.
{hero} showed it to {his} friend {friend}. {friend}'s eyes went wide.
Then {a_friend} named {friend} came by. "What did you find?" asked {friend}.

"Let's find out what it is," said {friend}.
"I think it is something special," said {friend}.
--
{reveal}

{hero} and {friend} smiled at each other. It was the best adventure ever.
{hero} learned that the world is full of surprises, if you look closely.
From that day on, {hero} and {friend} went exploring every week.
""", """
{day}, {hero} wanted to make {creation} for {mom}.
{mom}'s birthday was coming soon, so {hero} wanted to make {mhim} {creation}.
{day}, {hero} had an idea. "I will make {creation}!" {he} said.

{he} got everything {he} needed and started to work.
{he} worked very hard all morning.
{he} hummed a cheerful song while {he} worked.
~
--
{trouble}

{hero} felt {sad}. "I can't do it," {he} said.
{hero} wanted to give up.
{hero} sat down and frowned.

Then {his} friend {friend} came over. "Let's try again together," {fhe} said.
Then {he} remembered what {mom} always said: "If at first you don't succeed, try, try again."
{hero} took a deep breath. "I will try one more time," {he} said.
--
{redo}

{hero} gave the {made} to {mom}. {mhe} loved it!
When {mom} saw the {made}, {mhe} smiled a big smile. "It is wonderful!" {mhe} said.

{hero} felt proud. {he} learned that if you keep trying, you can do it.
{hero} learned that mistakes are okay, as long as you try again.
~
""", """
{day}, {hero} and {his} family moved to a new house near the {place}.
{day}, {hero} went to the {place}, but {he} did not know anyone there.

{he} felt a little lonely.
{he} wished {he} had a friend to play with.
{he} kicked a little stone and sighed.
{hero} sat alone and watched the others play.
--
Then {he} saw {a_friend} named {friend}. {friend} was {doing} all alone.
Not far away, {a_friend} named {friend} was {doing}.

{hero} was shy, but {he} walked over and said, "Hi! My name is {hero}. Can I play with you?"
{hero} took a deep breath. "Hello," {he} said. "Do you want to be friends?"

{friend} smiled. "Yes! My name is {friend}."
"Sure!" said {friend}. "I was hoping someone would come and play with me."
--
They played together until the sun went down.
They laughed and ran and played all afternoon.

They shared a snack and told each other funny stories.
~

{hero} was not lonely anymore.
From that day on, {hero} and {friend} were best friends.
{hero} learned that a friendly hello is the first step to a new friend.
""", """
{day}, {mom} said, "Let's go to the {place} today!"
{day}, {hero} and {mom} went to the {place}.

{hero} was so {happy} that {he} jumped up and down.
{hero} could not wait.
~

{at_place}, {he} saw {sight}. {he} also saw {sight2}.
When they got there, {hero} saw {sight} and {sight2}.
--
Then they had a picnic under a big tree. They ate {food}.
Then it started to rain! {hero} and {mom} ran under a tree and laughed.
Then they found a quiet spot and watched the clouds drift slowly across the sky.
Then a little butterfly landed on {hero}'s nose. It tickled, and {hero} giggled.

Later, {hero} spent the afternoon {doing}.
{hero} and {mom} spent the rest of the day {doing}.
--
When the sun went down, it was time to go home.
On the way home, {hero} held {mom}'s hand.

"Thank you, {Mom}," said {hero}. "This was the best day ever!"
{hero} hugged {mom}. "Can we come back tomorrow?" {he} asked.

That night, {hero} dreamed about the {place}.
~
""")]
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
