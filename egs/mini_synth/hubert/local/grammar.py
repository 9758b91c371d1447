"""Text for the mini_synth corpus: read sentences, keywords and spoken commands.

Three kinds of prompt, each a `Prompt` with the string spoken by espeak-ng (``speak``, with punctuation so that
commas give clause pauses), the transcript (``words``: upper case, no punctuation, LibriSpeech style) and a label:

* ``read``   -- sentences from a template grammar with slot lists (nouns, verbs, adjectives, places, names,
  numbers, times, ...). The grammar spans well over 10^9 distinct sentences; `read_sentence` draws one.
  Train/dev/test draw from disjoint pools (`text_pool`, a hash of the transcript), so dev/test sentences are
  unseen in train whatever the sample size.
* ``kw``     -- a Speech-Commands-like clip: one of the 10 keywords, an unknown word or no speech at all
  (label ``_unknown_`` / ``_silence_``, the 12 classes of SUPERB KS).
* ``intent`` -- a Fluent-Speech-Commands-like command with an (action, object, location) label, several
  phrasings per intent.

Every draw takes a `numpy.random.Generator`, so the corpus is reproducible from its seed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Prompt",
    "KEYWORDS",
    "KW_LABELS",
    "UNKNOWN_WORDS",
    "INTENTS",
    "INTENT_ACTIONS",
    "INTENT_OBJECTS",
    "INTENT_LOCATIONS",
    "number_words",
    "read_sentence",
    "keyword_prompt",
    "intent_prompt",
    "text_pool",
    "transcript",
]


@dataclass(frozen=True)
class Prompt:
    """One thing to say: what espeak speaks, the transcript, and the task label ("" for read speech)."""

    kind: str  # "read" | "kw" | "intent"
    speak: str  # text given to espeak-ng (may be "" for a silence/noise-only keyword clip)
    words: str  # transcript, upper case, no punctuation
    label: str = ""  # kw: keyword class; intent: "action object location"


def transcript(text: str) -> str:
    """Upper-case transcript without punctuation (apostrophes kept): ``"Well, it's 5."`` -> ``"WELL IT'S 5"``."""
    keep = "".join(c if (c.isalnum() or c in " '") else " " for c in text)
    return " ".join(keep.upper().split())


# --------------------------------------------------------------------------------------------- numbers

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen " \
        "sixteen seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words for 0 <= n < 1,000,000 (``342`` -> ``"three hundred and forty two"``)."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"number_words: {n} out of range [0, 1e6)")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))
    rest = n % 1000
    head = number_words(n // 1000) + " thousand"
    if rest == 0:
        return head
    return head + (" and " if rest < 100 else " ") + number_words(rest)


# --------------------------------------------------------------------------------------------- slot lists

_W = str.split

NAMES = _W("""Alice Oliver Maria Thomas Sophie Daniel Grace Henry Chloe Samuel Ruth Victor Nadia George Isabel
Patrick Fiona Joseph Hannah Leo Martha Edward Julia Oscar Yvonne Peter Laura Frank Wendy Hugo Zoe Arthur Esther
Vincent Agnes Felix Bridget Simon Judith Rupert Carmen Douglas Irene Malcolm Beatrice Kevin Theresa Gordon Olga
Walter Priya""")

NOUNS = _W("""apple basket bicycle blanket bottle bridge bucket butter cabbage camera candle carpet castle chair
cheese chicken cloud coffee collar copper cottage cousin crayon daughter desk diamond doctor donkey drawer
engine envelope farmer feather fence finger flower forest garden ghost glove goat guitar hammer harbour helmet
honey horse island jacket jewel kettle kitchen kitten ladder lantern lemon letter library lizard machine
magnet marble meadow mirror monkey mountain needle nephew notebook ocean orange oyster paddle painter
parcel pencil pepper piano pillow pocket potato puzzle rabbit rainbow ribbon river rocket saddle sailor
sandwich scissors shadow shepherd shovel silver soldier spider sponge squirrel stomach suitcase sugar
teacher thimble thunder ticket tiger tomato tractor treasure trumpet tunnel umbrella village violin wagon
walnut wardrobe whistle window wizard yoghurt zebra judge voyage measure pleasure vision beige
boy toy coin voice poison oil book cook cushion pudding wolf woman bull hook garage television decision""")

ADJECTIVES = _W("""ancient angry bright broken careful cheerful clumsy cold crooked curious dusty eager empty
enormous fancy fragile frozen gentle gloomy golden greedy hairy heavy hollow honest hungry jolly lazy
little lonely loud lucky muddy narrow nervous noisy odd orange patient polite proud purple quiet rapid
rough rusty shiny silent sleepy slippery smooth soggy sour sticky strange sturdy sweet tidy tiny tired
ugly warm wealthy wicked wooden worried yellow young zealous thirsty thoughtful
royal joyful annoyed loyal good woollen usual casual""")

# (base, third person, past) -- transitive verbs taking a noun object.
VERBS = [tuple(v.split("/")) for v in _W("""bring/brings/brought buy/buys/bought carry/carries/carried
catch/catches/caught choose/chooses/chose clean/cleans/cleaned find/finds/found fix/fixes/fixed
follow/follows/followed hide/hides/hid hold/holds/held kick/kicks/kicked lift/lifts/lifted
move/moves/moved open/opens/opened paint/paints/painted polish/polishes/polished pull/pulls/pulled
push/pushes/pushed repair/repairs/repaired sell/sells/sold shake/shakes/shook share/shares/shared
steal/steals/stole throw/throws/threw touch/touches/touched wash/washes/washed watch/watches/watched
wrap/wraps/wrapped borrow/borrows/borrowed measure/measures/measured weigh/weighs/weighed
drop/drops/dropped draw/draws/drew judge/judges/judged examine/examines/examined
enjoy/enjoys/enjoyed avoid/avoids/avoided destroy/destroys/destroyed cook/cooks/cooked
put/puts/put""")]

# intransitive verbs (base, third person, past)
INTRANSITIVE = [tuple(v.split("/")) for v in _W("""laugh/laughs/laughed sing/sings/sang sleep/sleeps/slept
shout/shouts/shouted whisper/whispers/whispered dance/dances/danced wait/waits/waited wander/wanders/wandered
run/runs/ran swim/swims/swam jump/jumps/jumped cough/coughs/coughed yawn/yawns/yawned smile/smiles/smiled
arrive/arrives/arrived vanish/vanishes/vanished""")]

PLACES = _W("""Boston Chicago Dublin Edinburgh Glasgow Houston Lisbon London Madrid Manchester Melbourne Nairobi
Oslo Paris Prague Quebec Seattle Sydney Toronto Vienna Warsaw Zurich Bristol Cardiff Denver Geneva Helsinki
Jakarta Kyoto Leeds Montreal Naples Ottawa Phoenix Rome Tokyo Utrecht Venice York""")

LOCATIONS = ["the station", "the market", "the harbour", "the old church", "the village square",
             "the museum", "the garden", "the bakery", "the post office", "the beach", "the top floor",
             "the back yard", "the hospital", "the school", "the bridge", "the riverbank", "the library",
             "the cinema", "the farm", "the airport", "the hotel lobby", "the bus stop", "the workshop"]

DAYS = _W("Monday Tuesday Wednesday Thursday Friday Saturday Sunday")
MONTHS = _W("January February March April May June July August September October November December")
TIMES = ["in the morning", "at noon", "in the afternoon", "in the evening", "at midnight", "at dawn",
         "before breakfast", "after lunch", "after dinner", "last night", "this morning", "yesterday",
         "tomorrow", "next week", "every day", "once a year", "three times a week"]
ADVERBS = _W("""quickly slowly carefully quietly loudly happily sadly gently suddenly eagerly calmly badly
proudly nervously politely again today instead""")
COLOURS = _W("red green blue black white brown grey pink violet orange yellow purple")
UNITS = [("pound", "pounds"), ("mile", "miles"), ("minute", "minutes"), ("hour", "hours"), ("dollar", "dollars"),
         ("metre", "metres"), ("page", "pages"), ("box", "boxes"), ("cup", "cups"), ("sheep", "sheep")]
CONJ = ["because", "although", "while", "so", "but", "and then", "until", "unless", "whenever"]


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _article(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def _np(rng: np.random.Generator) -> str:
    """A noun phrase: 'the noun', 'a adjective noun', 'my adjective noun', 'Name's noun', ..."""
    noun = _pick(rng, NOUNS)
    r = rng.random()
    if r < 0.25:
        return "the " + noun
    if r < 0.5:
        return _article(_pick(rng, ADJECTIVES) + " " + noun)
    if r < 0.65:
        return _pick(rng, ["my", "your", "his", "her", "our", "their"]) + " " + _pick(rng, ADJECTIVES) + " " + noun
    if r < 0.8:
        return _pick(rng, NAMES) + "'s " + noun
    if r < 0.9:
        return "the " + _pick(rng, COLOURS) + " " + noun
    return "that " + _pick(rng, ADJECTIVES) + " " + noun


