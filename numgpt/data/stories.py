"""An embedded corpus: simple children's stories made by a seeded generator.

Training a language model needs text, and the usual small corpus (TinyStories) has to be
downloaded. So that numgpt can train with no network at all, this module *writes* its own stories
in the spirit of TinyStories: short sentences, a named child or animal, a setting, a problem or a
wish, a helper, a resolution, and a feeling or a moral at the end, with some dialogue in quotes.
None of the text is copied from any dataset; it is assembled from the templates and word lists
below.

The corpus is small and regular on purpose. A 4-layer, 128-wide GPT trained for a few CPU minutes
can visibly learn its grammar (agreement of he/she/they, a/an, plurals) and its story shape, and
there is still enough variety (nine plots, several templates for every beat of each, dozens of
names, animals, places, objects and feelings) that the model cannot simply memorise it.

How a story is made:

1. Choose a hero (a child, an animal, or a pair of them), a helper, a friend, a place, a time of
   day, and a plot. Each choice fills entries of a *context*: a dict from slot names to words.
2. The hero's pronoun decides the grammatical slots: ``{he}`` is "he", "she" or "they", ``{was}``
   is "was" or "were", ``{I}`` is "I" or "we" inside dialogue, and so on. Templates therefore
   never need to know who the hero is, and agreement is correct by construction.
3. The plot picks one template for each beat. A template is a string with slots:
   ``{key}`` inserts the word, ``{a key}`` inserts it with the right indefinite article
   ("a ball", "an apple"), ``{pl key}`` inserts its plural, and a capitalised slot such as
   ``{He}`` or ``{A key}`` inserts a capitalised word.
4. A final pass capitalises every sentence start, so a template may begin with ``{he}``.

Everything is drawn from one ``random.Random(seed)``, so the same seed always gives the same
stories, in the same order.
"""

from __future__ import annotations

import functools
import itertools
import random
import re
from collections.abc import Iterator, Sequence

# ---------------------------------------------------------------------------------------------
# Word lists. Every phrase here is chosen so that its first letter decides "a" or "an" (no
# "unicorn", no "hour"): `article` relies on that, and the tests check it on the whole corpus.
# ---------------------------------------------------------------------------------------------

GIRL_NAMES = (
    "Lily", "Mia", "Emma", "Sara", "Lucy", "Anna", "Zoe", "Ella", "Ruby", "Daisy", "Amy", "Rosa",
    "Nina", "Ava", "Maya", "Chloe", "Grace", "Hannah", "Ivy", "Kim", "Lola", "Molly", "Rose",
    "Sophie", "Tina", "Jenny", "Sally", "Olivia", "Poppy", "Isla",
)
BOY_NAMES = (
    "Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Tim", "Finn", "Noah", "Owen", "Jake", "Luke",
    "Adam", "Eli", "Oscar", "Theo", "Billy", "Danny", "Henry", "Joe", "Kai", "Milo", "Ned", "Pete",
    "Ryan", "Toby", "Zack", "Ollie", "Ethan", "Hugo",
)
PET_NAMES = (
    "Spot", "Fluffy", "Pip", "Buddy", "Coco", "Bubbles", "Sunny", "Patch", "Whiskers", "Snowy",
    "Ziggy", "Biscuit", "Peanut", "Pebble", "Twinkle", "Dot", "Button", "Rusty", "Honey", "Benny",
    "Tilly", "Bouncy", "Fuzzy", "Sparky", "Nibbles", "Acorn", "Olive", "Echo",
)

# Hero animals and where each one lives.
ANIMALS = {
    "dog": "little house", "cat": "warm house", "bunny": "cozy burrow", "bear": "big cave",
    "duck": "nest by the pond", "frog": "lily pad", "mouse": "tiny hole in the wall",
    "fox": "den under a tree", "owl": "hole in an oak tree", "elephant": "grassy field",
    "squirrel": "nest in a tall tree", "bird": "nest in a tree", "puppy": "little house",
    "kitten": "warm house", "pig": "muddy pen on a farm", "lamb": "green field",
    "turtle": "pond", "monkey": "tree in the jungle", "lion": "rocky hill", "hedgehog": "pile of leaves",
    "deer": "quiet forest", "goat": "farm", "chick": "barn", "ant": "busy anthill",
    "octopus": "cave under the sea", "beaver": "lodge on the river",
}
CHILD_HOMES = ("small house", "yellow house", "cozy house", "little blue house", "house with a red door",
               "apartment in the city", "old farmhouse")

# Adjectives a hero may have; a few start with a vowel so the model sees "an" often enough.
HERO_ADJECTIVES = (
    "little", "small", "happy", "curious", "brave", "shy", "kind", "playful", "silly", "clever",
    "friendly", "cheerful", "gentle", "tiny", "young", "energetic", "eager", "adventurous", "active",
)
ANIMAL_ONLY_ADJECTIVES = ("fluffy", "spotted", "orange", "old", "furry")
PAIR_HEROES = ("two friends", "two best friends", "a brother and sister", "two sisters", "two brothers")

ACTIVITIES = (
    "play in the sun", "run and jump", "sing songs", "draw pictures", "splash in puddles",
    "climb trees", "look for bugs", "read books", "dance", "pick flowers", "chase butterflies",
    "play hide and seek", "explore", "bake cookies", "build towers with blocks", "play in the sand",
    "listen to stories", "ride {his} bike", "blow bubbles", "watch the clouds",
)
FAVORITE_THINGS = ("flower", "butterfly", "star", "bird", "song", "cookie", "puppy", "story",
                   "rainbow", "leaf", "shell", "berry", "apple", "kite", "boat")
