"""RULER's synthetic tasks (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?", github.com/NVIDIA/RULER): eight needle-in-a-haystack variants, variable tracking, common words extraction
and frequent words extraction, with RULER's templates for base models (the answer prefix ends the prompt) and its
string_match_all score: the share of the expected strings found in the continuation, case-insensitive.

Needle retrieval (niah_*). A needle is "One of the special magic {numbers|uuids} for {key} is: {value}."; keys are
adjective-noun words ("quick-lobster") or uuids, values 7-digit numbers or uuids. The haystack is RULER's noise
paragraph repeated (units joined by newlines), an essay cut into sentences (units joined by spaces; `haystack`, else
the built-in ESSAY) or distractor needles with other keys. Needles go between units: the others at uniformly random
depths of the haystack, then the target needle (the one holding the first answer) at the boundary where the share of
the rest of the context before it is nearest `depth`. Sample.depth is where it landed: tokens of the context before
it / tokens of the context other than it, so 0 is the start and 1 is right before the question.

    task             haystack  key    value    needles        asked   answers
    niah_single_1    noise     word   number   1              1       1
    niah_single_2    essay     word   number   1              1       1
    niah_single_3    essay     word   uuid     1              1       1
    niah_multikey_1  essay     word   number   4 keys         1       1
    niah_multikey_2  needles   word   number   1              1       1
    niah_multikey_3  needles   uuid   uuid     1              1       1
    niah_multivalue  essay     word   number   1 key × 4      1       4 (all values of the key)
    niah_multiquery  essay     word   number   4 keys         4       4 (one value per key)

Variable tracking (vt). One chain of 4 hops, "VAR A = 12345", "VAR B = VAR A", ..., "VAR E = VAR D", its statements
in order at random places among noise paragraphs; the answer is the 5 variables that hold the value. As in RULER,
a worked example (3-letter variables, a few noise paragraphs) precedes the question.

Common words extraction (cwe). A numbered list in which 10 common words appear 30 times each and every other word 3
times (6 and 1 below 4096 tokens, RULER's short setting); the answer is the 10 common words. A worked example (40
words repeated 10 / 3 times, or 20 words 3 / 1) precedes it, as in RULER. Words are plain English words, then
adjective-noun and verb-noun compounds once the plain ones are used up.

Frequent words extraction (fwe). V = max(5, length // 50) random 6-letter coded words w_1..w_V; of n words drawn,
w_k appears floor(n · k^-α / ζ(α)) times, α = 2, shuffled. w_1 is replaced by "..." (noise the prompt says to
ignore), so the answer is w_2, w_3, w_4.

Each prompt is as long as fits in `length` tokens (BOS included): the number of units (haystack units, noise
paragraphs, list entries, coded words) is the largest that fits. Unlike RULER, `length` counts the prompt only, not
the tokens to generate (MAX_NEW_TOKENS, RULER's tokens_to_generate).
"""

from collections.abc import Callable, Collection, Sequence
import dataclasses
import functools
import numbers
import re
import string
import uuid

import numpy as np

from longctx.data import Tokenizer
from longctx.data.tokenizers import ANSWER_MARK
from longctx.eval.tasks import Sample, check_lengths, fit_to_length, string_match_all

TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
         "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
MAX_NEW_TOKENS = {**{name: 128 for name in TASKS if name.startswith("niah_")}, "vt": 30, "cwe": 120, "fwe": 50}

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NIAH_TEMPLATE = ("Some special magic {kind} are hidden within the following text. Make sure to memorize it. I will "
                 "quiz you about the {kind} afterwards.\n{context}\nWhat are all the special magic {kind} for {query} "
                 "mentioned in the provided text?" + ANSWER_MARK + " The special magic {kind} for {query} mentioned in "
                 "the provided text are")
