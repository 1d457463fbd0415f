"""RULER's synthetic tasks: prompt lengths, needle depths, that every answer is in the prompt and is the right one
(vt's chain, cwe's and fwe's counts, recomputed from the decoded prompt), determinism, scores and error messages."""

import collections
import re

import numpy as np
import pytest
import tokenizers

from longctx.data import ByteTokenizer, HFTokenizer
from longctx.eval import ruler
from longctx.eval.tasks import Sample

BYTES = ByteTokenizer()
LENGTH = 2048  # bytes; vt and cwe carry a worked example (~1.3K and ~1.6K bytes) so 1024 is too short for them
SLACK = 128  # the longest unit added at a time: a uuid-keyed distractor needle (~108 bytes)
NIAH = [name for name in ruler.TASKS if name.startswith("niah_")]


@pytest.fixture(scope="module")
def samples() -> dict[str, Sample]:
    return {sample.task.removeprefix("ruler/"): sample for sample in ruler.build(BYTES, [LENGTH], seed=3)}


def text_of(sample: Sample) -> str:
    return BYTES.decode(sample.prompt)


def niah_context(text: str) -> str:
    return text[text.index("afterwards.\n") + len("afterwards.\n"): text.rindex("\nWhat ")]


def test_every_task_fills_its_length_bos_first(samples):
    assert sorted(samples) == sorted(ruler.TASKS)
    for name, sample in samples.items():
        assert sample.prompt.dtype == np.int32 and sample.prompt[0] == BYTES.bos_id, name
        assert LENGTH - SLACK <= len(sample.prompt) <= LENGTH, (name, len(sample.prompt))
        assert sample.task == f"ruler/{name}" and sample.length == LENGTH
        assert sample.max_new_tokens == ruler.MAX_NEW_TOKENS[name]
        assert (sample.depth is None) == (name in ("vt", "cwe", "fwe")), name
    assert ruler.MAX_NEW_TOKENS["niah_multikey_2"] == 128 and ruler.MAX_NEW_TOKENS["vt"] == 30
    assert ruler.MAX_NEW_TOKENS["cwe"] == 120 and ruler.MAX_NEW_TOKENS["fwe"] == 50


def test_answers_are_in_the_prompt(samples):
    for name, sample in samples.items():
        text = text_of(sample)
        assert sample.answers and all(answer in text for answer in sample.answers), name


def test_niah_prompts_follow_rulers_template(samples):
    single = text_of(samples["niah_single_3"])
    key = samples["niah_single_3"].info["keys"][0]
    assert single.startswith("A special magic uuid is hidden within the following text.")
    assert single.endswith(f"What is the special magic uuid for {key} mentioned in the provided text? "
                           f"The special magic uuid for {key} mentioned in the provided text is")
    assert f"One of the special magic uuids for {key} is: {samples['niah_single_3'].answers[0]}." in single
    multiquery = samples["niah_multiquery"]
    a, b, c, d = multiquery.info["queries"]
    assert text_of(multiquery).endswith(f"for {a}, {b}, {c}, and {d} mentioned in the provided text are")
    assert text_of(multiquery).startswith("Some special magic numbers are hidden")
    assert [multiquery.info["values"][multiquery.info["keys"].index(k)][0] for k in (a, b, c, d)] == \
        list(multiquery.answers)
    assert samples["niah_multikey_1"].info["num_needles"] == 4 and len(samples["niah_multikey_1"].answers) == 1
    multivalue = samples["niah_multivalue"]
    assert len(multivalue.answers) == 4 and len(multivalue.info["keys"]) == 1
    for value in multivalue.answers:
        assert f"for {multivalue.info['keys'][0]} is: {value}." in text_of(multivalue)
    assert re.fullmatch(r"\d{7}", samples["niah_single_1"].answers[0])


def test_niah_haystacks(samples):
    noise = niah_context(text_of(samples["niah_single_1"])).split("\n")
    assert noise.count(ruler.NOISE) == len(noise) - 1
    essay = niah_context(text_of(samples["niah_single_2"]))
    assert ruler.split_sentences(ruler.ESSAY)[0] in essay and "\n" not in essay
    for name in ("niah_multikey_2", "niah_multikey_3"):  # a haystack of distractor needles, none with the real key
        lines = niah_context(text_of(samples[name])).split("\n")
        assert len(lines) > 10 and all(line.startswith("One of the special magic") for line in lines)
        key = samples[name].info["keys"][0]
        assert sum(f" for {key} is: " in line for line in lines) == 1
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                        samples["niah_multikey_3"].info["keys"][0])