TRAITS = ("kind", "curious", "helpful", "brave", "funny", "gentle", "busy", "cheerful")

PLACES = {
    "park": ("tall trees", "green grass", "colorful flowers", "happy children", "big swings"),
    "forest": ("tall trees", "soft moss", "tiny mushrooms", "singing birds", "old logs"),
    "garden": ("red roses", "buzzing bees", "juicy tomatoes", "tall sunflowers", "little worms"),
    "beach": ("soft sand", "blue waves", "shiny shells", "noisy seagulls", "big rocks"),
    "farm": ("busy hens", "fat pigs", "tall haystacks", "friendly cows", "red tractors"),
    "meadow": ("wild flowers", "hopping grasshoppers", "tall grasses", "bright butterflies", "fluffy clouds"),
    "playground": ("big slides", "squeaky swings", "happy children", "sand boxes", "monkey bars"),
    "lake": ("quacking ducks", "cool water", "green reeds", "little boats", "jumping fish"),
    "hill": ("windy paths", "soft grass", "tiny flowers", "grazing sheep", "big stones"),
    "zoo": ("tall giraffes", "loud lions", "funny monkeys", "sleepy bears", "pink flamingos"),
    "river": ("smooth stones", "croaking frogs", "tall reeds", "dragonflies", "little fish"),
    "village": ("little shops", "busy people", "old houses", "bakeries", "flower pots"),
    "orchard": ("apple trees", "ripe pears", "busy bees", "long ladders", "wooden baskets"),
    "jungle": ("tall palm trees", "colorful parrots", "long vines", "big leaves", "noisy monkeys"),
    "field": ("yellow flowers", "tall grass", "ladybugs", "rabbits", "big haystacks"),
}

# (how a day starts, a sentence about the weather that fits it)
TIMES = (
    ("One sunny morning", "The sun was shining and the sky was blue."),
    ("One warm afternoon", "The air was warm and the bees were buzzing."),
    ("One windy day", "The wind was blowing and the leaves were dancing."),
    ("One bright spring morning", "New flowers were starting to bloom."),
    ("One cool autumn day", "Red and yellow leaves were falling all around."),
    ("One cloudy morning", "Big gray clouds moved slowly across the sky."),
    ("One summer day", "It was hot, and everyone wanted to be outside."),
    ("On a quiet Sunday", "Everything was calm and peaceful."),
    ("One day", "The birds were singing in the trees."),
    ("Early one morning", "The grass was still wet with dew."),
)

BAD_FEELINGS = ("sad", "upset", "worried", "unhappy")
GOOD_FEELINGS = ("happy", "proud", "glad", "thankful", "excited", "joyful")

# Helpers. People are fixed by the hero ("her mom"); animals come with an ability that the
# "stuck up high" plot needs (None: this animal cannot reach a high branch).
PARENTS = {"mom": "she", "dad": "he", "grandma": "she", "grandpa": "he"}
HELPER_ANIMALS = {
    "owl": "flew up to the branch",
    "bird": "flew up to the branch",
    "giraffe": "stretched {h_his} long neck up to the branch",
    "elephant": "reached up with {h_his} long trunk",
    "monkey": "climbed up the tree in a flash",
    "squirrel": "ran up the tree trunk",
    "bear": "stood up on {h_his} back legs and reached as high as {h_he} could",
    "turtle": None,
    "frog": None,
    "horse": None,
    "dog": None,
    "rabbit": None,
}
HELPER_ADJECTIVES = ("kind", "wise", "friendly", "gentle", "old", "big", "clever", "helpful")
PERSON_REACH = (
    "brought a tall ladder and climbed up",
    "found a long stick and gently poked the branch",
    "climbed onto a big rock and reached up",
)

# Plot-specific vocabulary.
TOYS = ("red ball", "teddy bear", "toy car", "blue ball", "little doll", "wooden boat",
        "orange ball", "toy robot", "shiny marble", "stuffed elephant", "yellow truck", "old hat",
        "green whistle", "toy drum", "picture book")
HIDING_SPOTS = ("big bush", "old bench", "pile of leaves", "tall grass", "large rock",
                "wooden bridge", "flower bed", "tree stump", "picnic table")
FLYING_THINGS = ("red kite", "blue balloon", "straw hat", "paper plane", "green scarf",
                 "yellow kite", "orange balloon", "purple ribbon")
# (a breakable toy, the part that breaks off it)
BREAKABLE = (("toy car", "wheel"), ("wooden train", "wheel"), ("doll", "arm"),
             ("toy boat", "sail"), ("toy robot", "arm"), ("teddy bear", "ear"),
             ("toy horse", "leg"), ("music box", "handle"), ("little plane", "wing"))
TOOLS = ("some glue", "a piece of tape", "a needle and thread", "a little string")
TREATS = ("cookie", "apple", "grape", "strawberry", "cherry", "muffin", "candy", "cupcake",
          "orange", "sandwich", "peach", "blueberry")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
GIFTS = (  # (what to make, what went wrong, how it was fixed)
    ("birthday card", "paint spilled all over it", "got a new piece of paper and painted it again"),
    ("cake", "it fell on the floor", "mixed more flour, eggs and sugar and baked a new one"),
    ("flower necklace", "the string broke and the flowers fell everywhere",
     "picked the flowers up and tied them on a stronger string"),
    ("picture", "the wind blew it into a puddle", "dried it in the sun and drew the lines again"),
    ("clay bowl", "it cracked in the sun", "made a new bowl and let it dry slowly in the shade"),
)
RELATIVES = {"mom": "she", "dad": "he", "grandma": "she", "grandpa": "he", "sister": "she",
             "brother": "he", "aunt": "she", "uncle": "he"}