# RULER's template when one value is asked for: "Some" → "A", "are all" → "is", "are" → "is", the kind singular.
NIAH_TEMPLATE_ONE = ("A special magic {kind} is hidden within the following text. Make sure to memorize it. I will "
                     "quiz you about the {kind} afterwards.\n{context}\nWhat is the special magic {kind} for {query} "
                     "mentioned in the provided text?" + ANSWER_MARK + " The special magic {kind} for {query} "
                     "mentioned in the provided text is")
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {value} in the text above." + ANSWER_MARK
               + " Answer: According to the chain(s) of variable assignment in the text above, {num_variables} "
               "variables are assigned the value {value}, they are:")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize "
                "the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the "
                "above list?" + ANSWER_MARK + " Answer: The top 10 words that appear most often in the list are:")
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
                "the dots '....'. What are the three most frequently appeared words in the above coded text?"
                + ANSWER_MARK + " Answer: According to the coded text above, the three most frequently appeared words "
                "are:")

VT_NUM_HOPS = 4
VT_EXAMPLE_NOISE = 5  # noise paragraphs in the worked example (RULER fills it to 500 tokens)
CWE_NUM_COMMON = 10
CWE_LONG = 4096  # from this length on, RULER's cwe repeats common / other words 30 / 3 times, below it 6 / 1
FWE_ALPHA = 2.0
FWE_WORD_LENGTH = 6
FWE_NUM_ANSWERS = 3

ESSAY = """\
The town sat where two slow rivers met, and most of its streets ran down toward the water. \
Long before anyone drew a map of it, people came there to trade wool, salt and timber. \
The oldest houses stood close together, their windows looking out on the river. \
In winter the fog rose from the water and stayed in the lanes until the middle of the day. \
Children learned early which stones on the bank were safe to stand on and which ones moved. \
The baker opened before sunrise, and the smell of warm bread reached the bridge by dawn. \
Farmers crossed that bridge with carts of apples, cabbages and sacks of grain. \
On market days the square filled with voices, and nobody could hear the church bell at all. \
A small library stood at the corner of the square, built of grey stone and covered in ivy. \
Its reading room had tall shelves, a long oak table and a stove that was lit every morning. \
The librarian knew every reader by name and remembered which books each of them liked. \
She believed that a good book should be lent, not kept, and she rarely charged a fine. \
Students came in the afternoon to copy passages from old atlases and books of poems. \
Some of them drew careful maps of the rivers, marking each mill, ferry and ford. \
Others simply sat by the window and watched the boats go slowly past. \
In spring the rivers rose, and the lower streets were sometimes under a hand of water. \
The people moved their furniture upstairs, waited a few days, and then swept out the mud. \
Nobody complained much, because the same water that flooded the town also made it rich. \
The mills along the bank ground flour for villages many miles away. \
Their wheels turned day and night, and their sound was the first thing a visitor noticed. \
In summer the evenings were long, and families walked along the towpath after supper. \
Old men sat on benches and argued about the weather, the price of bread and the news. \
Young people rowed small boats upstream and let the current carry them home again. \
When autumn came, the trees on the hills turned gold and then brown. \
The harvest was brought in, the barns were full, and the town prepared for the cold. \
Wood was stacked against every wall, and the smoke of chimneys hung over the roofs. \
The library stayed open late in those months, and its lamps were the brightest on the square. \
Travellers who stopped for a night often said that the town seemed older than its stones. \
Perhaps they meant that its habits had not changed much in a very long time. \
People still greeted each other on the bridge and still read by the stove. \
A town like that does not need to be famous to be remembered by those who lived there. \
It is enough that the rivers keep meeting, and that someone keeps the lamps lit in the evening."""