def test_custom_haystack_is_used():
    text = "Alpha beta gamma. Delta epsilon zeta! Eta theta iota? Kappa lambda mu."
    (sample,) = ruler.build(BYTES, [1024], tasks=["niah_single_2"], haystack=text, depths=[0.5])
    context = niah_context(text_of(sample))
    assert context.count("Alpha beta gamma.") > 3 and "grass" not in context and "town" not in context


@pytest.mark.parametrize("name", NIAH)
def test_needle_sits_at_the_depth_asked(name):
    for sample, depth in zip(ruler.build(BYTES, [LENGTH], tasks=[name], depths=[0.0, 0.5, 1.0]), [0.0, 0.5, 1.0]):
        context = niah_context(text_of(sample))
        value = sample.answers[0]
        end = context.index(f"is: {value}.") + len(f"is: {value}.")
        start = context.rindex("One of the special magic", 0, end)
        before, after = len(context[:start]), len(context[end:])
        measured = before / (before + after)
        assert measured == pytest.approx(sample.depth, abs=1e-12), name
        assert abs(measured - depth) <= 0.05, (name, depth, measured)
        assert sample.info["requested_depth"] == depth
    assert samples_at(name, 0.0)[0].info["keys"] == samples_at(name, 1.0)[0].info["keys"]  # only the needle moves


def samples_at(name: str, depth: float) -> list[Sample]:
    return ruler.build(BYTES, [LENGTH], tasks=[name], depths=[depth])


def test_default_depths_are_spread():
    depths = [s.depth for s in ruler.build(BYTES, [LENGTH], tasks=["niah_single_1"], num_samples=12)]
    assert min(depths) < 0.35 and max(depths) > 0.65


def test_vt_chain_reaches_exactly_the_answers(samples):
    sample = samples["vt"]
    text = text_of(sample)
    question = text.rindex("Memorize and track")
    assert text.endswith(f"5 variables are assigned the value {sample.info['value']}, they are:")
    assert re.search(r"they are: [A-Z]{3}( [A-Z]{3}){4}\n", text[:question])  # the worked example, answered
    assignments = re.findall(r"VAR ([A-Z]+) = (?:VAR ([A-Z]+)|(\d+))", text)
    holding = {name for name, _, number in assignments if number == sample.info["value"]}
    while True:
        more = holding | {name for name, source, _ in assignments if source in holding}
        if more == holding:
            break
        holding = more
    assert holding == set(sample.answers) and len(sample.answers) == 5
    chain = re.findall(r"VAR [A-Z]{5} = [^\n]+", text[question:])
    assert chain == ruler.vt_chain(sample.answers, sample.info["value"])  # in order, inside the noise
    context = text[question:].split("\n\n", 1)[1].rsplit("\nQuestion:", 1)[0].split("\n")
    assert [line for line in context if line != ruler.NOISE] == chain and len(context) > len(chain)


def test_cwe_answers_are_the_ten_most_common_words(samples):
    sample = samples["cwe"]
    text = text_of(sample)
    head = "Memorize the ones that appear most often.\n"
    listing = text[text.rindex(head) + len(head): text.rindex("\nQuestion:")]
    entries = re.findall(r"(\d+)\. (\S+)", listing)
    assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
    counts = collections.Counter(word for _, word in entries).most_common()
    assert {word for word, _ in counts[:10]} == set(sample.answers)
    assert counts[9][1] == 6 > counts[10][1] == 1  # RULER's short setting below 4096 tokens
    assert len(counts) == sample.info["num_words"]
    example = text[: text.rindex("Below is a numbered list")]
    assert not set(sample.answers) & set(re.findall(r"\d+\. (\S+)", example))


def test_fwe_answers_are_the_most_frequent_coded_words(samples):
    sample = samples["fwe"]
    text = text_of(sample)
    coded = text[text.index("coded words. ") + len("coded words. "): text.rindex("\nQuestion:")].split(" ")
    counts = collections.Counter(word for word in coded if word != "...").most_common()
    assert {word for word, _ in counts[:3]} == set(sample.answers)
    assert counts[2][1] > counts[3][1]
    assert coded.count("...") > counts[0][1]  # the top rank is the noise the prompt says to ignore
    assert all(re.fullmatch(r"[a-z]{6}", word) for word, _ in counts)


def test_fwe_counts_follow_zipf():
    assert ruler.zeta(2.0) == pytest.approx(np.pi**2 / 6, rel=1e-9)
    np.testing.assert_array_equal(ruler.fwe_counts(1000, 5), [607, 151, 67, 37, 24])


