"""Pass-key and needle-in-a-haystack samples on the byte tokenizer (1 byte = 1 token), their scores, the heatmap."""

import numpy as np
import pytest

from longctx.data import ByteTokenizer, tokenize_documents
from longctx.data.tokenizers import ANSWER_MARK
from longctx.eval import heatmap, niah, passkey

TOKENIZER = ByteTokenizer()
QUESTION = passkey.QUESTION.replace(ANSWER_MARK, "")  # as a plain prompt reads it
PASSKEY_FIXED_TOKENS = 1 + len(passkey.INTRO) + len(passkey.NEEDLE.format(key="12345")) + len(QUESTION)
# Short sentences, each with a distinct number so a test can see where the context starts.
HAYSTACK = " ".join(f"Line {i} is short." for i in range(400))


def text_of(ids: np.ndarray) -> str:
    assert ids[0] == TOKENIZER.bos_id
    return TOKENIZER.decode(ids)


def test_passkey_prompt_fills_the_length_and_holds_the_key_at_the_needle():
    samples = passkey.build(TOKENIZER, [512, 1000, 2048], [0.0, 0.5, 1.0], num_samples=2, seed=3)
    assert len(samples) == 3 * 3 * 2
    for sample in samples:
        key = sample.info["key"]
        assert len(key) == 5 and key[0] != "0" and sample.answers == (key,)
        assert sample.task == "passkey" and sample.max_new_tokens == 7 and sample.prompt.dtype == np.int32
        assert sample.length - len(passkey.FILLER) < len(sample.prompt) <= sample.length
        text = text_of(sample.prompt)
        assert text.startswith(passkey.INTRO) and text.endswith(QUESTION)
        needle = passkey.NEEDLE.format(key=key)
        position = sample.info["needle_position"]
        assert TOKENIZER.decode(sample.prompt[position : position + len(needle)]) == needle
        filler_tokens = len(sample.prompt) - PASSKEY_FIXED_TOKENS
        assert filler_tokens == sample.info["num_filler"] * len(passkey.FILLER)
        if sample.depth == 0.0:
            assert position == 1 + len(passkey.INTRO)
        elif sample.depth == 1.0:
            assert position + len(needle) == len(sample.prompt) - len(QUESTION)
        else:
            assert position - 1 - len(passkey.INTRO) == round(0.5 * sample.info["num_filler"]) * len(passkey.FILLER)


def test_passkey_depth_counts_filler_units_before_the_needle():
    (sample,) = passkey.build(TOKENIZER, [2048], [0.25])
    num_filler = sample.info["num_filler"]
    assert num_filler == (2048 - PASSKEY_FIXED_TOKENS) // len(passkey.FILLER) == 20
    assert sample.info["needle_position"] == 1 + len(passkey.INTRO) + 5 * len(passkey.FILLER)


def test_fit_filler_is_not_bounded_by_the_filler_estimate():
    # Units far cheaper than a filler unit: the estimated upper bound (length / 89) must grow until it stops fitting.
    num_units, prompt = passkey.fit_filler(lambda n: "x" * n, TOKENIZER, 1000)
    assert num_units == 999 and len(prompt) == 1000


def test_passkey_keys_follow_the_seed():
    keys = lambda seed: [s.info["key"] for s in passkey.build(TOKENIZER, [512], [0.0, 1.0], num_samples=3, seed=seed)]
    assert keys(0) == keys(0)
    assert keys(0) != keys(1)
    assert len(set(keys(0))) == 6
    # A cell's keys do not depend on the other cells of the grid.
    wider = passkey.build(TOKENIZER, [256, 512], [0.0, 0.5, 1.0], num_samples=3, seed=0)
    assert [s.info["key"] for s in wider if s.length == 512 and s.depth in (0.0, 1.0)] == keys(0)


def test_passkey_score_is_exact_match_of_the_first_number():
    (sample,) = passkey.build(TOKENIZER, [512], [0.5], seed=7)
    key = sample.info["key"]
    assert passkey.score(f" {key}.", sample) == 1.0
    assert passkey.score(f"{key} is the pass key", sample) == 1.0
    assert passkey.score(f" it is {key}", sample) == 1.0
    assert passkey.score(key[:-1], sample) == 0.0
    assert passkey.score(key + "6", sample) == 0.0
    assert passkey.score(f" 1 and then {key}", sample) == 0.0
    assert passkey.score(" no digits here", sample) == 0.0