ADJECTIVES = (
    "able", "ancient", "bitter", "brave", "bright", "broad", "busy", "calm", "careful", "cheap", "clean", "clever",
    "cold", "cool", "crisp", "curious", "damp", "dark", "deep", "dry", "dusty", "eager", "early", "easy", "empty",
    "fair", "famous", "fancy", "fast", "fierce", "flat", "fresh", "friendly", "gentle", "giant", "glad", "golden",
    "grand", "great", "green", "happy", "hard", "heavy", "hollow", "honest", "huge", "humble", "icy", "jolly", "keen",
    "kind", "large", "late", "lazy", "light", "little", "lively", "lonely", "loud", "lucky", "mighty", "modern",
    "narrow", "neat", "noble", "odd", "old", "pale", "plain", "polite", "proud", "quick", "quiet", "rapid", "rare",
    "red", "rich", "rough", "round", "royal", "rusty", "sad", "safe", "sharp", "shiny", "short", "silent", "silly",
    "simple", "slow", "small", "smooth", "soft", "solid", "sour", "spicy", "steady", "strange", "strong", "sweet",
    "swift", "tall", "tame", "tender", "thick", "thin", "tidy", "tiny", "warm", "wet", "wide", "wild", "wise", "young",
)
NOUNS = (
    "acorn", "anchor", "apple", "arrow", "badge", "banana", "barn", "basket", "beach", "bear", "bell", "bench",
    "berry", "bicycle", "blanket", "boat", "bottle", "bridge", "brush", "bucket", "butter", "button", "cabin",
    "cable", "camel", "candle", "canoe", "canyon", "carpet", "castle", "cave", "chair", "cherry", "chimney", "circle",
    "cliff", "clock", "cloud", "coast", "coin", "comet", "compass", "cookie", "copper", "cotton", "crayon", "crown",
    "cup", "curtain", "desert", "diamond", "dolphin", "door", "dragon", "drum", "eagle", "engine", "falcon",
    "feather", "fence", "field", "flag", "flute", "forest", "fountain", "fox", "garden", "garlic", "ginger",
    "glacier", "globe", "glove", "goat", "grape", "guitar", "hammer", "harbor", "helmet", "honey", "horse", "island",
    "jacket", "jar", "jungle", "kettle", "key", "kitten", "ladder", "lake", "lamp", "lantern", "leaf", "lemon",
    "lion", "lizard", "lobster", "magnet", "mango", "maple", "marble", "meadow", "mirror", "monkey", "moon",
    "mountain", "mushroom", "nest", "ocean", "olive", "onion", "orange", "otter", "owl", "oyster", "paddle", "palace",
    "panda", "parrot", "peach", "pebble", "pencil", "pepper", "piano", "pillow", "pine", "planet", "plum", "pocket",
    "pond", "potato", "pumpkin", "puzzle", "quilt", "rabbit", "radio", "raven", "ribbon", "river", "robot", "rocket",
    "saddle", "sail", "salmon", "sandal", "scarf", "seal", "shadow", "shell", "ship", "shovel", "silver", "sled",
    "snail", "spoon", "squirrel", "stable", "star", "statue", "stone", "storm", "sugar", "summit", "swan", "table",
    "teapot", "temple", "thunder", "tiger", "tomato", "tower", "tractor", "trail", "train", "tulip", "tunnel",
    "turtle", "umbrella", "valley", "velvet", "violin", "wagon", "walnut", "whale", "wheel", "whistle", "window",
    "wizard", "wolf", "zebra",
)
VERBS = (
    "admire", "bake", "balance", "borrow", "bounce", "breathe", "build", "carry", "chase", "climb", "collect", "cook",
    "count", "crawl", "dance", "deliver", "dig", "discover", "drift", "enjoy", "explore", "fetch", "fix", "float",
    "fold", "follow", "gather", "glow", "grow", "guard", "guess", "hang", "hike", "hop", "hum", "hunt", "imagine",
    "invent", "jog", "juggle", "jump", "knit", "laugh", "launch", "listen", "march", "measure", "melt", "mend",
    "obey", "observe", "offer", "open", "paint", "pause", "plant", "polish", "pour", "praise", "pretend", "pull",
    "push", "rattle", "repair", "rescue", "ride", "roll", "row", "scatter", "search", "shiver", "sing", "sketch",
    "skate", "sleep", "slide", "sneeze", "sparkle", "spin", "splash", "sprint", "squeeze", "stir", "stretch", "swim",
    "swing", "tickle", "travel", "tumble", "visit", "wander", "wave", "weave", "whisper", "wiggle", "wink", "wonder",
    "wrap", "yawn", "yell",
)


@dataclasses.dataclass(frozen=True)
class NiahSpec:
    """One needle task: haystack "noise" | "essay" | "needles"; key_kind "words" | "uuids"; value_kind "numbers" |
    "uuids"; num_keys needles' keys, num_values values per key, num_queries keys asked."""

    haystack: str
    key_kind: str
    value_kind: str
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1