LANDMARKS = ("big oak tree", "little bridge", "old red barn", "pond with the ducks", "tall fence",
             "field of flowers", "wooden gate", "stone wall")
BABY_ANIMALS = (  # (a small animal in trouble, its trouble, how it was saved)
    ("baby bird", "had fallen out of its nest", "put it back in its nest, high in the tree"),
    ("little kitten", "was stuck in a thorny bush", "gently lifted it out of the bush"),
    ("tiny turtle", "was lying on its back and could not turn over", "turned it over"),
    ("baby duck", "had lost its mother", "carried it back to the pond where its mother was"),
    ("little puppy", "was shivering in the rain", "wrapped it in a warm towel"),
    ("small frog", "was trapped in an empty bucket", "tipped the bucket over so it could hop out"),
)
# (what scares the hero, what the helper says, what the hero does, how it ends, where it can
# happen: None for anywhere)
FEARS = (
    ("That night, a big storm came. Boom! The thunder was so loud that {name} hid under {his} blanket.",
     "Thunder is just a loud noise. It cannot hurt you. Let's count the seconds after each flash.",
     "{name} held on to {h_ref} and counted. One, two, three, four. The booms got softer and softer.",
     "Soon the storm went away, and the stars came out.", None),
    ("When it was time for bed, {name} saw a dark shadow on the wall. {He} thought it was a monster!",
     "Let's turn on the light and look at it together.",
     "When the light came on, they saw that the shadow was only a coat hanging on a chair.",
     "{name} laughed and laughed. The monster was not real at all.", None),
    ("At the {place}, there was a very tall slide. {name} wanted to go down it, but {he} {was} afraid it was too high.",
     "You can do it. I will be right here at the bottom.",
     "{name} took a deep breath and climbed to the top. Then {he} sat down and went whoosh, all the way down!",
     "It was so much fun that {he} went down again and again.", ("park", "playground")),
    ("{name} wanted to jump into the water, but the water looked deep and dark, and {his} legs began to shake.",
     "We can go in slowly, one step at a time. I will hold your hand.",
     "{name} put one foot in, then the other. The water was cool and nice.",
     "Soon {he} {was} splashing and laughing.", ("beach", "lake", "river")),
    ("A big dog was standing on the path. It barked loudly, and {name} did not want to walk past it.",
     "That dog is just saying hello. If you stay calm and quiet, it will be calm too.",
     "{name} walked past slowly and quietly. The dog sniffed {his} hand and wagged its tail.",
     "The big dog was friendly after all.", None),
)


# ---------------------------------------------------------------------------------------------
# Grammar helpers.
# ---------------------------------------------------------------------------------------------

def article(phrase: str) -> str:
    """Put "a" or "an" before `phrase`, by its first letter (the word lists avoid exceptions)."""
    return ("an " if phrase[0].lower() in "aeiou" else "a ") + phrase


_IRREGULAR_PLURALS = {"mouse": "mice", "sheep": "sheep", "deer": "deer", "fish": "fish",
                      "leaf": "leaves", "child": "children", "goose": "geese", "octopus": "octopuses"}


def plural(phrase: str) -> str:
    """The plural of a noun phrase: only its last word changes ("red ball" -> "red balls")."""
    head, _, noun = phrase.rpartition(" ")
    if noun in _IRREGULAR_PLURALS:
        noun = _IRREGULAR_PLURALS[noun]
    elif noun.endswith("y") and noun[-2:-1] not in tuple("aeiou"):
        noun = noun[:-1] + "ies"                   # berry -> berries, but toy -> toys
    elif noun.endswith(("s", "x", "ch", "sh")):
        noun += "es"                               # box -> boxes, peach -> peaches
    else:
        noun += "s"
    return f"{head} {noun}" if head else noun


def count_phrase(n: int, noun: str) -> str:
    """ "one cookie", "three cookies": the noun agrees with the number."""
    return f"{NUMBER_WORDS[n]} {noun if n == 1 else plural(noun)}"


def _pronoun_slots(prefix: str, pronoun: str) -> dict[str, str]:
    """The slots whose words depend on a character's pronoun, named with `prefix`.

    The narrative is in the past tense, so only "was"/"were" needs a verb form; dialogue is in the
    present tense and in the first person, so a pair of heroes says "we" where one says "I".
    """
    third = {"he": ("he", "him", "his", "himself"), "she": ("she", "her", "her", "herself"),
             "they": ("they", "them", "their", "themselves")}[pronoun]
    slots = dict(zip(("he", "him", "his", "himself"), third))
    if pronoun == "they":
        slots.update(was="were", I="we", me="us", my="our", mine="ours", am="are", Im="we're",
                     Ill="we'll", names_were="names were")
    else:
        slots.update(was="was", I="I", me="me", my="my", mine="mine", am="am", Im="I'm",
                     Ill="I'll", names_were="name was")
    return {prefix + key: value for key, value in slots.items()}


# ---------------------------------------------------------------------------------------------
# Rendering templates.
# ---------------------------------------------------------------------------------------------

_SLOT = re.compile(r"\{(?:(a|A|pl) )?(\w+)\}")
# A letter that starts a sentence: at the start, after ". ", "! ", "? ", after a quotation that
# ended with a full stop, or right after an opening quote mark. ("Wow!" she said keeps its small
# "she": after "!" or "?" inside quotes the sentence goes on.)
_SENTENCE_START = re.compile(r'(^|[.!?] +|\." +|")([a-z])')