def test_passkey_rejects_bad_arguments():
    with pytest.raises(ValueError, match="depths must be"):
        passkey.build(TOKENIZER, [512], [1.5])
    with pytest.raises(ValueError, match="lengths must be"):
        passkey.build(TOKENIZER, [0], [0.5])
    with pytest.raises(ValueError, match="too short"):
        passkey.build(TOKENIZER, [100], [0.5])


def test_passkey_training_documents_end_with_the_answer_and_fit():
    rng = np.random.default_rng(0)
    lengths = []
    for _ in range(20):
        text = passkey.training_text(TOKENIZER, 1024, rng)
        key = text[text.index("The pass key is ") + 16 :][:5]
        assert key.isdigit() and text.endswith(QUESTION + f" {key}.")
        ids = tokenize_documents([text], TOKENIZER)[0]  # framed with BOS and EOS, as training reads it
        lengths.append(len(ids))
    assert max(lengths) <= 1024
    assert min(lengths) < 600 and max(lengths) > 850  # documents of varied length, as the docstring promises


def test_niah_needle_stands_between_sentences_near_the_requested_depth():
    depths = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
    samples = niah.build(TOKENIZER, [1024, 2048], depths, haystack=HAYSTACK)
    assert len(samples) == 2 * len(depths)
    suffix = f"\n\nQuestion: {niah.DEFAULT_QUESTION}\nAnswer: {niah.DEFAULT_ANSWER_PREFIX}"
    for sample in samples:
        text = text_of(sample.prompt)
        assert sample.task == "niah" and len(sample.prompt) <= sample.length
        assert sample.length - len(sample.prompt) <= 1  # filled: the needle at the end drops one space
        position = sample.info["needle_position"]
        assert text.endswith(suffix) and (position == 1 or text.startswith("Line 0 is short."))
        assert TOKENIZER.decode(sample.prompt[position:]).startswith(niah.DEFAULT_NEEDLE)
        before = TOKENIZER.decode(sample.prompt[1:position])
        assert before == "" or (before[-2] == "." and before[-1].isspace())
        assert abs(sample.depth - sample.info["requested_depth"]) <= 0.1
        context_tokens = len(sample.prompt) - 1 - len(niah.DEFAULT_NEEDLE) - 1 - len(suffix)
        assert sample.info["context_tokens"] in (context_tokens, context_tokens + 1)
        assert sample.depth == pytest.approx((position - 1) / sample.info["context_tokens"])
        assert sample.max_new_tokens == len(niah.DEFAULT_ANSWER) + 8
    at_zero = [s for s in samples if s.info["requested_depth"] == 0.0]
    assert all(s.info["needle_position"] == 1 and s.depth == 0.0 for s in at_zero)
    at_end = [s for s in samples if s.info["requested_depth"] == 1.0]
    assert all(s.depth > 0.95 for s in at_end)


def test_niah_depth_moves_back_to_the_preceding_sentence_end():
    # Sentences of 10 bytes ("Aaaaaaaaa."), joined by spaces: a sentence starts every 11 characters.
    haystack = " ".join(["Aaaaaaaaa."] * 100)
    suffix = f"\n\nQuestion: {niah.DEFAULT_QUESTION}\nAnswer: {niah.DEFAULT_ANSWER_PREFIX}"
    (sample,) = niah.build(TOKENIZER, [400], [0.5], haystack=haystack)
    context_tokens = sample.info["context_tokens"]
    assert context_tokens == 400 - 1 - len(niah.DEFAULT_NEEDLE) - 1 - len(suffix)  # BOS, needle + space, question
    expected_before = int(0.5 * context_tokens) // 11 * 11
    assert sample.info["needle_position"] == 1 + expected_before