def _count(rng: np.random.Generator) -> str:
    n = int(rng.choice([rng.integers(2, 20), rng.integers(20, 100), rng.integers(100, 1000),
                        rng.integers(1000, 100000)], p=[0.4, 0.3, 0.2, 0.1]))
    singular, plural = _pick(rng, UNITS)
    return number_words(n) + " " + plural


def _date(rng: np.random.Generator) -> str:
    day = int(rng.integers(1, 29))
    ordinal = {1: "first", 2: "second", 3: "third", 5: "fifth", 8: "eighth", 9: "ninth", 12: "twelfth",
               20: "twentieth"}
    if day in ordinal:
        word = ordinal[day]
    elif day > 20 and day % 10 in (1, 2, 3):
        word = "twenty " + {1: "first", 2: "second", 3: "third"}[day % 10]
    else:
        word = number_words(day) + "th"
        word = word.replace("twentyth", "twentieth")
    return f"the {word} of {_pick(rng, MONTHS)}"


def _clause(rng: np.random.Generator) -> str:
    """One independent clause, in one of several shapes and tenses."""
    name, other = _pick(rng, NAMES), _pick(rng, NAMES)
    verb, intr = _pick(rng, VERBS), _pick(rng, INTRANSITIVE)
    shape = int(rng.integers(14))
    if shape == 0:
        return f"{name} {verb[2]} {_np(rng)} {_pick(rng, TIMES)}"
    if shape == 1:
        return f"{_np(rng)} was {_pick(rng, ADJECTIVES)} and {_pick(rng, ADJECTIVES)}"
    if shape == 2:
        return f"{name} {verb[1]} {_np(rng)} {_pick(rng, ADVERBS)}"
    if shape == 3:
        return f"we {intr[2]} near {_pick(rng, LOCATIONS)} in {_pick(rng, PLACES)}"
    if shape == 4:
        return f"{other} will {verb[0]} {_np(rng)} on {_pick(rng, DAYS)}"
    if shape == 5:
        return f"there were {_count(rng)} in {_pick(rng, LOCATIONS)}"
    if shape == 6:
        return f"{name} {intr[2]} {_pick(rng, ADVERBS)} {_pick(rng, TIMES)}"
    if shape == 7:
        return f"the train to {_pick(rng, PLACES)} leaves at {number_words(int(rng.integers(1, 13)))} " \
               f"{_pick(rng, ['o clock', 'fifteen', 'thirty', 'forty five'])}"
    if shape == 8:
        return f"{name} never {verb[1]} {_np(rng)} without asking {other}"
    if shape == 9:
        return f"{_np(rng)} costs {_count(rng)}"
    if shape == 10:
        return f"they moved to {_pick(rng, PLACES)} on {_date(rng)}"
    if shape == 11:
        return f"{name} had to {verb[0]} {_np(rng)} before {other} {intr[2]}"
    if shape == 12:
        return f"{_np(rng)} {intr[1]} whenever the {_pick(rng, NOUNS)} is {_pick(rng, ADJECTIVES)}"
    return f"{name} and {other} {verb[2]} {_np(rng)} at {_pick(rng, LOCATIONS)}"


