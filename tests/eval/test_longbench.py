"""LongBench / L-Eval jsonl loading and metrics on hand-made files and hand-computed scores (byte tokenizer: 1 byte =
1 token, so prompts decode to exactly the text they were built from)."""

import json
import logging

import numpy as np
import pytest

from longctx.data import ByteTokenizer
from longctx.eval import longbench
from longctx.eval.tasks import Sample

TOKENIZER = ByteTokenizer()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def text_of(sample: Sample) -> str:
    assert sample.prompt[0] == TOKENIZER.bos_id and sample.prompt.dtype == np.int32
    return TOKENIZER.decode(sample.prompt)


def sample_with(metric: str, answers: tuple[str, ...], **info) -> Sample:
    return Sample(task="t", prompt=np.array([TOKENIZER.bos_id], np.int32), answers=answers, length=8, depth=None,
                  max_new_tokens=4, info={"metric": metric, **info})


# ---------------------------------------------------------------------------------------------------- metrics


def test_qa_f1_is_token_f1_after_normalisation():
    # "paris is capital" vs "paris": P = 1/3, R = 1, F = 2·(1/3)/(4/3) = 0.5.
    assert longbench.qa_f1("Paris is the capital!", "Paris") == pytest.approx(0.5)
    # "cat sat on mat" vs "cat on mat today": 3 common of 4 and 4 → 0.75.
    assert longbench.qa_f1("The cat sat on a mat.", "cat on the mat today") == pytest.approx(0.75)
    assert longbench.qa_f1("London", "Paris") == 0.0
    assert longbench.qa_f1("", "Paris") == 0.0


def test_rouge_l_is_the_lcs_f_measure():
    # prediction [cat on mat] (3), reference [the cat sat on the mat] (6), LCS 3: P = 1, R = 1/2, F = 2/3.
    assert longbench.rouge_l("Cat, on MAT.", "the cat sat on the mat") == pytest.approx(2 / 3)
    # LCS of [a b c d] and [b d a c] is 2 (b d or b c or a c): P = R = F = 1/2.
    assert longbench.rouge_l("a b c d", "b d a c") == pytest.approx(0.5)
    assert longbench.rouge_l("", "the cat") == 0.0 and longbench.rouge_l("dog", "the cat") == 0.0


def test_rouge_l_summary_is_the_rouge_packages_union_lcs():
    # Sentences ["the cat sat", "the dog ran"] vs ["the cat ran"]: the LCS with each predicted sentence is
    # {the, cat} and {the, ran}, union {the, cat, ran} = 3; 5 distinct predicted words, 3 reference words:
    # P = 3/5, R = 1, F = 0.75 (plain ROUGE-L would give P = 3/6, R = 1, F = 2/3).
    assert longbench.rouge_l_summary("the cat sat. the dog ran", "the cat ran") == pytest.approx(0.75, abs=1e-7)
    assert longbench.rouge_l("the cat sat. the dog ran", "the cat ran") == pytest.approx(2 / 3)
    # Distinct words: a repeated word counts once on both sides.
    assert longbench.rouge_l_summary("cat cat", "cat") == pytest.approx(1.0, abs=1e-7)
    assert longbench.rouge_l_summary("", "cat") == 0.0 and longbench.rouge_l_summary("...", "cat") == 0.0