def test_niah_samples_start_at_different_sentences_and_wrap_a_short_haystack():
    short = "Alpha is first. Beta is second. Gamma is third. Delta is fourth."
    samples = niah.build(TOKENIZER, [1024], [0.5], haystack=short, num_samples=3, seed=1)
    offsets = [s.info["haystack_offset"] for s in samples]
    assert offsets[0] == 0 and len(set(offsets)) == 3
    assert all(short[offset - 2 : offset] == ". " for offset in offsets[1:])
    for sample, offset in zip(samples, offsets):
        text = text_of(sample.prompt)
        assert text.startswith(short[offset:]) and text.count("Gamma is third.") > 8
        assert len(sample.prompt) <= 1024
    again = niah.build(TOKENIZER, [1024], [0.5], haystack=short, num_samples=3, seed=1)
    assert [s.info["haystack_offset"] for s in again] == offsets


def test_niah_answer_prefix_and_custom_needle():
    samples = niah.build(TOKENIZER, [512], [0.5], haystack=HAYSTACK, needle="The magic word is plover.",
                         question="What is the magic word?", answer="plover", answer_prefix="The magic word is")
    text = text_of(samples[0].prompt)
    assert "The magic word is plover." in text and text.endswith("Answer: The magic word is")
    assert samples[0].max_new_tokens == len("plover") + 8
    assert text_of(niah.build(TOKENIZER, [512], [0.5], haystack=HAYSTACK, answer_prefix="")[0].prompt).endswith(
        "\nAnswer:")


def test_niah_scores_partial_and_exact():
    (sample,) = niah.build(TOKENIZER, [512], [0.5], haystack=HAYSTACK)
    # Normalised answer: eat sandwich and sit in dolores park on sunny day (10 words).
    half = " eat a sandwich and sit in a cafe."
    assert niah.score(half, sample) == pytest.approx(0.5)
    assert niah.exact_match(half, sample) == 0.0
    whole = " eat a sandwich and sit in Dolores Park on a sunny day.\nQuestion: anything"
    assert niah.score(whole, sample) == 1.0 and niah.exact_match(whole, sample) == 1.0
    assert niah.exact_match(" to EAT a sandwich, and sit in dolores park on a sunny day!", sample) == 1.0
    after_newline = " go home.\neat a sandwich and sit in Dolores Park on a sunny day"
    assert niah.score(after_newline, sample) == 0.0 and niah.exact_match(after_newline, sample) == 0.0
    assert niah.score("", sample) == 0.0


def test_niah_rejects_bad_haystack_and_depth():
    with pytest.raises(ValueError, match="haystack is empty"):
        niah.build(TOKENIZER, [512], [0.5], haystack="  \n ")
    with pytest.raises(ValueError, match="no sentence end"):
        niah.build(TOKENIZER, [512], [0.5], haystack="words without a full stop " * 50)
    with pytest.raises(ValueError, match="depths must be"):
        niah.build(TOKENIZER, [512], [-0.1], haystack=HAYSTACK)
    with pytest.raises(ValueError, match="too short"):
        niah.build(TOKENIZER, [100], [0.5], haystack=HAYSTACK)


def test_grid_averages_samples_per_cell():
    lengths, depths = [256, 512], [0.0, 0.5, 1.0]
    scores = heatmap.grid([(256, 0.02, 1.0), (256, 0.0, 0.0), (512, 0.45, 1.0), (512, 0.97, 0.5)], lengths, depths)
    expected = np.array([[0.5, np.nan], [np.nan, 1.0], [np.nan, 0.5]])
    np.testing.assert_array_equal(scores, expected)
    with pytest.raises(ValueError, match="not one of lengths"):
        heatmap.grid([(1024, 0.0, 1.0)], lengths, depths)


def test_plot_heatmap_writes_a_png(tmp_path):
    scores = np.array([[1.0, 0.5, np.nan], [0.0, 1.0, 0.25]])
    path = tmp_path / "niah.png"
    heatmap.plot_heatmap(scores, [1024, 2048, 4096], [0.0, 1.0], path, title="niah", train_length=2048)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="scores must have shape"):
        heatmap.plot_heatmap(scores.T, [1024, 2048, 4096], [0.0, 1.0], path, title="niah")