_QUESTIONS = [
    lambda r: f"did {_pick(r, NAMES)} {_pick(r, VERBS)[0]} {_np(r)} {_pick(r, TIMES)}",
    lambda r: f"where is {_np(r)}",
    lambda r: f"why would {_pick(r, NAMES)} {_pick(r, INTRANSITIVE)[0]} near {_pick(r, LOCATIONS)}",
    lambda r: f"how many {_pick(r, UNITS)[1]} did {_pick(r, NAMES)} need",
    lambda r: f"is {_np(r)} really {_pick(r, ADJECTIVES)}",
]


def read_sentence(rng: np.random.Generator) -> Prompt:
    """A read sentence: one or two clauses, a question, or a clause with a fronted adverbial."""
    r = rng.random()
    if r < 0.35:
        text = _clause(rng) + "."
    elif r < 0.65:
        text = f"{_clause(rng)}, {_pick(rng, CONJ)} {_clause(rng)}."
    elif r < 0.8:
        text = _pick(rng, _QUESTIONS)(rng) + "?"
    elif r < 0.9:
        text = f"{_pick(rng, ['yesterday', 'on ' + _pick(rng, DAYS), 'in ' + _pick(rng, MONTHS), 'suddenly', 'as usual', 'after a while'])}, {_clause(rng)}."
    else:
        text = f"{_clause(rng)}, and {_clause(rng)}, {_pick(rng, CONJ)} {_clause(rng)}."
    text = text[0].upper() + text[1:]
    return Prompt("read", text, transcript(text))


def text_pool(words: str) -> str:
    """Which split's pool a read sentence belongs to: 90% train, 5% dev, 5% test, by a hash of the transcript.

    Draws for dev/test reject sentences from other pools, so no dev/test sentence can occur in train.
    """
    h = int.from_bytes(hashlib.sha1(words.encode("utf-8")).digest()[:4], "big") % 100
    return "train" if h < 90 else ("dev" if h < 95 else "test")


# --------------------------------------------------------------------------------------------- keywords

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
KW_LABELS = KEYWORDS + ("_unknown_", "_silence_")
# Speech Commands' auxiliary words (plus a few more), all outside the keyword set.
UNKNOWN_WORDS = tuple(_W("""bed bird cat dog eight five four happy house marvin nine one seven sheila six three
tree two wow zero learn follow forward backward visual maybe hello window""")) 


