"""Pass-key retrieval: a random number hidden at a chosen depth of repeated filler, asked for at the end.

The test of Mohtashami & Jaggi, "Landmark Attention: Random-Access Infinite Context Length for Transformers" (2023),
as Position Interpolation (Chen et al., 2023), LongLoRA (Chen et al., 2023) and YaRN (Peng et al., 2023) run it:

    INTRO + FILLER × k + NEEDLE(key) + FILLER × (n − k) + QUESTION        → the model should continue " {key}"

with n the most filler units that fit `length` tokens (BOS included) and k = round(depth × n). The key has `digits`
digits, no leading zero, drawn from (seed, length, depth, sample index), so adding a length or a depth to a grid
leaves the other cells' keys as they were. Scoring is exact match of the first run of digits in the continuation.
`training_text` writes the same prompt with its answer, to mix retrieval into the training data.
"""

from collections.abc import Callable, Sequence
import functools
import re

import numpy as np

from longctx.data import Tokenizer
from longctx.data.tokenizers import ANSWER_MARK
from longctx.eval.tasks import Sample, check_grid, fit_to_length

TASK = "passkey"
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz "
         "you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key?" + ANSWER_MARK + " The pass key is"


def random_key(rng: np.random.Generator, digits: int) -> str:
    """A `digits`-digit decimal string without a leading zero."""
    return str(rng.integers(1, 10)) + "".join(str(d) for d in rng.integers(0, 10, size=digits - 1))


def render(key: str, depth: float, num_filler: int) -> str:
    """The prompt text with `num_filler` filler units, round(depth × num_filler) of them before the needle."""
    before = round(depth * num_filler)
    return INTRO + FILLER * before + NEEDLE.format(key=key) + FILLER * (num_filler - before) + QUESTION


def fit_filler(render_filler: Callable[[int], str], tokenizer: Tokenizer, length: int) -> tuple[int, np.ndarray]:
    """`fit_to_length` over filler units, searched from the count the units' token length predicts (the filler
    tokenizes alike each time it repeats): steps out from it, doubling, to an n that fits and one that does not, so a
    32K prompt takes a few tokenizations instead of a binary search from zero."""
    def fits(n: int) -> bool:
        return len(tokenizer.prompt(render_filler(n))) <= length

    unit_tokens = max(1, len(tokenizer.encode(FILLER * 2)) - len(tokenizer.encode(FILLER)))
    lower = max(0, (length - len(tokenizer.prompt(render_filler(0)))) // unit_tokens)
    step = 1
    while lower > 0 and not fits(lower):
        lower, step = max(0, lower - step), step * 2
    upper, step = lower + 1, 1
    while fits(upper):
        lower, upper, step = upper, upper + step, step * 2
    return fit_to_length(render_filler, tokenizer, length, upper=upper, lower=lower)


def build(tokenizer: Tokenizer, lengths: Sequence[int], depths: Sequence[float], *, num_samples: int = 1,
          seed: int = 0, digits: int = 5) -> list[Sample]:
    """`num_samples` pass-key samples for every (length, depth), in that order (length outermost).

    info: "key"; "needle_position": the token index where the needle starts (the tokens of BOS + the text before
    it); "requested_depth"; "num_filler": n. Sample.depth is the requested depth (the needle follows round(depth × n)
    of the n filler units).
    """
    check_grid(lengths, depths)
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    if digits < 1:
        raise ValueError(f"digits must be at least 1, got {digits}")
    samples = []
    for length in lengths:
        for depth in depths:
            for index in range(num_samples):
                rng = np.random.default_rng([seed, length, round(depth * 10**6), index])
                key = random_key(rng, digits)
                num_filler, prompt = fit_filler(functools.partial(render, key, depth), tokenizer, length)
                before = round(depth * num_filler)
                needle_position = len(tokenizer.prompt(INTRO + FILLER * before, whole=False))
                samples.append(Sample(
                    task=TASK, prompt=prompt, answers=(key,), length=int(length), depth=float(depth),
                    max_new_tokens=digits + 2,
                    info={"key": key, "needle_position": needle_position, "requested_depth": float(depth),
                          "num_filler": num_filler},
                ))
    return samples


def score(prediction: str, sample: Sample) -> float:
    """1.0 if the first run of digits in `prediction` is the key (" 12345." scores 1; "1234", "123456" score 0)."""
    first_digits = re.search(r"\d+", prediction)
    return float(first_digits is not None and first_digits.group() == sample.info["key"])


def training_text(tokenizer: Tokenizer, length: int, rng: np.random.Generator, *, digits: int = 5) -> str:
    """A pass-key prompt and its answer " {key}.", as a training document's text: framed by packing with BOS and EOS
    (`longctx.data.tokenize_documents`), it has at most `length` tokens.

    The needle's depth is uniform in [0, 1] and the filler count uniform between a quarter of the most that fits and
    the most that fits, so documents run from about length / 4 to `length` tokens.
    """
    key = random_key(rng, digits)
    depth = float(rng.uniform())
    most, _ = fit_filler(lambda n: render(key, depth, n) + f" {key}.", tokenizer, length - 1)  # EOS follows
    num_filler = int(rng.integers(most // 4, most + 1))
    return (render(key, depth, num_filler) + f" {key}.").replace(ANSWER_MARK, "")