def test_classification_follows_longbench_exactly():
    classes = ["Location", "City", "Animal"]
    assert longbench.classification("Location or City", "City", all_classes=classes) == pytest.approx(0.5)
    assert longbench.classification("Animal", "City", all_classes=classes) == 0.0
    assert longbench.classification("no idea", "City", all_classes=classes) == 0.0
    # A matched class that is a proper substring of the answer is dropped: "city" within "big city".
    assert longbench.classification("big city", "big city", all_classes=["city", "big city"]) == 1.0
    # LongBench removes from the list it iterates over, so "y" (after the removed "x") escapes removal: 1/2, not 1.
    assert longbench.classification("x y", "x y", all_classes=["x", "y", "x y"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="classification needs all_classes"):
        longbench.classification("City", "City")


def test_retrieval_and_count_score_the_share_of_right_numbers():
    assert longbench.retrieval("Paragraph 3", "Paragraph 3") == 1.0
    assert longbench.retrieval("Paragraph 3, or maybe Paragraph 12", "Paragraph 3") == pytest.approx(0.5)
    assert longbench.retrieval("Paragraph 30", "Paragraph 3") == 0.0
    assert longbench.retrieval("I do not know", "Paragraph 3") == 0.0
    with pytest.raises(ValueError, match="Paragraph <number>"):
        longbench.retrieval("3", "Para 3")
    assert longbench.count("7", "7") == 1.0
    assert longbench.count("There are 7 unique paragraphs out of 9", "7") == pytest.approx(0.5)
    assert longbench.count("seven", "7") == 0.0


def test_code_sim_takes_the_first_code_line_and_its_similarity_ratio():
    prediction = "\n```python\n# add one\nreturn x + 1\nprint(x)"
    assert longbench.code_sim(prediction, "return x + 1") == 1.0
    # SequenceMatcher: 8 matching characters of 8 + 12 → 2·8/20 = 0.8.
    assert longbench.code_sim("return x", "return x + 1") == pytest.approx(0.8)
    # A line containing "#" anywhere is skipped (LongBench's rule), so the next line is compared.
    assert longbench.code_sim("y = 1  # set y\nreturn y", "return y") == 1.0
    assert longbench.code_sim("# only comments", "return y") == 0.0
    # fuzz.ratio rounds to a whole percent: 2·2/(5 + 2) = 0.571… → 0.57.
    assert longbench.code_sim("abcde", "ab") == pytest.approx(0.57)


def test_exact_match_extracts_options_as_l_eval_does():
    assert longbench.exact_match("B", "B") == 1.0
    assert longbench.exact_match("The answer is B.", "B") == 1.0  # first A-D character
    assert longbench.exact_match("Answer: B", "B") == 0.0  # ... which here is the "A" of "Answer", as in L-Eval
    assert longbench.exact_match("(B) because", "(B) Their subconscious knew") == 1.0  # QuALITY's answer form
    # Several right options (coursera): the leading letters, sorted; a strict subset scores 0.25.
    assert longbench.exact_match("BDA", "ABD") == 1.0
    assert longbench.exact_match("AB", "ABD") == 0.25
    assert longbench.exact_match("C", "ABD") == 0.0
    assert longbench.exact_match("B", "B", multiple_options=True) == 1.0
    assert longbench.exact_match("", "B") == 0.0
    # Not an option answer: same number, or the answer (case and spaces ignored) inside the prediction.
    assert longbench.exact_match("18.0", "18") == 1.0
    assert longbench.exact_match("The first topic: the Role of Art in society.", "The role of art in society") == 1.0
    assert longbench.exact_match("A dog", "A cat") == 0.0
    assert longbench.option_letters("A cat") is None and longbench.option_letters("ABD") == "ABD"


def test_score_takes_the_max_over_answers_and_cuts_first_line_datasets():
    qa = sample_with("qa_f1", ("London", "Paris"), benchmark="longbench", dataset="hotpotqa")
    assert longbench.score("Paris", qa) == 1.0
    trec = sample_with("classification", ("City",), benchmark="longbench", dataset="trec",
                       all_classes=["Location", "City"])
    assert longbench.score("\nCity\nLocation", trec) == 1.0  # only "City" is scored
    other = sample_with("classification", ("City",), benchmark="longbench", dataset="not_trec",
                        all_classes=["Location", "City"])
    assert longbench.score("\nCity\nLocation", other) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="sample.info\\['metric'\\] must be one of"):
        longbench.score("x", sample_with("bleu", ("x",)))


# ---------------------------------------------------------------------------------------------------- loading


def test_longbench_file_loads_with_its_template_metric_and_lengths(tmp_path):
    path = write_jsonl(tmp_path / "qasper.jsonl", [
        {"context": "An article.", "input": "What is it?", "answers": ["an article", "a text"], "_id": "q1",
         "all_classes": None, "language": "en"},
        {"context": "Another.", "input": "And this?", "answers": "a single answer", "_id": "q2"},
    ])
    samples = longbench.load(path, TOKENIZER, 4096)
    assert [s.task for s in samples] == ["longbench/qasper"] * 2
    first = samples[0]
    assert text_of(first) == longbench.LONGBENCH_PROMPTS["qasper"].format(context="An article.", input="What is it?")
    assert text_of(first).endswith("\n\nQuestion: What is it?\n\nAnswer:")
    assert first.answers == ("an article", "a text") and samples[1].answers == ("a single answer",)
    assert first.max_new_tokens == 128 and first.length == 4096 and first.depth is None
    assert first.info == {"benchmark": "longbench", "dataset": "qasper", "metric": "qa_f1", "all_classes": None,
                          "id": "q1", "truncated": False, "untruncated_tokens": len(text_of(first)) + 1}