def render(template: str, slots: dict[str, str]) -> str:
    """Fill the slots of `template` (see the module docstring for the slot syntax)."""

    def fill(match: re.Match[str]) -> str:
        form, key = match.groups()
        # "{I}" is a slot of its own ("I" or "we"); "{He}" is the slot "he", capitalised.
        capital = form == "A" or key not in slots
        word = slots[key] if key in slots else slots[key[0].lower() + key[1:]]
        if "{" in word:                            # a slot value may use slots itself
            word = render(word, slots)
        if form in ("a", "A"):
            word = article(word)
        elif form == "pl":
            word = plural(word)
        return word[0].upper() + word[1:] if capital else word

    return _SLOT.sub(fill, template)


def capitalize_sentences(paragraph: str) -> str:
    """Capitalise the first letter of every sentence and of every quotation in `paragraph`."""
    return _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), paragraph)


# ---------------------------------------------------------------------------------------------
# The story beats. Each list holds interchangeable templates for one beat.
# ---------------------------------------------------------------------------------------------

OPENINGS = (
    "Once upon a time, there {was} {hero} named {name}.",
    "Once upon a time, in {a home} near the {place}, there lived {hero} named {name}.",
    "There {was} once {hero} named {name}, who lived in {a home}.",
    "{name} {was} {hero} who lived in {a home}.",
    "In {a home} not far from the {place}, there lived {hero}. {His} {names_were} {name}.",
    "Once there {was} {hero}. {His} {names_were} {name}.",
    "Not long ago, there {was} {hero} called {name}.",
)
LIKES = (
    "{name} loved to {activity}.",
    "Every day, {he} liked to {activity}.",
    "{he} {was} very {trait}, and {he} loved to {activity}.",
    "More than anything, {name} loved {pl favorite}.",
    "{name} liked to {activity}, but {his} favorite thing of all was {a favorite}.",
    "{he} always wanted to {activity}.",
)
OUTINGS = (
    "{time}, {name} went to the {place}.",
    "{time}, {name} went to the {place} to {activity}.",
    "{time}, {name} and {his} family went to the {place}.",
    "{time}, {name} decided to visit the {place}.",
)
SCENERY = (
    "{weather}",
    "There were {feature} and {feature2} everywhere.",
    "The {place} was full of {feature} and {feature2}.",
    "{he} saw {feature} and {feature2}. {weather}",
)
HELPER_ARRIVES = (
    "Just then, {h_intro} came by.",
    "Just then, {h_intro} walked over.",
    "At that moment, {h_intro} heard {him}.",
    "Soon, {h_intro} came to see what was wrong.",
    "Luckily, {h_intro} was nearby.",
)
THANKS = (
    "\"Thank you, {h_address}!\" said {name}.",
    "{name} gave {h_ref} a big hug. \"Thank you so much!\" {he} said.",
    "\"You are the best, {h_address}!\" {name} said with a big smile.",
    "{name} thanked {h_ref} again and again.",
    "{name} smiled at {h_ref}. \"{I} could not have done it without you,\" {he} said.",
)
HAPPY_ENDINGS = (
    "{name} felt {good} and warm inside.",
    "{name} {was} so {good}.",
    "{he} felt very {good} that day.",
    "That night, {name} went to sleep with a big smile.",
    "It was the best day ever.",
)


# ---------------------------------------------------------------------------------------------
# Plots. Each one returns the paragraphs after the opening, as lists of templates to render.
# ---------------------------------------------------------------------------------------------

def _plot_lost(rng: random.Random, s: dict[str, str]) -> list[list[str]]:
    s["toy"] = rng.choice(TOYS)
    s["spot"], s["spot2"], s["spot3"] = rng.sample(HIDING_SPOTS, 3)
    middle = [
        rng.choice((
            "{name} had brought {his} {toy} to play with.",
            "{His} favorite toy was {a toy}, and {he} took it everywhere.",
            "{name}'s grandma had given {him} {a toy}, and {he} loved it very much.",
        )),
        rng.choice((
            "{he} played with the {toy} all morning. But when {he} looked for it after lunch, it was gone!",
            "{he} put {his} {toy} down to {activity}. When {he} came back, the {toy} was not there.",
            "{he} wanted to show the {toy} to a friend, but {he} could not find it anywhere.",
        )),
        rng.choice((
            "\"Where is {my} {toy}?\" {name} cried. \"{I} looked everywhere!\"",
            "\"Oh no! {Im} lost {my} {toy}!\" said {name}.",
            "{name} {was} very {bad}. \"{I} want {my} {toy} back,\" {he} said quietly.",
        )),
        rng.choice(HELPER_ARRIVES),
        rng.choice((
            "\"Don't worry,\" said {h_ref}. \"Let's look for it together.\"",
            "\"I will help you find it,\" {h_ref} said with a smile.",
            "\"Where did you last see it?\" asked {h_ref}. \"Let's start there.\"",
        )),
    ]
    end = [
        rng.choice((
            "They looked under the {spot} and behind the {spot2}, but it was not there.",
            "First they looked behind the {spot}. Then they looked under the {spot2}.",
            "{name} and {h_ref} searched all around the {place}, near the {spot} and the {spot2}.",
        )),
        rng.choice((
            "At last, {name} saw something peeking out from under the {spot3}. It was {his} {toy}!",
            "Finally, {h_ref} found the {toy} behind the {spot3}. It had been there all along.",
            "Then {h_ref} pointed at the {spot3}. There was the {toy}, safe and sound!",
        )),
        rng.choice(THANKS),
        rng.choice((
            "{name} learned to put {his} toys away after playing.",
            "From that day on, {name} always kept {his} {toy} in a safe place.",
            "{he} learned that when you lose something, it helps to look carefully and ask for help.",
        )),
    ]
    return [middle, end]


