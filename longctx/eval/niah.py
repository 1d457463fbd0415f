"""Needle in a haystack: one sentence hidden between the sentences of a real text, asked about at the end.

Kamradt (2023), "LLMTest_NeedleInAHaystack" (github.com/gkamradt/LLMTest_NeedleInAHaystack), run over a grid of
context lengths × depths. For a length L and a depth d:

1. The context is the haystack read from a sentence start (sample 0 from the haystack's start, samples 1.. from
   distinct sentence starts drawn by `seed`; copies joined by a space when the haystack is short), cut to the most
   characters for which context + needle + question fit L tokens (BOS included).
2. The needle goes at token d × len(context), moved back to the nearest preceding sentence start (after '.' and
   whitespace, or the start of the context), so it stands between two sentences.
3. The prompt is   context-with-needle + "\\n\\nQuestion: {question}\\nAnswer: {answer_prefix}"   and the model
   should continue with the answer.

Sample.depth is the depth reached, (tokens of context before the needle) / (tokens of context), which differs from
the requested one (info["requested_depth"]) by up to a sentence. `score` is the share of the answer's words in the
first line of the continuation (SQuAD normalisation); `exact_match` asks for the whole answer.
"""

from collections.abc import Sequence
import re

import numpy as np

from longctx.data import Tokenizer
from longctx.data.tokenizers import ANSWER_MARK
from longctx.eval.tasks import Sample, check_grid, fit_to_length, normalize_answer

TASK = "niah"
DEFAULT_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
DEFAULT_QUESTION = "What is the best thing to do in San Francisco?"
DEFAULT_ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day"
DEFAULT_ANSWER_PREFIX = "The best thing to do in San Francisco is"
SENTENCE_END = re.compile(r"\.\s+")


def sentence_starts(text: str) -> list[int]:
    """Character offsets where a sentence starts: 0 and the end of every '.' + whitespace run."""
    return [0] + [match.end() for match in SENTENCE_END.finditer(text)]


def question_suffix(question: str, answer_prefix: str) -> str:
    return f"\n\nQuestion: {question}{ANSWER_MARK}\nAnswer:" + (f" {answer_prefix}" if answer_prefix else "")


def haystack_from(text: str, offset: int, tokenizer: Tokenizer, min_tokens: int) -> str:
    """`text` read from character `offset` on, wrapping round to its start (copies joined by a space), cut to a
    prefix of at least `min_tokens` tokens (its character count doubled until it has them)."""
    source, chars = text[offset:], 4 * min_tokens
    while True:
        if len(source) < chars:
            copies = -(-(chars - len(source)) // (len(text) + 1))
            source += (" " + text) * copies
        if len(tokenizer.encode(source[:chars])) >= min_tokens:
            return source[:chars]
        chars *= 2


def needle_split(tokenizer: Tokenizer, context: str, depth: float) -> tuple[int, int, int]:
    """(character, tokens before, tokens of context): the last sentence start of `context` with at most
    depth × len(context tokens) tokens before it (binary search over sentence starts)."""
    context_tokens = len(tokenizer.encode(context))
    starts = sentence_starts(context)
    target = depth * context_tokens
    low, high = 0, len(starts) - 1  # invariant: starts[low] has at most `target` tokens before it
    while low < high:
        mid = (low + high + 1) // 2
        if len(tokenizer.encode(context[: starts[mid]])) <= target:
            low = mid
        else:
            high = mid - 1
    return starts[low], len(tokenizer.encode(context[: starts[low]])), context_tokens


def build(tokenizer: Tokenizer, lengths: Sequence[int], depths: Sequence[float], *, haystack: str,
          num_samples: int = 1, seed: int = 0, needle: str = DEFAULT_NEEDLE, question: str = DEFAULT_QUESTION,
          answer: str = DEFAULT_ANSWER, answer_prefix: str = DEFAULT_ANSWER_PREFIX) -> list[Sample]:
    """`num_samples` needle-in-a-haystack samples for every (length, depth), in that order (length outermost).

    Sample i reads the haystack from the same sentence start at every length and depth. info: "requested_depth";
    "needle_position": the token index where the needle starts (tokens of BOS + the text before it);
    "haystack_offset": the character of `haystack` the context starts at; "context_tokens".
    """
    check_grid(lengths, depths)
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    text = haystack.strip()
    if not text:
        raise ValueError("haystack is empty; pass a text of several sentences (e.g. Paul Graham's essays)")
    if not SENTENCE_END.search(text + " "):
        raise ValueError(f"haystack has no sentence end ('.' followed by whitespace) to put the needle after; pass "
                         f"a text of several sentences (starts with {text[:60]!r})")
    if not needle.strip():
        raise ValueError("needle is empty; pass the sentence to hide")
    if not normalize_answer(answer):
        raise ValueError(f"answer {answer!r} has no words left after normalisation; pass the expected answer text")
    later_starts = [start for start in sentence_starts(text)[1:] if start < len(text)]
    offsets = [0]
    if num_samples > 1 and later_starts:
        rng = np.random.default_rng(seed)
        offsets += [int(o) for o in rng.choice(later_starts, size=num_samples - 1,
                                               replace=len(later_starts) < num_samples - 1)]
    else:
        offsets *= num_samples
    suffix = question_suffix(question, answer_prefix)
    max_new_tokens = len(tokenizer.encode(answer)) + 8

    samples = []
    for length in lengths:
        for index, offset in enumerate(offsets):
            source = haystack_from(text, offset, tokenizer, length)
            num_chars, _ = fit_to_length(lambda n, source=source: source[:n] + " " + needle + suffix, tokenizer,
                                         length, upper=len(source))
            for depth in depths:
                context = source[:num_chars]
                while True:  # the needle's tokens may merge differently in place than at the end: trim until it fits
                    if not context:
                        raise ValueError(f"length {length} leaves no room for the haystack beside the needle and the "
                                         f"question; use longer lengths")
                    split, tokens_before, context_tokens = needle_split(tokenizer, context, depth)
                    before, after = context[:split], context[split:]
                    prompt = tokenizer.prompt(before + needle + (" " + after if after else "") + suffix)
                    if len(prompt) <= length:
                        break
                    context = context[: len(context) - (len(prompt) - length)]
                samples.append(Sample(
                    task=TASK, prompt=prompt, answers=(answer,), length=int(length),
                    depth=tokens_before / context_tokens, max_new_tokens=max_new_tokens,
                    info={"requested_depth": float(depth),
                          "needle_position": len(tokenizer.prompt(before, whole=False)),
                          "haystack_offset": offset, "context_tokens": context_tokens, "sample_index": index},
                ))
    return samples


def first_line(prediction: str) -> str:
    """The continuation up to its first newline (leading whitespace, newlines included, skipped)."""
    return prediction.lstrip().split("\n", 1)[0]


def score(prediction: str, sample: Sample) -> float:
    """Share of the answer's normalised words found among the first line's normalised words (best over answers)."""
    predicted_words = set(normalize_answer(first_line(prediction)).split())
    shares = []
    for answer in sample.answers:
        answer_words = normalize_answer(answer).split()
        shares.append(sum(word in predicted_words for word in answer_words) / len(answer_words))
    return max(shares)


def exact_match(prediction: str, sample: Sample) -> float:
    """1.0 if a normalised answer appears, as whole words, in the normalised first line of `prediction`."""
    predicted = f" {normalize_answer(first_line(prediction))} "
    return float(any(f" {normalize_answer(answer)} " in predicted for answer in sample.answers))