def test_longbench_dataset_comes_from_the_argument_then_the_record_then_the_file_stem(tmp_path):
    records = [{"context": "P1 ... P30", "input": "An abstract.", "answers": ["Paragraph 3"],
                "dataset": "passage_retrieval_en"},
               {"context": "Q: where? Type: City", "input": "Q: who?", "answers": ["Human"],
                "all_classes": ["City", "Human"]}]
    path = write_jsonl(tmp_path / "trec.jsonl", records)
    retrieval, trec = longbench.load(path, TOKENIZER, 4096)
    assert retrieval.task == "longbench/passage_retrieval_en" and retrieval.info["metric"] == "retrieval"
    assert retrieval.max_new_tokens == 32 and text_of(retrieval).endswith("etc.\n\nThe answer is: ")
    assert trec.task == "longbench/trec" and trec.info["metric"] == "classification"
    assert trec.info["all_classes"] == ["City", "Human"] and trec.max_new_tokens == 64
    assert text_of(trec) == ("Please determine the type of the question below. Here are some examples of "
                             "questions.\n\nQ: where? Type: City\nQ: who?")
    forced = longbench.load(path, TOKENIZER, 4096, dataset="gov_report", max_new_tokens=7, limit=1)
    assert len(forced) == 1 and forced[0].task == "longbench/gov_report"
    assert forced[0].info["metric"] == "rouge_l_summary" and forced[0].max_new_tokens == 7
    e_path = write_jsonl(tmp_path / "hotpotqa_e.jsonl", [{"context": "c", "input": "q", "answers": ["a"]}])
    (hotpot_e,) = longbench.load(e_path, TOKENIZER, 4096)
    assert hotpot_e.task == "longbench/hotpotqa_e" and hotpot_e.info["dataset"] == "hotpotqa"
    assert text_of(hotpot_e) == longbench.PASSAGES_QA_PROMPT.format(context="c", input="q")


def test_unknown_longbench_dataset_gets_the_generic_prompt_and_a_warning(tmp_path, caplog):
    path = write_jsonl(tmp_path / "my_qa.jsonl", [{"context": "Ctx.", "input": "Why?", "answers": ["because"]}])
    with caplog.at_level(logging.WARNING, logger="longctx.eval"):
        (sample,) = longbench.load(path, TOKENIZER, 4096)
    assert text_of(sample) == "Ctx.\n\nQuestion: Why?\nAnswer:"
    assert sample.info["metric"] == "qa_f1" and sample.max_new_tokens == 64 and sample.task == "longbench/my_qa"
    assert "'my_qa' is not one of LongBench's English datasets" in caplog.text


def test_middle_truncation_keeps_the_instruction_and_the_question(tmp_path):
    context = "HEAD " + "filler " * 2000 + " TAIL"
    path = write_jsonl(tmp_path / "hotpotqa.jsonl", [{"context": context, "input": "Who wrote it?", "answers": ["x"]}])
    for length in (300, 301):
        (sample,) = longbench.load(path, TOKENIZER, length)
        full = longbench.PASSAGES_QA_PROMPT.format(context=context, input="Who wrote it?")
        text = text_of(sample)
        assert len(sample.prompt) == length and sample.length == length
        head, tail = (length - 1) // 2, (length - 1) - (length - 1) // 2
        assert text == full[:head] + full[-tail:]
        assert text.startswith("Answer the question based on the given passages.")
        assert text.endswith("\n\nQuestion: Who wrote it?\nAnswer:")
        assert "HEAD" in text and "TAIL" in text and text.count("filler") < 50  # the context's middle is cut
        assert sample.info["truncated"] and sample.info["untruncated_tokens"] == len(full) + 1
    np.testing.assert_array_equal(longbench.middle_truncate(np.arange(10), 5), [0, 1, 7, 8, 9])
    np.testing.assert_array_equal(longbench.middle_truncate(np.arange(4), 5), [0, 1, 2, 3])


def test_l_eval_record_gives_one_sample_per_instruction(tmp_path):
    document = "The whole long document."
    path = write_jsonl(tmp_path / "tpo.jsonl", [
        {"input": document, "instructions": ["Why?\nA. x\nB. y", "Who?\nA. p\nB. q"], "outputs": ["A", "B"],
         "source": "toefl_tpo", "evaluation": "exam"},
    ])
    samples = longbench.load(path, TOKENIZER, 4096)
    assert len(samples) == 2 and [s.answers for s in samples] == [("A",), ("B",)]
    first = samples[0]
    assert first.task == "leval/tpo" and first.max_new_tokens == 512
    assert text_of(first) == (longbench.LEVAL_EXAM_SYSTEM + "\n\nDocument is as follows. " + document
                              + " \nQuestion: Why?\nA. x\nB. y.  Please directly give the answer without any "
                              "additional output or explanation \nAnswer:")
    assert first.info["metric"] == "exact_match" and first.info["source"] == "toefl_tpo"
    assert first.info["multiple_options"] is False and first.info["id"] == "tpo.jsonl:1#0"
    assert longbench.score("B", samples[1]) == 1.0 and longbench.score("B", first) == 0.0