def _plot_stuck(rng: random.Random, s: dict[str, str]) -> list[list[str]]:
    s["thing"] = rng.choice(FLYING_THINGS)
    middle = [
        rng.choice((
            "{name} had {a thing}, and {he} held it up high in the wind.",
            "That day, {name} brought {his} {thing} to play with.",
            "{name} played with {his} new {thing} and ran around in circles.",
        )),
        rng.choice((
            "Suddenly, a strong wind blew the {thing} out of {his} hands. "
            "It flew up, up, up and got stuck on a high branch of a big tree.",
            "Then a big gust of wind came. Whoosh! "
            "The {thing} flew away and got caught in the branches of an old oak tree.",
            "But the wind pulled the {thing} away, and it landed at the very top of a tall tree.",
        )),
        rng.choice((
            "\"Oh no! {I} can't reach it!\" said {name}. {He} jumped and jumped, but the branch was too high.",
            "\"{my} {thing}!\" {name} cried. \"How will {I} get it down?\"",
            "{name} tried to climb the tree, but {he} {was} too small. {He} sat down and felt {bad}.",
        )),
        rng.choice(HELPER_ARRIVES),
        rng.choice((
            "\"I can help,\" said {h_ref}. \"Wait right here.\"",
            "\"Don't be {bad},\" said {h_ref}. \"I think I can get it.\"",
            "\"Let me try,\" said {h_ref} kindly.",
        )),
    ]
    end = [
        rng.choice((
            "{H_ref} {h_reach}. {H_he} carefully took the {thing} and brought it down.",
            "Slowly and carefully, {h_ref} {h_reach}. Then {h_he} handed the {thing} back to {name}.",
        )),
        rng.choice((
            "The {thing} was not hurt at all.",
            "{name} jumped up and down with joy.",
            "{name} held the {thing} tight so the wind could not take it again.",
        )),
        rng.choice(THANKS),
        rng.choice((
            "{name} learned that friends can do more together than alone.",
            "{he} learned that when a problem is too big, it is okay to ask for help.",
            "From that day on, {name} always helped others too, just like {h_ref} had helped {him}.",
        )),
    ]
    return [middle, end]


def _plot_broken(rng: random.Random, s: dict[str, str]) -> list[list[str]]:
    s["toy"], s["part"] = rng.choice(BREAKABLE)
    s["tool"] = rng.choice(TOOLS)
    middle = [
        rng.choice((
            "{name} loved {his} {toy} more than any other toy.",
            "{name} had {a toy} that {his} grandpa had made for {him}.",
            "That day, {name} {was} playing with {his} {toy}.",
        )),
        rng.choice((
            "{he} {was} running with it when it fell on the hard ground. Crack! {A part} broke off.",
            "{he} threw it up in the air, but {he} did not catch it. It hit a rock, and {a part} came off.",
            "{he} played too roughly, and suddenly {a part} snapped off the {toy}.",
        )),
        rng.choice((
            "{name} {was} very {bad}. Tears filled {his} eyes.",
            "\"{my} {toy} is broken!\" {name} cried.",
            "{name} held the broken {toy} and began to cry. \"Now {I} can't play with it,\" {he} said.",
        )),
        rng.choice(HELPER_ARRIVES),
        rng.choice((
            "\"Let me see,\" said {h_ref}. \"I think we can fix it.\"",
            "\"Don't be {bad},\" said {h_ref}. \"Broken things can often be fixed.\"",
            "\"Can you fix it?\" asked {name}. \"We can try,\" said {h_ref}.",
        )),
    ]
    end = [
        rng.choice((
            "{H_ref} got {tool} and carefully put the {part} back on.",
            "Together, they used {tool} to fix the {toy}. They had to be very patient and wait for it to dry.",
            "{H_ref} showed {name} how to use {tool}, and {name} helped fix the {part}.",
        )),
        rng.choice((
            "Soon, the {toy} was as good as new!",
            "When they were done, the {toy} looked just like before.",
            "The {toy} was fixed, and {name} hugged it tight.",
        )),
        rng.choice(THANKS),
        rng.choice((
            "{name} learned to be gentle with {his} toys.",
            "{he} learned that with patience, many broken things can be fixed.",
            "From that day on, {name} played with the {toy} very carefully.",
        )),
    ]
    return [middle, end]


def _plot_scared(rng: random.Random, s: dict[str, str]) -> list[list[str]]:
    problem, advice, brave_act, outcome, places = rng.choice(FEARS)
    if places:
        _choose_place(rng, s, places)
    s["advice"] = advice
    middle = [
        problem,
        rng.choice((
            "\"{Im} scared,\" {name} said in a small voice.",
            "{name} felt {his} heart beat fast. \"{I} don't like this,\" {he} whispered.",
            "{name} {was} very scared and did not know what to do.",
        )),
        rng.choice(HELPER_ARRIVES),
        rng.choice((
            "{H_ref} smiled. \"{advice}\"",
            "\"It is okay to be scared,\" said {h_ref}. \"{advice}\"",
            "{H_ref} sat down next to {him}. \"{advice}\" {h_he} said.",
        )),
    ]
    end = [
        brave_act,
        outcome,
        rng.choice(THANKS),
        rng.choice((
            "{name} learned that being brave means doing something even when you are scared.",
            "{he} learned that many scary things are not so scary when you look at them closely.",
            "From that day on, {name} {was} a little braver.",
        )),
    ]
    return [middle, end]


