"""What every generation task shares: the `Sample` a task builds, fitting a prompt to a length in tokens, and the
answer normalisation and string-match scores that the retrieval tasks use.

A task module (passkey.py, niah.py, ruler.py, longbench.py) builds samples with a function returning
`list[Sample]` and scores a model's greedy continuation with `score(prediction, sample) -> float` in [0, 1]. The
suite generates for every sample through the KV cache (`longctx.infer.generate`) and averages scores by
(task, length, depth).
"""

from collections.abc import Callable, Sequence
import dataclasses
import numbers
import re
import string

import numpy as np

from longctx.data import Tokenizer


@dataclasses.dataclass(frozen=True)
class Sample:
    """One prompt and what a right answer contains.

    task: the task's name as reports show it ("passkey", "niah", "ruler/niah_multikey", "longbench/qasper", ...).
    prompt: int32 token ids [n] the model reads (`Tokenizer.prompt`: BOS first, or a chat template's), n <= length.
    answers: every expected string; how they are matched is the task's `score`.
    length: the context length (tokens) the sample was built for: the column of the length × depth grid.
    depth: where the needle sits in the context, 0 (start) .. 1 (end); None where a task has no single needle.
    max_new_tokens: how many tokens to generate.
    info: anything else the scorer or the report needs (JSON-able).
    """

    task: str
    prompt: np.ndarray
    answers: tuple[str, ...]
    length: int
    depth: float | None
    max_new_tokens: int
    info: dict = dataclasses.field(default_factory=dict)


def check_lengths(lengths: Sequence[int]) -> None:
    """Raises ValueError unless `lengths` is a non-empty sequence of positive integers (tokens)."""
    if isinstance(lengths, (str, numbers.Integral)) or not lengths or any(
            isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1 for n in lengths):
        raise ValueError(f"lengths must be a non-empty sequence of ints >= 1, got {lengths!r}")


def check_grid(lengths: Sequence[int], depths: Sequence[float]) -> None:
    """Raises ValueError unless `lengths` are positive integers and `depths` lie in [0, 1] (both non-empty)."""
    check_lengths(lengths)
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must be a non-empty list of floats in [0, 1] (0 = start, 1 = end), "
                         f"got {list(depths)}")


def fit_to_length(render: Callable[[int], str], tokenizer: Tokenizer, length: int, *,
                  upper: int, lower: int = 0) -> tuple[int, np.ndarray]:
    """(n, prompt): the largest n in [0, upper] whose `tokenizer.prompt(render(n))` has at most `length` tokens, and
    that prompt. `render(n)` must grow with n (n units of filler or haystack). Raises ValueError when even n = 0 does
    not fit: `length` is too short for the task's fixed text. `lower`: an n known to fit, where the search starts."""
    if lower == 0 and len(tokenizer.prompt(render(0))) > length:
        raise ValueError(f"length {length} is too short for this task's prompt even without filler "
                         f"({len(tokenizer.prompt(render(0)))} tokens)")
    low, high = lower, upper
    while low < high:  # invariant: render(low) fits
        mid = (low + high + 1) // 2
        if len(tokenizer.prompt(render(mid))) <= length:
            low = mid
        else:
            high = mid - 1
    return low, tokenizer.prompt(render(low))


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and the articles a/an/the removed, whitespace collapsed (SQuAD's normalisation, which
    LongBench and L-Eval use)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def string_match_all(prediction: str, answers: tuple[str, ...]) -> float:
    """Share of `answers` found in `prediction`, case-insensitive: RULER's string_match_all (a multi-value answer
    scores its fraction)."""
    prediction = prediction.lower()
    return sum(answer.lower() in prediction for answer in answers) / len(answers)


def string_match_any(prediction: str, answers: tuple[str, ...]) -> float:
    """1 if any of `answers` is in `prediction`, case-insensitive: RULER's string_match_part."""
    prediction = prediction.lower()
    return float(any(answer.lower() in prediction for answer in answers))