def keyword_prompt(rng: np.random.Generator, p_unknown: float = 0.2, p_silence: float = 0.08) -> Prompt:
    """A one-word clip: a keyword, an unknown word (``_unknown_``) or nothing (``_silence_``)."""
    r = rng.random()
    if r < p_silence:
        return Prompt("kw", "", "", "_silence_")
    if r < p_silence + p_unknown:
        w = _pick(rng, UNKNOWN_WORDS)
        return Prompt("kw", w, transcript(w), "_unknown_")
    w = _pick(rng, KEYWORDS)
    return Prompt("kw", w, transcript(w), w)


# --------------------------------------------------------------------------------------------- intents

INTENT_ACTIONS = ("activate", "deactivate", "increase", "decrease", "change_language", "bring")
INTENT_OBJECTS = ("none", "music", "lights", "volume", "heat", "lamp", "newspaper", "juice", "socks", "shoes",
                  "Chinese", "Korean", "English", "German")
INTENT_LOCATIONS = ("none", "kitchen", "bedroom", "washroom")

_ROOM_PHRASES = {"kitchen": ["in the kitchen", "kitchen"], "bedroom": ["in the bedroom", "bedroom"],
                 "washroom": ["in the washroom", "washroom", "in the bathroom", "bathroom"]}


def _intent_phrasings(action: str, obj: str, loc: str) -> list[str]:
    """Several ways to say one (action, object, location) intent, FSC style."""
    room = _ROOM_PHRASES.get(loc, [""])
    out: list[str] = []
    if action in ("activate", "deactivate"):
        onoff = "on" if action == "activate" else "off"
        for rp in room:
            if rp.startswith("in "):  # "in the kitchen": after the object
                out += [f"turn {onoff} the {obj} {rp}", f"switch {onoff} the {obj} {rp}", f"{obj} {onoff} {rp}"]
            else:  # "kitchen" (or nothing): a modifier before the object
                pre = (rp + " ") if rp else ""
                out += [f"turn {onoff} the {pre}{obj}", f"switch {onoff} the {pre}{obj}", f"{pre}{obj} {onoff}",
                        f"turn the {pre}{obj} {onoff}"]
        if obj == "music":
            out += ["start the music", "play the music"] if onoff == "on" else ["stop the music", "pause the music"]
    elif action in ("increase", "decrease"):
        verb, adv = ("increase", "up") if action == "increase" else ("decrease", "down")
        more = {"heat": ("hotter" if adv == "up" else "cooler"), "volume": ("louder" if adv == "up" else "quieter")}
        for rp in room:
            in_room = rp if rp.startswith("in ") or not rp else "in the " + rp
            out += [f"{verb} the {obj} {in_room}".strip(), f"turn the {obj} {adv} {in_room}".strip(),
                    f"{obj} {adv} {in_room}".strip()]
            if obj in more:
                out.append(f"make it {more[obj]} {in_room}".strip())
        if obj == "volume":
            out.append("turn it up" if adv == "up" else "turn it down")
    elif action == "change_language":
        if obj == "none":
            out += ["change the language", "switch language", "use a different language", "language settings"]
        else:
            out += [f"switch to {obj}", f"change the language to {obj}", f"set my device to {obj}",
                    f"{obj} please", f"use {obj}"]
    elif action == "bring":
        out += [f"bring me my {obj}", f"get me the {obj}", f"fetch the {obj}", f"go get my {obj}",
                f"i need my {obj}", f"bring the {obj}"]
    return out


def _make_intents() -> list[tuple[str, str, str]]:
    devices = ("lights", "lamp", "music", "heat")
    ints: list[tuple[str, str, str]] = []
    for act in ("activate", "deactivate"):
        ints += [(act, "lights", loc) for loc in INTENT_LOCATIONS]
        ints += [(act, o, "none") for o in devices if o != "lights"]
    for act in ("increase", "decrease"):
        ints += [(act, "heat", loc) for loc in INTENT_LOCATIONS]
        ints += [(act, "volume", "none")]
    ints += [("change_language", o, "none") for o in ("none", "Chinese", "Korean", "English", "German")]
    ints += [("bring", o, "none") for o in ("newspaper", "juice", "socks", "shoes")]
    return ints


INTENTS: tuple[tuple[str, str, str], ...] = tuple(_make_intents())


def intent_prompt(rng: np.random.Generator) -> Prompt:
    """A spoken command; its label is ``"action object location"`` (three fields, ``none`` when absent)."""
    action, obj, loc = _pick(rng, INTENTS)
    text = _pick(rng, _intent_phrasings(action, obj, loc))
    return Prompt("intent", text, transcript(text), f"{action} {obj} {loc}")