NIAH = {
    "niah_single_1": NiahSpec("noise", "words", "numbers"),
    "niah_single_2": NiahSpec("essay", "words", "numbers"),
    "niah_single_3": NiahSpec("essay", "words", "uuids"),
    "niah_multikey_1": NiahSpec("essay", "words", "numbers", num_keys=4),
    "niah_multikey_2": NiahSpec("needles", "words", "numbers"),
    "niah_multikey_3": NiahSpec("needles", "uuids", "uuids"),
    "niah_multivalue": NiahSpec("essay", "words", "numbers", num_values=4),
    "niah_multiquery": NiahSpec("essay", "words", "numbers", num_keys=4, num_queries=4),
}


def build(tokenizer: Tokenizer, lengths: Sequence[int], *, num_samples: int = 1, seed: int = 0,
          tasks: Sequence[str] = TASKS, haystack: str | None = None,
          depths: Sequence[float] | None = None) -> list[Sample]:
    """Samples for every task × length (× depth for the niah tasks) × `num_samples`, in that order.

    Sample i of a task at a length is the same at every depth (same keys, values and haystack; only the target needle
    moves), and depends on nothing but (seed, task, length, i). `depths` (in [0, 1]) places the target needle of the
    niah tasks; None draws one uniformly per sample. vt, cwe and fwe have no single needle: Sample.depth is None and
    they are built once per length and sample. `haystack` is the essay text of the essay-haystack tasks (ESSAY when
    None), cut into sentences and repeated as needed.
    """
    check_lengths(lengths)
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks must be a non-empty sequence of names from {', '.join(TASKS)}; got {tasks!r}")
    for name in tasks:
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; RULER's tasks are {', '.join(TASKS)}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if depths is not None and (len(depths) == 0 or any(not 0.0 <= float(d) <= 1.0 for d in depths)):
        raise ValueError(f"depths must be None or floats in [0, 1], got {list(depths)}")
    sentences = split_sentences(ESSAY if haystack is None else haystack)
    if not sentences:
        raise ValueError("haystack holds no text to cut into sentences")

    samples = []
    for name in tasks:
        for length in lengths:
            for depth in (depths or [None]) if name in NIAH else [None]:
                for index in range(num_samples):
                    rng = np.random.default_rng([seed, TASKS.index(name), length, index])
                    if name in NIAH:
                        samples.append(niah_sample(name, tokenizer, length, rng, depth, sentences))
                    else:
                        samples.append({"vt": vt_sample, "cwe": cwe_sample, "fwe": fwe_sample}[name](
                            tokenizer, length, rng))
    return samples


def score(prediction: str, sample: Sample) -> float:
    """RULER's string_match_all: the share of `sample.answers` that `prediction` contains, case-insensitive."""
    if sample.task.removeprefix("ruler/") not in TASKS or not sample.task.startswith("ruler/"):
        raise ValueError(f"sample.task {sample.task!r} is not a RULER task (ruler/<name>, name in {', '.join(TASKS)})")
    return string_match_all(prediction, sample.answers)


def split_sentences(text: str) -> list[str]:
    """`text` with whitespace collapsed, cut after '.', '!' or '?' where the next word starts with a capital, a digit
    or an opening quote or bracket (a stand-in for RULER's nltk sent_tokenize)."""
    text = " ".join(text.split())
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])", text) if s]


class Units:
    """Haystack units made on demand, `make(i)` the i-th, with their token counts (each counted with its separator,
    alone: for a subword tokenizer an estimate, used only to pick where needles go)."""

    def __init__(self, tokenizer: Tokenizer, separator: str, make: Callable[[int], str]):
        self.tokenizer, self.separator, self.make = tokenizer, separator, make
        self.texts: list[str] = []
        self.counts: list[int] = []
        self._count_of: dict[str, int] = {}

    def take(self, n: int) -> tuple[list[str], np.ndarray]:
        """(the first n units, token offsets [n + 1] of the boundaries before each unit and after the last)."""
        while len(self.texts) < n:
            text = self.make(len(self.texts))
            if text not in self._count_of:
                self._count_of[text] = len(self.tokenizer.encode(text + self.separator))
            self.texts.append(text)
            self.counts.append(self._count_of[text])
        return self.texts[:n], np.concatenate([[0], np.cumsum(self.counts[:n])])