def _plot_sharing(rng: random.Random, s: dict[str, str]) -> list[list[str]]:
    treat = rng.choice(TREATS)
    n = rng.randint(2, 8)
    s["treat"] = treat
    s["treats"] = count_phrase(n, treat)
    s["half"] = count_phrase(n // 2, treat)
    middle = [
        rng.choice((
            "{name}'s mom had given {him} {treats} for a snack.",
            "{name} had a little basket with {treats} in it.",
            "{name} found {treats} on the kitchen table, and they were all for {him}.",
        )),
        "Then {f_intro} came over. {F_he} looked at the {pl treat} and asked, \"Can I have one, please?\"",
        rng.choice((
            "{name} did not want to share. \"They are {mine}!\" {he} said, and held the basket close.",
            "\"No,\" said {name}. \"{I} want all of them.\"",
            "{name} shook {his} head and turned away.",
        )),
        rng.choice((
            "{f_name} looked sad and walked away slowly.",
            "{f_name} did not say anything. {F_he} just sat down alone on a rock.",
        )),
    ]
    end = [
        rng.choice((
            "Soon {name} felt a funny feeling in {his} tummy. Eating alone was not fun at all.",
            "{name} ate one, but it did not taste as sweet as before. {He} kept looking at {f_name}.",
            "{name} thought about how {he} would feel if {he} had nothing.",
        )),
        rng.choice((
            "{name} ran after {f_name}. \"Wait! Do you want to share {my} {pl treat}?\" {he} asked.",
            "{name} walked over to {f_name} and gave {f_him} {half}. \"{Im} sorry,\" {he} said.",
            "\"Here,\" said {name}, and {he} gave {f_name} {half}.",
        )),
        rng.choice((
            "{f_name} smiled a big smile. They sat under a tree and ate together.",
            "{f_name} was so happy. They laughed and played all afternoon.",
        )),
        rng.choice((
            "{name} learned that sharing makes everyone happy, even {himself}.",
            "{he} learned that things are more fun when you share them with a friend.",
            "From that day on, {name} always shared with {his} friends.",
        )),
    ]
    return [middle, end]


def _plot_lost_way(rng: random.Random, s: dict[str, str]) -> list[list[str]]:
    s["landmark"], s["landmark2"] = rng.sample(LANDMARKS, 2)
    middle = [
        rng.choice((
            "{name} saw a pretty butterfly and followed it. {He} followed it past the trees and over a little hill.",
            "{name} wanted to see what was on the other side of the {place}, so {he} walked and walked.",
            "{name} chased a rolling ball down a long path, farther and farther away.",
        )),
        "When {he} looked around, {he} did not know where {he} {was}!",
        rng.choice((
            "\"Where is {my} home?\" {name} cried. \"{I} want to go home.\"",
            "\"{Im} lost,\" said {name}, and {he} began to cry.",
            "{name} sat down on the grass. Everything looked strange, and {he} felt very {bad}.",
        )),
        rng.choice(HELPER_ARRIVES),
        rng.choice((
            "\"I know the way,\" said {h_ref}. \"Follow me.\"",
            "\"Don't cry,\" said {h_ref}. \"I will help you get home.\"",
            "\"Are you lost?\" asked {h_ref}. \"Come with me. I know where you live.\"",
        )),
    ]
    end = [
        rng.choice((
            "{H_ref} led {name} past the {landmark} and across the {landmark2}.",
            "They walked together past the {landmark}. Then they turned left at the {landmark2}.",
        )),
        rng.choice((
            "Soon {name} saw {his} {home}. {His} mom was waiting at the door with open arms.",
            "At last, they came to {name}'s {home}, and {his} family ran out to meet {him}.",
        )),
        rng.choice(THANKS),
        rng.choice((
            "{name} learned to always stay close to home.",
            "From that day on, {name} never wandered off alone.",
            "{he} learned to always tell a grown-up before going anywhere.",
        )),
    ]
    return [middle, end]


def _plot_gift(rng: random.Random, s: dict[str, str]) -> list[list[str]]:
    s["gift"], s["mishap"], s["remake"] = rng.choice(GIFTS)
    s["relative"] = rng.choice(sorted(RELATIVES))
    s["relative_he"] = RELATIVES[s["relative"]]
    middle = [
        rng.choice((
            "{name} wanted to make a special present for {his} {relative}'s birthday.",
            "Tomorrow was {his} {relative}'s birthday, and {name} wanted to make {a gift}.",
            "{name} had an idea. {He} would make {a gift} for {his} {relative}.",
        )),
        "{he} worked very hard on the {gift}. But then {mishap}!",
        rng.choice((
            "\"Now it is ruined!\" {name} cried. \"{I} will never finish it in time.\"",
            "{name} {was} so {bad} that {he} wanted to give up.",
            "{name} looked at the {gift} and felt like crying.",
        )),
        rng.choice(HELPER_ARRIVES),
        rng.choice((
            "\"Don't give up,\" said {h_ref}. \"Let's try again together.\"",
            "\"Mistakes happen,\" said {h_ref}. \"What matters is that you try again.\"",
        )),
    ]
    end = [
        "{name} and {h_ref} {remake}.",
        rng.choice((
            "The new {gift} was even better than the first one.",
            "When it was done, the {gift} was beautiful.",
        )),
        rng.choice((
            "The next day, {name} gave the {gift} to {his} {relative}. "
            "\"I love it!\" said {his} {relative}, and gave {name} a big hug.",
            "{His} {relative} smiled a big smile. \"This is the best present ever!\" {relative_he} said.",
        )),
        rng.choice((
            "{name} learned to never give up, even when things go wrong.",
            "{he} learned that a gift made with love is the best gift of all.",
            "{name} felt {good}, because {he} had tried again.",
        )),
    ]
    return [middle, end]


def _plot_race(rng: random.Random, s: dict[str, str]) -> list[list[str]]:
    s["landmark"] = rng.choice(LANDMARKS)
    middle = [
        "{name} and {f_intro} wanted to have a race to the {landmark}.",
        rng.choice((
            "\"Ready, set, go!\" they shouted, and off they ran.",
            "They counted to three and started to run as fast as they could.",
        )),
        rng.choice((
            "{name} {was} winning! But then {he} heard a cry behind {him}. {f_name} had fallen and hurt {f_his} knee.",
            "Halfway there, {f_name} tripped over a root and fell down. {F_he} began to cry.",
        )),
        rng.choice((
            "{name} stopped. {He} wanted to win, but {f_name} needed help.",
            "{name} looked at the {landmark}, and then at {f_name}. {He} turned around.",
        )),
    ]
    end = [
        rng.choice((
            "{he} ran back and helped {f_name} up. \"Are you okay?\" {he} asked.",
            "\"{Im} here,\" said {name}, and {he} helped {f_name} stand up.",
        )),
        rng.choice((
            "\"Thank you,\" said {f_name}. \"You are a good friend.\"",
            "{f_name} wiped {f_his} tears and smiled. \"Let's walk there together,\" {f_he} said.",
        )),
        "They walked to the {landmark} side by side, and nobody cared who won.",
        rng.choice((
            "{name} learned that being a good friend is more important than winning.",
            "{he} felt {good}, because helping a friend felt even better than winning.",
        )),
    ]
    return [middle, end]


def _plot_rescue(rng: random.Random, s: dict[str, str]) -> list[list[str]]:
    s["baby"], s["trouble"], s["rescue"] = rng.choice(BABY_ANIMALS)
    middle = [
        rng.choice((
            "{name} heard a tiny sound. It was {a baby}! It {trouble}.",
            "While {he} {was} walking, {name} found {a baby} that {trouble}.",
        )),
        rng.choice((
            "\"Oh, poor {baby},\" said {name}. \"{I} must help it.\"",
            "The {baby} looked scared. {name} wanted to help, but {he} did not know how.",
        )),
        rng.choice(HELPER_ARRIVES),
        rng.choice((
            "\"We have to be very gentle,\" said {h_ref}. \"Let's help it together.\"",
            "\"You did the right thing to look after it,\" said {h_ref}.",
        )),
    ]
    end = [
        "Very gently, {name} and {h_ref} {rescue}.",
        rng.choice((
            "The {baby} made a happy little sound.",
            "Soon the {baby} was safe and warm.",
        )),
        rng.choice(HAPPY_ENDINGS),
        rng.choice((
            "{name} learned that even small hands can do big, kind things.",
            "{he} learned to always be kind to animals, big and small.",
            "From that day on, {name} looked after every animal {he} met.",
        )),
    ]
    return [middle, end]


PLOTS = (_plot_lost, _plot_stuck, _plot_broken, _plot_scared, _plot_sharing, _plot_lost_way,
         _plot_gift, _plot_race, _plot_rescue)


# ---------------------------------------------------------------------------------------------
# Characters and the whole story.
# ---------------------------------------------------------------------------------------------

def _hero_slots(rng: random.Random) -> dict[str, str]:
    """A hero: a child, an animal, or a pair of either, with its pronoun slots."""
    kind = rng.choices(("child", "animal", "pair"), weights=(5, 4, 1))[0]
    if kind == "pair" and rng.random() < 0.5:    # "two playful bunnies named Pip and Dot"
        animal = rng.choice(sorted(ANIMALS))
        slots = _pronoun_slots("", "they")
        slots.update(name=" and ".join(rng.sample(PET_NAMES, 2)), home=ANIMALS[animal],
                     hero=f"two {rng.choice(HERO_ADJECTIVES)} {plural(animal)}")
    elif kind == "pair":                           # "a brother and sister named Ben and Lily"
        desc = rng.choice(PAIR_HEROES)
        if desc == "a brother and sister":
            names = [rng.choice(BOY_NAMES), rng.choice(GIRL_NAMES)]
        else:
            pool = {"two sisters": GIRL_NAMES, "two brothers": BOY_NAMES}.get(desc, GIRL_NAMES + BOY_NAMES)
            names = rng.sample(pool, 2)
        slots = _pronoun_slots("", "they")
        slots.update(name=" and ".join(names), hero=desc, home=rng.choice(CHILD_HOMES))
    elif kind == "child":
        pronoun = rng.choice(("he", "she"))
        slots = _pronoun_slots("", pronoun)
        noun = "boy" if pronoun == "he" else "girl"
        slots.update(name=rng.choice(BOY_NAMES if pronoun == "he" else GIRL_NAMES),
                     hero=article(f"{rng.choice(HERO_ADJECTIVES)} {noun}"), home=rng.choice(CHILD_HOMES))
    else:
        animal = rng.choice(sorted(ANIMALS))
        slots = _pronoun_slots("", rng.choice(("he", "she")))
        adjective = rng.choice(HERO_ADJECTIVES + ANIMAL_ONLY_ADJECTIVES)
        slots.update(name=rng.choice(PET_NAMES), hero=article(f"{adjective} {animal}"), home=ANIMALS[animal])
    return slots


def _helper_slots(rng: random.Random, hero: dict[str, str], needs_reach: bool) -> dict[str, str]:
    """Someone who helps: a parent, a named friend, or a kind animal (h_ slots)."""
    kind = rng.choice(("parent", "friend", "animal"))
    if kind == "parent":
        relation = rng.choice(sorted(PARENTS))
        slots = _pronoun_slots("h_", PARENTS[relation])
        ref = f"{hero['his']} {relation}"
        slots.update(h_intro=ref, h_ref=ref, h_address=relation.capitalize(),
                     h_reach=rng.choice(PERSON_REACH))
    elif kind == "friend":
        pronoun = rng.choice(("he", "she"))
        slots = _pronoun_slots("h_", pronoun)
        name = _other_name(rng, BOY_NAMES if pronoun == "he" else GIRL_NAMES, hero["name"])
        slots.update(h_intro=f"{hero['his']} friend {name}", h_ref=name, h_address=name,
                     h_reach=rng.choice(PERSON_REACH))
    else:
        able = [a for a, reach in HELPER_ANIMALS.items() if reach or not needs_reach]
        animal = rng.choice(sorted(able))
        pronoun = rng.choice(("he", "she"))
        slots = _pronoun_slots("h_", pronoun)
        title = "Mr." if pronoun == "he" else "Mrs."
        slots.update(h_intro=article(f"{rng.choice(HELPER_ADJECTIVES)} {animal}"), h_ref=f"the {animal}",
                     h_address=f"{title} {animal.capitalize()}",
                     h_reach=HELPER_ANIMALS[animal] or rng.choice(PERSON_REACH))
    return slots


def _friend_slots(rng: random.Random, hero: dict[str, str]) -> dict[str, str]:
    """A friend of the hero's own kind, who needs help or asks for something (f_ slots)."""
    pronoun = rng.choice(("he", "she"))
    slots = _pronoun_slots("f_", pronoun)
    if rng.random() < 0.5:
        name = _other_name(rng, BOY_NAMES if pronoun == "he" else GIRL_NAMES, hero["name"])
        slots.update(f_name=name, f_intro=f"{hero['his']} friend {name}")
    else:
        name = _other_name(rng, PET_NAMES, hero["name"])
        animal = rng.choice(sorted(ANIMALS))
        slots.update(f_name=name, f_intro=f"{article(rng.choice(HERO_ADJECTIVES) + ' ' + animal)} named {name}")
    return slots


def _other_name(rng: random.Random, names: Sequence[str], taken: str) -> str:
    """A name from `names` that is not part of the hero's name (so no "Tom helped Tom")."""
    return rng.choice([n for n in names if n not in taken.split(" and ")])


def _choose_place(rng: random.Random, slots: dict[str, str], places: Sequence[str]) -> None:
    """Set the story's place (one of `places`) and two things to see there."""
    slots["place"] = rng.choice(places)
    slots["feature"], slots["feature2"] = rng.sample(PLACES[slots["place"]], 2)


def _story(rng: random.Random) -> str:
    """One story: an opening paragraph, then the plot's problem and resolution paragraphs."""
    slots = _hero_slots(rng)
    plot = rng.choice(PLOTS)
    slots.update(_helper_slots(rng, slots, needs_reach=plot is _plot_stuck))
    slots.update(_friend_slots(rng, slots))
    _choose_place(rng, slots, sorted(PLACES))
    slots["time"], slots["weather"] = rng.choice(TIMES)
    slots.update(activity=rng.choice(ACTIVITIES), favorite=rng.choice(FAVORITE_THINGS),
                 trait=rng.choice(TRAITS), bad=rng.choice(BAD_FEELINGS), good=rng.choice(GOOD_FEELINGS))

    opening = [rng.choice(OPENINGS)]
    if rng.random() < 0.7:                         # optional beats vary the length and rhythm
        opening.append(rng.choice(LIKES))
    opening.append(rng.choice(OUTINGS))
    if rng.random() < 0.6:
        opening.append(rng.choice(SCENERY))
    paragraphs = [opening, *plot(rng, slots)]
    if rng.random() < 0.4:                         # sometimes a closing feeling after the moral
        paragraphs[-1].append(rng.choice(HAPPY_ENDINGS))
    return "\n".join(capitalize_sentences(" ".join(render(t, slots) for t in paragraph))
                     for paragraph in paragraphs)


MIN_WORDS, MAX_WORDS = 80, 250


def _stories(seed: int) -> Iterator[str]:
    """An endless stream of stories from `seed`, each MIN_WORDS..MAX_WORDS words long.

    A story outside that range is skipped (this is rare), so every story has a TinyStories-like
    length.
    """
    rng = random.Random(seed)
    while True:
        story = _story(rng)
        if MIN_WORDS <= len(story.split()) <= MAX_WORDS:
            yield story


def generate_stories(n: int, seed: int) -> list[str]:
    """`n` stories drawn deterministically from `seed`.

    The first k stories of `generate_stories(n, seed)` do not depend on n, so a longer corpus
    extends a shorter one.
    """
    return list(itertools.islice(_stories(seed), n))


# The fixed embedded corpus. Changing these (or any template above) changes the corpus; the token
# cache notices because its key includes a hash of this file (see numgpt.data.dataset).
TRAIN_SEED, VAL_SEED = 1234, 5678
N_TRAIN, N_VAL = 6000, 400


@functools.lru_cache(maxsize=None)
def _embedded(split: str) -> tuple[str, ...]:
    if split == "train":
        return tuple(generate_stories(N_TRAIN, TRAIN_SEED))
    # Validation stories come from another seed; any story that happens to equal a training
    # story is skipped, so the validation loss measures generalisation, not recall.
    seen = set(_embedded("train"))
    val: list[str] = []
    for story in _stories(VAL_SEED):
        if story not in seen:
            val.append(story)
            seen.add(story)
        if len(val) == N_VAL:
            return tuple(val)
    raise AssertionError("unreachable: _stories never ends")


def embedded_corpus(split: str) -> list[str]:
    """The embedded corpus: `split` is "train" (6000 stories) or "val" (400 other stories)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    return list(_embedded(split))