def test_l_eval_open_ended_records_use_rouge_or_f1_and_skip_judged_ones(tmp_path):
    path = write_jsonl(tmp_path / "news_summ.jsonl", [
        {"input": "Doc one.", "instructions": ["Summarize."], "outputs": ["A short summary here."],
         "evaluation": "rouge"},
        {"input": "Doc two.", "instructions": ["Judge me."], "outputs": ["Anything."], "evaluation": "LLM"},
        {"input": "Doc three.", "instructions": ["What?"], "outputs": ["That."], "evaluation": "f1"},
    ])
    rouge_sample, f1_sample = longbench.load(path, TOKENIZER, 4096)
    assert rouge_sample.info["metric"] == "rouge_l" and f1_sample.info["metric"] == "qa_f1"
    assert text_of(rouge_sample) == (longbench.LEVAL_OPEN_SYSTEM + "\n\nDocument is as follows. Doc one. "
                                     "Instruction: Summarize. \nAnswer this question with 4 words.\nAnswer:")
    coursera = write_jsonl(tmp_path / "coursera.jsonl", [
        {"input": "Lecture.", "instructions": ["Q1", "Q2"], "outputs": ["B", "C"], "evaluation": "exam"}])
    assert all(s.info["multiple_options"] for s in longbench.load(coursera, TOKENIZER, 4096))
    topics = write_jsonl(tmp_path / "topic_retrieval_longchat.jsonl", [
        {"input": "USER: I would like to discuss the topic of tea.", "instructions": ["What is the first topic?"],
         "outputs": ["Tea"], "evaluation": "exam"}])
    (topic,) = longbench.load(topics, TOKENIZER, 4096)
    assert text_of(topic) == (longbench.LEVAL_TASK_SYSTEM["topic_retrieval_longchat"] + "\n\nUSER: I would like to "
                              "discuss the topic of tea.\n\nWhat is the first topic?\nAnswer:")
    assert longbench.score("The first topic was tea.", topic) == 1.0 and longbench.score("Coffee", topic) == 0.0


def test_bad_inputs_raise_naming_the_problem(tmp_path):
    good = {"context": "c", "input": "q", "answers": ["a"]}
    missing = write_jsonl(tmp_path / "qasper.jsonl", [good, {"context": "c", "input": "q"}])
    with pytest.raises(ValueError, match=r"qasper\.jsonl:2: LongBench record has no field 'answers'"):
        longbench.load(missing, TOKENIZER, 4096)
    leval_missing = write_jsonl(tmp_path / "quality.jsonl", [{"input": "d", "instructions": ["q"]}])
    with pytest.raises(ValueError, match=r"quality\.jsonl:1: L-Eval record has no field 'outputs'"):
        longbench.load(leval_missing, TOKENIZER, 4096)
    uneven = write_jsonl(tmp_path / "tpo.jsonl", [{"input": "d", "instructions": ["q", "r"], "outputs": ["A"]}])
    with pytest.raises(ValueError, match=r"'instructions' \(2\) and 'outputs' \(1\) must have the same length"):
        longbench.load(uneven, TOKENIZER, 4096)
    neither = write_jsonl(tmp_path / "x.jsonl", [{"text": "hello"}])
    with pytest.raises(ValueError, match=r"x\.jsonl:1: neither a LongBench record"):
        longbench.load(neither, TOKENIZER, 4096)
    (tmp_path / "broken.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: not valid JSON"):
        longbench.load(tmp_path / "broken.jsonl", TOKENIZER, 4096)
    zh = write_jsonl(tmp_path / "multifieldqa_zh.jsonl", [good])
    with pytest.raises(NotImplementedError, match="'multifieldqa_zh' is Chinese"):
        longbench.load(zh, TOKENIZER, 4096)
    with pytest.raises(NotImplementedError, match="'gsm100' needs L-Eval's task-specific answer extraction"):
        longbench.load(uneven, TOKENIZER, 4096, dataset="gsm100")
    for bad_length in (0, 1, 2.5, "512", True):
        with pytest.raises(ValueError, match="length must be an integer >= 2"):
            longbench.load(missing, TOKENIZER, bad_length)
    with pytest.raises(ValueError, match="limit must be an integer >= 1 or None, got 0"):
        longbench.load(missing, TOKENIZER, 4096, limit=0)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1 or None"):
        longbench.load(missing, TOKENIZER, 4096, max_new_tokens=-3)
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        longbench.load(tmp_path / "nowhere.jsonl", TOKENIZER, 4096)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="has no records"):
        longbench.load(tmp_path / "empty.jsonl", TOKENIZER, 4096)