def fit(name: str, render: Callable[[int], str], tokenizer: Tokenizer, length: int, *, limit: int,
        material: str) -> int:
    """The largest n <= limit whose `render(n)` fits in `length` tokens with BOS (doubling, then `fit_to_length`'s
    bisection). Raises ValueError naming the task and length when nothing fits or `limit` units do not fill it."""
    upper = 1
    while upper < limit and len(tokenizer.prompt(render(upper))) <= length:
        upper = min(2 * upper, limit)
    try:
        n, _ = fit_to_length(render, tokenizer, length, upper=upper)
    except ValueError as error:
        raise ValueError(f"ruler/{name}: {error}") from None
    if n == limit:
        raise ValueError(f"ruler/{name}: length {length} needs more than the {limit} {material} there are")
    return n


def random_number(rng: np.random.Generator) -> str:
    return str(rng.integers(10**6, 10**7))  # 7 digits, as RULER's


def random_uuid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def random_key_word(rng: np.random.Generator) -> str:
    return f"{ADJECTIVES[rng.integers(len(ADJECTIVES))]}-{NOUNS[rng.integers(len(NOUNS))]}"


def random_of(kind: str, rng: np.random.Generator) -> str:
    return {"numbers": random_number, "uuids": random_uuid, "words": random_key_word}[kind](rng)


def distinct(make: Callable[[], str], count: int, *, avoid: Collection[str] = ()) -> list[str]:
    """`count` different results of `make()`, none in `avoid`."""
    drawn: list[str] = []
    while len(drawn) < count:
        item = make()
        if item not in drawn and item not in avoid:
            drawn.append(item)
    return drawn