def test_same_seed_same_samples_other_seed_other_keys():
    first = ruler.build(BYTES, [LENGTH], seed=5, num_samples=2)
    again = ruler.build(BYTES, [LENGTH], seed=5, num_samples=2)
    other = ruler.build(BYTES, [LENGTH], seed=6, num_samples=2)
    assert len(first) == 2 * len(ruler.TASKS)
    for a, b, c in zip(first, again, other):
        np.testing.assert_array_equal(a.prompt, b.prompt)
        assert a.answers == b.answers and a.info == b.info and a.depth == b.depth
        assert a.answers != c.answers, a.task
    assert first[0].answers != first[1].answers  # two samples of a task differ


def test_a_task_does_not_depend_on_the_others_asked():
    alone = ruler.build(BYTES, [LENGTH], tasks=["fwe"])
    among = [s for s in ruler.build(BYTES, [LENGTH], tasks=["vt", "fwe"]) if s.task == "ruler/fwe"]
    np.testing.assert_array_equal(alone[0].prompt, among[0].prompt)


def test_score_is_rulers_string_match_all(samples):
    single = samples["niah_single_3"]
    assert ruler.score(f" {single.answers[0]}.", single) == 1.0
    assert ruler.score(single.answers[0].upper(), single) == 1.0
    assert ruler.score("12345678-aaaa-4bbb-8ccc-1234567890ab", single) == 0.0
    multivalue = samples["niah_multivalue"]
    assert ruler.score(f"{multivalue.answers[2]}, {multivalue.answers[0]} and 1111111", multivalue) == 0.5
    assert ruler.score(", ".join(multivalue.answers), multivalue) == 1.0
    vt = samples["vt"]
    assert ruler.score(" ".join(vt.answers).lower(), vt) == 1.0
    with pytest.raises(ValueError, match="'passkey' is not a RULER task"):
        ruler.score("x", Sample("passkey", np.zeros(1, np.int32), ("1",), 8, None, 8))


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"unknown task 'niah'; RULER's tasks are niah_single_1, .*, fwe"):
        ruler.build(BYTES, [1024], tasks=["niah"])
    with pytest.raises(ValueError, match=r"ruler/niah_single_1: length 200 is too short"):
        ruler.build(BYTES, [200], tasks=["niah_single_1"])
    with pytest.raises(ValueError, match=r"ruler/vt: length 1024 is too short"):
        ruler.build(BYTES, [1024], tasks=["vt"])
    with pytest.raises(ValueError, match="num_samples must be an int >= 1, got 0"):
        ruler.build(BYTES, [1024], num_samples=0)
    with pytest.raises(ValueError, match=r"depths must be None or floats in \[0, 1\], got \[0.5, 1.5\]"):
        ruler.build(BYTES, [1024], depths=[0.5, 1.5])
    with pytest.raises(ValueError, match="depths must be"):
        ruler.build(BYTES, [1024], depths=[])
    with pytest.raises(ValueError, match="lengths must be a non-empty sequence of ints >= 1"):
        ruler.build(BYTES, 1024)
    with pytest.raises(ValueError, match="haystack holds no text"):
        ruler.build(BYTES, [1024], haystack="  \n")


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> HFTokenizer:
    """A byte-level BPE trained on the module's own text: a tokenizer whose tokens are not bytes."""
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    corpus = [ruler.ESSAY, ruler.NOISE, ruler.NIAH_TEMPLATE, ruler.VT_TEMPLATE, ruler.CWE_TEMPLATE,
              ruler.FWE_TEMPLATE, " ".join(ruler.NOUNS + ruler.ADJECTIVES + ruler.VERBS)]
    tokenizer.train_from_iterator(corpus, trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tokenizer.save(str(path))
    return HFTokenizer(str(path))


def test_subword_tokenizer_prompts_fit(bpe):
    length = 1024
    assert len(bpe.encode(ruler.ESSAY)) < len(ruler.ESSAY) / 2  # really subwords
    for sample in ruler.build(bpe, [length], depths=[0.5]):
        assert sample.prompt[0] == bpe.bos_id and length - 64 <= len(sample.prompt) <= length, sample.task
        text = bpe.decode(sample.prompt)
        assert all(answer in text for answer in sample.answers), sample.task
        if sample.depth is not None:
            assert abs(sample.depth - 0.5) <= 0.05, (sample.task, sample.depth)