def listed(items: Sequence[str]) -> str:
    """Several queries as RULER writes them: "a, b, and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


def niah_sample(name: str, tokenizer: Tokenizer, length: int, rng: np.random.Generator, depth: float | None,
                sentences: list[str]) -> Sample:
    spec = NIAH[name]
    keys = distinct(lambda: random_of(spec.key_kind, rng), spec.num_keys)
    values = [distinct(lambda: random_of(spec.value_kind, rng), spec.num_values) for _ in keys]
    needles = [NEEDLE.format(kind=spec.value_kind, key=key, value=value)
               for key, key_values in zip(keys, values) for value in key_values]
    asked = [int(i) for i in rng.permutation(spec.num_keys)[:spec.num_queries]]
    answers = [value for i in asked for value in values[i]]
    target = asked[0] * spec.num_values  # the needle holding answers[0]
    drawn_depth = float(rng.uniform())  # drawn either way, so what follows is the same at every depth
    requested = drawn_depth if depth is None else float(depth)
    needle_depths = [requested if i == target else float(rng.uniform()) for i in range(len(needles))]

    if spec.haystack == "noise":
        units = Units(tokenizer, "\n", lambda i: NOISE)
    elif spec.haystack == "essay":
        units = Units(tokenizer, " ", lambda i: sentences[i % len(sentences)])
    else:
        distractor_rng = np.random.default_rng(rng.integers(2**63))

        def distractor(i: int) -> str:  # made in order of i, so the first n are the same whatever n is asked
            key = distinct(lambda: random_of(spec.key_kind, distractor_rng), 1, avoid=set(keys))[0]
            return NEEDLE.format(kind=spec.value_kind, key=key, value=random_of(spec.value_kind, distractor_rng))

        units = Units(tokenizer, "\n", distractor)
    needle_counts = [len(tokenizer.encode(needle + units.separator)) for needle in needles]

    def context_of(n: int) -> str:
        """The other needles at the haystack boundaries nearest their depths, then the target at the boundary of
        that sequence nearest `requested`."""
        texts, offsets = units.take(n)
        items = list(zip(texts, np.diff(offsets)))
        for i in sorted((i for i in range(len(needles)) if i != target), key=lambda i: -needle_depths[i]):
            boundary = int(np.argmin(np.abs(offsets - needle_depths[i] * offsets[-1])))
            items.insert(boundary, (needles[i], needle_counts[i]))
        item_offsets = np.concatenate([[0], np.cumsum([count for _, count in items])])
        items.insert(int(np.argmin(np.abs(item_offsets - requested * item_offsets[-1]))), (needles[target], 0))
        return units.separator.join(text for text, _ in items)

    singular = spec.num_queries * spec.num_values == 1
    template, kind = (NIAH_TEMPLATE_ONE, spec.value_kind[:-1]) if singular else (NIAH_TEMPLATE, spec.value_kind)
    query = listed([keys[i] for i in asked])

    def render(n: int) -> str:
        return template.format(kind=kind, context=context_of(n), query=query)

    n = fit(name, render, tokenizer, length, limit=length, material="haystack units")
    context = context_of(n)
    start = context.index(needles[target])
    before = len(tokenizer.encode(context[:start]))
    after = len(tokenizer.encode(context[start + len(needles[target]):]))
    info = {"haystack": spec.haystack, "keys": keys, "values": values, "queries": [keys[i] for i in asked],
            "num_needles": len(needles), "requested_depth": requested, "num_units": n}
    return Sample(f"ruler/{name}", tokenizer.prompt(render(n)), tuple(answers), length,
                  before / (before + after) if before + after else 0.0, MAX_NEW_TOKENS[name], info)


def vt_chain(variables: Sequence[str], value: str) -> list[str]:
    return [f"VAR {variables[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in zip(variables, variables[1:])]


def with_statements(noise_count: int, statements: Sequence[str], fractions: Sequence[float]) -> str:
    """`noise_count` noise paragraphs with `statements` in order between them, statement j after
    floor(fractions[j] · (noise_count + 1)) paragraphs (fractions sorted, in [0, 1)); lines joined by newlines."""
    lines, done = [], 0
    for statement, fraction in zip(statements, fractions):
        boundary = min(int(fraction * (noise_count + 1)), noise_count)
        lines += [NOISE] * (boundary - done) + [statement]
        done = boundary
    return "\n".join(lines + [NOISE] * (noise_count - done))


def vt_sample(tokenizer: Tokenizer, length: int, rng: np.random.Generator) -> Sample:
    def letters(k: int) -> str:
        return "".join(rng.choice(list(string.ascii_uppercase), k))

    variables = distinct(lambda: letters(5), VT_NUM_HOPS + 1)
    value = str(rng.integers(10000, 100000))
    example_variables = distinct(lambda: letters(3), VT_NUM_HOPS + 1)
    example_value = distinct(lambda: str(rng.integers(10000, 100000)), 1, avoid={value})[0]
    example_context = with_statements(VT_EXAMPLE_NOISE, vt_chain(example_variables, example_value),
                                      np.sort(rng.uniform(size=VT_NUM_HOPS + 1)))
    example = (VT_TEMPLATE.format(context=example_context, value=example_value, num_variables=VT_NUM_HOPS + 1)
               + " " + " ".join(example_variables) + "\n").replace(ANSWER_MARK, "")  # the worked example: all asked
    fractions = np.sort(rng.uniform(size=VT_NUM_HOPS + 1))

    def render(n: int) -> str:
        context = with_statements(n, vt_chain(variables, value), fractions)
        return example + VT_TEMPLATE.format(context=context, value=value, num_variables=VT_NUM_HOPS + 1)

    n = fit("vt", render, tokenizer, length, limit=length, material="noise paragraphs")
    info = {"value": value, "variables": variables, "num_chains": 1, "num_hops": VT_NUM_HOPS, "num_noise": n}
    return Sample("ruler/vt", tokenizer.prompt(render(n)), tuple(variables), length, None, MAX_NEW_TOKENS["vt"],
                  info)


@functools.cache
def cwe_words() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(plain words, compound words) that cwe's lists draw from, plain ones first."""
    plain = tuple(sorted(set(ADJECTIVES) | set(NOUNS) | set(VERBS)))
    compounds = tuple(f"{a}-{b}" for a in ADJECTIVES + VERBS for b in NOUNS)
    return plain, compounds


def numbered(words: Sequence[str]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


def cwe_sample(tokenizer: Tokenizer, length: int, rng: np.random.Generator) -> Sample:
    plain, compounds = cwe_words()
    words = [plain[i] for i in rng.permutation(len(plain))] + [compounds[i] for i in rng.permutation(len(compounds))]
    long = length >= CWE_LONG
    common_repeats, other_repeats = (30, 3) if long else (6, 1)
    example_size, example_common_repeats, example_other_repeats = (40, 10, 3) if long else (20, 3, 1)
    common, example_words = words[:CWE_NUM_COMMON], words[CWE_NUM_COMMON:CWE_NUM_COMMON + example_size]
    others = words[CWE_NUM_COMMON + example_size:]

    example_list = (example_words[:CWE_NUM_COMMON] * example_common_repeats
                    + example_words[CWE_NUM_COMMON:] * example_other_repeats)
    example_list = [example_list[i] for i in rng.permutation(len(example_list))]
    example = (CWE_TEMPLATE.format(context=numbered(example_list)) + " "
               + numbered(example_words[:CWE_NUM_COMMON]) + "\n").replace(ANSWER_MARK, "")
    shuffle_seed = int(rng.integers(2**63))

    def render(n: int) -> str:
        entries = common * common_repeats + others[:n] * other_repeats
        order = np.random.default_rng(shuffle_seed).permutation(len(entries))
        return example + CWE_TEMPLATE.format(context=numbered([entries[i] for i in order]))

    n = fit("cwe", render, tokenizer, length, limit=len(others), material="distinct words (plain and compound)")
    info = {"common_words": common, "num_words": CWE_NUM_COMMON + n, "common_repeats": common_repeats,
            "other_repeats": other_repeats}
    return Sample("ruler/cwe", tokenizer.prompt(render(n)), tuple(common), length, None, MAX_NEW_TOKENS["cwe"],
                  info)


def zeta(alpha: float, terms: int = 100_000) -> float:
    """Riemann ζ(alpha) = Σ_k k^-alpha, alpha > 1: `terms` terms plus the tail ∫_{terms+1/2}^∞ x^-alpha dx."""
    k = np.arange(1, terms + 1, dtype=np.float64)
    return float(np.sum(k**-alpha) + (terms + 0.5) ** (1 - alpha) / (alpha - 1))


def fwe_counts(n: int, vocab_size: int) -> np.ndarray:
    """floor(n · k^-α / ζ(α)) for ranks k = 1..vocab_size: how often each coded word appears among n drawn."""
    ranks = np.arange(1, vocab_size + 1, dtype=np.float64)
    return np.floor(n * ranks**-FWE_ALPHA / zeta(FWE_ALPHA)).astype(np.int64)


def fwe_sample(tokenizer: Tokenizer, length: int, rng: np.random.Generator) -> Sample:
    vocab_size = max(FWE_NUM_ANSWERS + 2, length // 50)
    vocab = ["..."] + distinct(lambda: "".join(rng.choice(list(string.ascii_lowercase), FWE_WORD_LENGTH)),
                               vocab_size - 1)
    answers = vocab[1:1 + FWE_NUM_ANSWERS]
    shuffle_seed = int(rng.integers(2**63))

    def render(n: int) -> str:
        words = np.repeat(np.array(vocab, dtype=object), fwe_counts(n, vocab_size))
        return FWE_TEMPLATE.format(context=" ".join(np.random.default_rng(shuffle_seed).permutation(words)))

    n = fit("fwe", render, tokenizer, length, limit=4 * length, material="coded words")
    counts = fwe_counts(n, vocab_size)
    if counts[FWE_NUM_ANSWERS] <= counts[FWE_NUM_ANSWERS + 1]:
        raise ValueError(f"ruler/fwe: length {length} is too short: its {n} coded words leave the "
                         f"{FWE_NUM_ANSWERS} most frequent tied with the next ({counts[1:FWE_NUM_ANSWERS + 2]} times)")
    info = {"coded_words": answers, "num_words": n, "vocab_size": vocab_size, "alpha": FWE_ALPHA}
    return Sample("ruler/fwe", tokenizer.prompt(render(n)), tuple(answers), length, None, MAX_NEW_TOKENS["fwe"],
                  info)
