"""LongBench and L-Eval from jsonl files the user brings (nothing is downloaded): prompts as those benchmarks build
them, middle truncation to a token length, and their metrics in the stdlib.

Sources, read at these commits and rewritten here:
  THUDM/LongBench 2e00731f (LongBench/config/dataset2prompt.json, dataset2maxlen.json, metrics.py, eval.py, pred.py);
  OpenLMLab/LEval cd34b050 (Baselines/LEval_config.py, Baselines/llama2-chat-test.py, Evaluation/auto_eval.py, em.py,
  f1.py); pltrdy/rouge 1.0.1 c1b90a78 (the `rouge` package LongBench scores with); google-research rouge_score
  (rougeL, which L-Eval scores with); seatgeek/fuzzywuzzy (fuzz.ratio).

File formats, told apart by the first record's fields:
  LongBench: {"context", "input", "answers": [str] | str, "all_classes"?, "dataset"?, "_id"?, "language"?}. The
    dataset is the `dataset` argument, else the record's "dataset", else the file stem (LongBench files are
    <dataset>.jsonl; LongBench-E's <dataset>_e uses <dataset>'s prompt). Prompt: LongBench's template for the
    dataset; an unknown dataset gets "{context}\\n\\nQuestion: {input}\\nAnswer:", qa_f1 and 64 new tokens (logged).
    The Chinese datasets (multifieldqa_zh, dureader, vcsum, lsht, passage_retrieval_zh) and records with language
    "zh" raise NotImplementedError: their metrics segment words with jieba, which we do not ship.
  L-Eval: {"input": document, "instructions": [str], "outputs": [str], "evaluation"?, "source"?}, one sample per
    (instruction, output). The task is the `dataset` argument, else the file stem (L-Eval's scripts key on the file
    name; "source" varies within a file, e.g. coursera_a/_b/_c, and is kept in info). "evaluation": "exam" →
    exact_match, "f1" → qa_f1, "rouge" / "ngram" / absent → rouge_l; "LLM" / "human" records are skipped, as L-Eval's
    n-gram evaluation skips them (a judge model scores them). gsm100, codeU and sci_fi raise NotImplementedError:
    L-Eval extracts their answers with task-specific rules (process_math, process_output_code, the loyalty/fact
    judge) that are not implemented here. Prompt: L-Eval's Llama-2 baseline wording without the chat markers
    ([INST], <<SYS>>), since longctx models are base LMs, and ending in "\\nAnswer:":
      exam:  SYSTEM + "\\n\\n" + "Document is as follows. {document} \\nQuestion: {instruction}.  Please directly give
             the answer without any additional output or explanation \\nAnswer:"
      other: SYSTEM + "\\n\\n" + "Document is as follows. {document} Instruction: {instruction} \\nAnswer this
             question with {n} words.\\nAnswer:"   (n = words in the reference: L-Eval's length-instruction protocol)
      topic_retrieval_longchat: SYSTEM + "\\n\\n" + "{document}\\n\\n{instruction}\\nAnswer:"
    with SYSTEM L-Eval's system prompt for the task. max_new_tokens: 512 (LEval_config.max_new_tokens) for all.

Truncation (LongBench pred.py, used for both): a prompt of n > length − 1 tokens keeps its first ⌊(length − 1)/2⌋
and last ⌈(length − 1)/2⌉ tokens, so the instruction at the start and the question at the end survive; the prompt
is [BOS] + those ids. (pred.py keeps ⌊L/2⌋ + ⌊L/2⌋ ids of a prompt that already holds BOS, and decodes and
re-encodes them; we cut ids once. L-Eval's baselines instead cut the document's tail by words.)

Metrics, metric(prediction, answer, **kw) -> float in [0, 1]; `score` takes the max over a sample's answers:
  qa_f1: F1 = 2PR/(P + R) over the bags of normalize_answer'd words (P = common / |pred|, R = common / |answer|).
  rouge_l: ROUGE-L F of rouge_score's rougeL without stemming (L-Eval): words = lower-cased [a-z0-9] runs,
    P = LCS/|pred|, R = LCS/|answer|, F = 2PR/(P + R).
  rouge_l_summary: the `rouge` package's rouge-l "f" (LongBench): the summary-level union LCS of Lin (2004) as that
    package computes it: sentences split at "." only, words split at " ", case kept; LCS_u = number of distinct words
    in the union of one LCS of every (reference sentence, predicted sentence) pair; P = LCS_u / distinct predicted
    words, R = LCS_u / distinct reference words, F = 2PR/(P + R + 1e-8); 0 for an empty prediction.
  classification, retrieval, count: LongBench's classification_score, retrieval_score, count_score (see each).
  code_sim: LongBench's code_sim_score with difflib.SequenceMatcher for fuzz.ratio (see it).
  exact_match: L-Eval's exact_match_score, after its option extraction where the answer is an option letter set.
"""

from collections import Counter
from collections.abc import Iterator
import difflib
import json
import logging
import os
import pathlib
import re
import string

import numpy as np

from longctx.data import Tokenizer
from longctx.eval.tasks import Sample, normalize_answer

log = logging.getLogger("longctx.eval")

PASSAGES_QA_PROMPT = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other "
    "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. "
    "Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:")
# LongBench's English templates verbatim, "asconcisely" included (the released prompt, used for published numbers).
LONGBENCH_PROMPTS = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
        "{context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if "
        "possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as you can, using a "
        "single phrase or sentence if possible. If the question cannot be answered based on the information in the "
        'article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". '
        "Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as "
        "concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered "
        'based on the information in the article, write "unanswerable". If the question is a yes/no question, answer '
        '"yes", "no", or "unanswerable". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:'),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the "
        "above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"),
    "hotpotqa": PASSAGES_QA_PROMPT,
    "2wikimqa": PASSAGES_QA_PROMPT,
    "musique": PASSAGES_QA_PROMPT,
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the "
        "report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
        "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
        "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:"),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, "
        "write a one-page summary of all the news.\n\nSummary:"),
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}"),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any other words. "
        "The following are some examples.\n\n{context}\n\n{input}"),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}"),
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
        "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
        "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
        "count of unique paragraphs after removing duplicates. The output format should only contain the number, "
        "such as 1, 2, 3, and so on.\n\nThe final answer is: "),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of "
        'the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", '
        "etc.\n\nThe answer is: "),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
LONGBENCH_MAX_NEW_TOKENS = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32, "musique": 32,
    "gov_report": 512, "qmsum": 512, "multi_news": 512, "trec": 64, "triviaqa": 32, "samsum": 128,
    "passage_count": 32, "passage_retrieval_en": 32, "lcc": 64, "repobench-p": 64,
}
DATASET_METRICS = {
    "narrativeqa": "qa_f1", "qasper": "qa_f1", "multifieldqa_en": "qa_f1", "hotpotqa": "qa_f1", "2wikimqa": "qa_f1",
    "musique": "qa_f1", "gov_report": "rouge_l_summary", "qmsum": "rouge_l_summary", "multi_news": "rouge_l_summary",
    "trec": "classification", "triviaqa": "qa_f1", "samsum": "rouge_l_summary", "passage_count": "count",
    "passage_retrieval_en": "retrieval", "lcc": "code_sim", "repobench-p": "code_sim",
}
LONGBENCH_CHINESE = ("multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh")
GENERIC_PROMPT = "{context}\n\nQuestion: {input}\nAnswer:"
GENERIC_METRIC = "qa_f1"
GENERIC_MAX_NEW_TOKENS = 64
# eval.py scores only the first line of the prediction on these (lsht included, though we do not load it).
FIRST_LINE_DATASETS = ("trec", "triviaqa", "samsum", "lsht")

LEVAL_MAX_NEW_TOKENS = 512
LEVAL_METRICS = {"exam": "exact_match", "f1": "qa_f1", "rouge": "rouge_l", "ngram": "rouge_l", None: "rouge_l"}
LEVAL_JUDGED = ("LLM", "human")
LEVAL_UNSUPPORTED = ("gsm100", "codeU", "sci_fi")
LEVAL_MULTIPLE_OPTION_TASKS = ("coursera",)  # auto_eval.py's process_output_mc: several letters may be right
LEVAL_EXAM_SYSTEM = (
    "Now you are given a very long document. Please follow the instruction based on this document. For multi-choice "
    "questions, there is only a sinlge correct option. Please only provide the letter corresponding to the answer "
    "(like A or B) when answering. For other questions, please directly give the concise and accurate answer. ")
LEVAL_OPEN_SYSTEM = (
    "Now you are given a very long document. Please follow the instruction after this document. These instructions "
    "may include summarizing a document, answering questions based on the document, or writing a required "
    "paragraph. ")
LEVAL_TASK_SYSTEM = {
    "coursera": (
        "Now you are given a very long document. Please follow the instruction based on this document. For "
        "multi-choice questions, there could be a sinlge correct option or multiple correct options. Please only "
        "provide the letter corresponding to the answer (like A or AB) when answering. "),
    "topic_retrieval_longchat": (
        "Below is a record of our previous conversation on many different topics. You are the ASSISTANT, and I am "
        "the USER. At the beginning of each topic, the USER will say 'I would like to discuss the topic of <TOPIC>'. "
        "Memorize each <TOPIC>. At the end of the record, I will ask you to retrieve the first/second/third topic "
        "names. Now the record start. "),
}
LEVAL_EXAM_BODY = ("Document is as follows. {document} \nQuestion: {instruction}.  Please directly give the answer "
                   "without any additional output or explanation ")
LEVAL_OPEN_BODY = "Document is as follows. {document} Instruction: {instruction} \nAnswer this question with {n} words."
LEVAL_PLAIN_BODY = "{document}\n\n{instruction}"
LEVAL_PLAIN_TASKS = ("topic_retrieval_longchat",)

LONGBENCH_FIELDS = ("context", "input", "answers")
LEVAL_FIELDS = ("input", "instructions", "outputs")


# ---------------------------------------------------------------------------------------------------- metrics


def qa_f1(prediction: str, answer: str, **kw) -> float:
    """Token F1 over normalize_answer'd words: LongBench's qa_f1_score, L-Eval's f1_score."""
    predicted_words, answer_words = normalize_answer(prediction).split(), normalize_answer(answer).split()
    common = sum((Counter(predicted_words) & Counter(answer_words)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted_words), common / len(answer_words)
    return 2 * precision * recall / (precision + recall)


def lcs_length(first: list[str], second: list[str]) -> int:
    """Length of the longest common subsequence of two word lists (O(|first|·|second|) time, one row at a time)."""
    previous = [0] * (len(second) + 1)
    for word in first:
        current = [0]
        for j, other in enumerate(second, start=1):
            current.append(previous[j - 1] + 1 if word == other else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_words(text: str) -> list[str]:
    """rouge_score's tokenizer without stemming: lower case, runs of [a-z0-9]."""
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge_l(prediction: str, answer: str, **kw) -> float:
    """ROUGE-L F-measure of the LCS of the two word sequences (rouge_score's rougeL, use_stemmer=False: L-Eval).

    P = LCS/|prediction words|, R = LCS/|answer words|, F = 2PR/(P + R); 0 when either has no words.
    """
    predicted_words, answer_words = rouge_words(prediction), rouge_words(answer)
    if not predicted_words or not answer_words:
        return 0.0
    common = lcs_length(answer_words, predicted_words)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted_words), common / len(answer_words)
    return 2 * precision * recall / (precision + recall)


def rouge_package_sentences(text: str) -> list[str]:
    """The `rouge` package's split: pieces between "." that are non-empty, their whitespace runs made one space."""
    return [" ".join(piece.split()) for piece in text.split(".") if piece]


def lcs_words(reference: list[str], predicted: list[str]) -> list[str]:
    """The words of one LCS, chosen as the `rouge` package's _recon_lcs chooses on ties (walking back from the end:
    a match is taken; else up in `reference` if that keeps a strictly longer LCS, else left in `predicted`)."""
    table = [[0] * (len(predicted) + 1) for _ in range(len(reference) + 1)]
    for i, word in enumerate(reference, start=1):
        for j, other in enumerate(predicted, start=1):
            table[i][j] = table[i - 1][j - 1] + 1 if word == other else max(table[i - 1][j], table[i][j - 1])
    words, i, j = [], len(reference), len(predicted)
    while i > 0 and j > 0:
        if reference[i - 1] == predicted[j - 1]:
            words.append(reference[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words[::-1]


def rouge_l_summary(prediction: str, answer: str, **kw) -> float:
    """The `rouge` package's rouge-l "f" (Rouge().get_scores, which LongBench's rouge_score returns): summary-level
    ROUGE-L over distinct words; see the module docstring. An empty prediction or answer scores 0, as LongBench's
    try/except makes it."""
    predicted_sentences, answer_sentences = rouge_package_sentences(prediction), rouge_package_sentences(answer)
    if not predicted_sentences or not answer_sentences:
        return 0.0
    predicted_words = [sentence.split(" ") for sentence in predicted_sentences]
    answer_words = [sentence.split(" ") for sentence in answer_sentences]
    union = {word for reference in answer_words for predicted in predicted_words
             for word in lcs_words(reference, predicted)}
    precision = len(union) / len({word for words in predicted_words for word in words})
    recall = len(union) / len({word for words in answer_words for word in words})
    return 2.0 * precision * recall / (precision + recall + 1e-8)


def classification(prediction: str, answer: str, *, all_classes: list[str] | None = None, **kw) -> float:
    """LongBench's classification_score, its exact semantics: the classes found in `prediction` (substring,
    case-sensitive), less those that are a proper substring of `answer`, removed while iterating over that same list
    (so the entry after each removed one escapes the check, as in LongBench); then 1/len(list) if `answer` is in
    the list, else 0. (Its difflib fallback for an empty list is unreachable there: `em_match_list != 0` is always
    true, so an empty list scores 0, as here.)"""
    if all_classes is None:
        raise ValueError("classification needs all_classes (the record's list of class names), got None")
    matched = [name for name in all_classes if name in prediction]
    for name in matched:  # removing while iterating: LongBench's behaviour, kept so that scores compare
        if name in answer and name != answer:
            matched.remove(name)
    return 1.0 / len(matched) if answer in matched else 0.0


def share_equal(numbers: list[str], target: str) -> float:
    """Share of `numbers` equal to `target`; 0 when there are none."""
    return sum(number == target for number in numbers) / len(numbers) if numbers else 0.0


def retrieval(prediction: str, answer: str, **kw) -> float:
    """LongBench's retrieval_score (passage_retrieval_en): the answer is "Paragraph <k>"; the share of the numbers in
    `prediction` that equal k ("Paragraph 3" → 1, "Paragraph 3 or 12" → 0.5, no number → 0)."""
    paragraph = re.search(r"Paragraph (\d+)", answer)
    if paragraph is None:
        raise ValueError(f"retrieval answers look like 'Paragraph <number>', got {answer!r}")
    return share_equal(re.findall(r"\d+", prediction), paragraph.group(1))


def count(prediction: str, answer: str, **kw) -> float:
    """LongBench's count_score (passage_count): the share of the numbers in `prediction` that equal `answer`."""
    return share_equal(re.findall(r"\d+", prediction), str(answer))


def code_sim(prediction: str, answer: str, **kw) -> float:
    """LongBench's code_sim_score (lcc, repobench-p): the first line of `prediction` (leading newlines dropped) that
    contains none of "`", "#", "//" (LongBench tests containment, not a line's start: `x = 1  # why` is skipped),
    or "" if none; then fuzz.ratio / 100 = round(100 · difflib.SequenceMatcher(None, line, answer).ratio()) / 100.
    That is fuzzywuzzy's ratio without python-Levenshtein, which LongBench's requirements do not install; with it,
    fuzz.ratio is Levenshtein's indel ratio and can differ by a few points."""
    line = next((line for line in prediction.lstrip("\n").split("\n")
                 if "`" not in line and "#" not in line and "//" not in line), "")
    return round(100 * difflib.SequenceMatcher(None, line, answer).ratio()) / 100


def leval_normalize(text: str) -> str:
    """L-Eval em.py's normalize_answer: punctuation and the articles a/an/the removed, whitespace collapsed; case kept
    (so option "A" is not taken for an article)."""
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def option_letters(answer: str) -> str | None:
    """The option letters of an option answer ("B", "ABD", "(B) Their ...", "C. text"), else None. L-Eval takes
    them from the first word (process_gt_mc); we count the first word as an option when it is letters A-D alone as
    the whole answer, or with brackets or a "." / ":" / ")" ("A cat" is not an option answer)."""
    words = answer.split()
    if not words:
        return None
    match = re.fullmatch(r"\(?([A-D]+)[).:]?", words[0])
    if match is None or (match.group(1) == words[0] and len(words) > 1):
        return None
    return match.group(1)


def leval_predicted_options(response: str, multiple: bool) -> str:
    """L-Eval auto_eval.py's process_output_mc: the option letters a model's response gives.

    Single-answer tasks: the response itself if it is a substring of "ABCD", else its first A-D character anywhere
    ("Answer: B" gives "A", as in L-Eval). Several-answer tasks (coursera): its leading run of A-D letters if longer
    than one, else the letters standing alone before "Question", else the first run of A-D characters. Either
    falls back to "A" (L-Eval's guess); a blank response gives "None".
    """
    if not response.strip():
        return "None"
    if response in "ABCD":
        return response
    if not multiple:
        return next((ch for ch in response if ch in "ABCD"), "A")
    leading = ""
    for ch in response:
        if ch not in "ABCD":
            break
        leading += ch
    if len(leading) > 1:
        return "".join(sorted(set(leading)))
    rest = response[len(leading):].split("Question")[0]
    standing = " ".join(re.findall(r"\s*[A-Z](?=[\s.)])", rest)).strip()
    letters = "".join(sorted(set(re.sub(r"[^A-D]", "", leading + standing))))
    if not letters:
        run = re.search(r"[A-D]+", rest)
        letters = run.group() if run else ""
    return letters or "A"


def exact_match(prediction: str, answer: str, *, multiple_options: bool | None = None, **kw) -> float:
    """L-Eval's exam score (em.py exact_match_score, after auto_eval.py's option extraction).

    If `answer` is an option answer (`option_letters`), the prediction's letters (`leval_predicted_options`;
    `multiple_options` None means "the answer has several letters") are compared with it: 1 if equal, 0.25 if they
    are a subset of the answer's (some of several right options), else 0. Otherwise: 1 if both parse as the same
    float, else 1 if `answer` lower-cased without spaces is a substring of `prediction` so treated, else 0.
    """
    letters = option_letters(answer)
    if letters is not None:
        multiple = len(letters) > 1 if multiple_options is None else multiple_options
        prediction, answer = leval_predicted_options(prediction, multiple), letters
    normalized_answer = leval_normalize(answer)
    if all(ch in "ABCD" for ch in normalized_answer):  # em.py: an answer of option letters only
        normalized_prediction = leval_normalize(prediction)
        if normalized_prediction == normalized_answer:
            return 1.0
        return 0.25 if set(normalized_prediction) <= set(normalized_answer) else 0.0
    try:
        return float(float(prediction) == float(answer))
    except ValueError:
        return float(answer.lower().replace(" ", "") in prediction.lower().replace(" ", ""))


METRICS = {
    "qa_f1": qa_f1, "rouge_l": rouge_l, "rouge_l_summary": rouge_l_summary, "classification": classification,
    "retrieval": retrieval, "count": count, "code_sim": code_sim, "exact_match": exact_match,
}


def score(prediction: str, sample: Sample) -> float:
    """The sample's metric, max over its answers (LongBench eval.py and L-Eval both take the max). On LongBench's
    trec / triviaqa / samsum the prediction is first cut to its first line, as eval.py does."""
    info = sample.info
    if info.get("metric") not in METRICS:
        raise ValueError(f"sample.info['metric'] must be one of {sorted(METRICS)}, got {info.get('metric')!r}")
    if info.get("benchmark") == "longbench" and info.get("dataset") in FIRST_LINE_DATASETS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = METRICS[info["metric"]]
    return max(metric(prediction, answer, all_classes=info.get("all_classes"),
                      multiple_options=info.get("multiple_options")) for answer in sample.answers)


# ---------------------------------------------------------------------------------------------------- loading


def middle_truncate(ids: np.ndarray, budget: int) -> np.ndarray:
    """`ids` [n] if n <= budget, else its first ⌊budget/2⌋ and last ⌈budget/2⌉ ids (LongBench pred.py)."""
    if len(ids) <= budget:
        return ids
    head = budget // 2
    return np.concatenate([ids[:head], ids[len(ids) - (budget - head):]])


def fit_prompt(tokenizer: Tokenizer, text: str, length: int) -> tuple[np.ndarray, dict]:
    """(int32 [BOS] + middle-truncated ids of `text`, at most `length` long; info on the truncation)."""
    ids = tokenizer.encode(text)
    kept = middle_truncate(ids, length - 1)
    prompt = np.concatenate([[tokenizer.bos_id], kept]).astype(np.int32)
    return prompt, {"truncated": len(kept) < len(ids), "untruncated_tokens": len(ids) + 1}


def check_positive_int(name: str, value, *, minimum: int = 1, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or None" if optional else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def read_records(path: pathlib.Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line of a jsonl file."""
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_number}: a record must be a JSON object, got {type(record).__name__}")
            yield line_number, record


def require(record: dict, fields: tuple[str, ...], kind: str, where: str) -> None:
    for field in fields:
        if field not in record:
            raise ValueError(f"{where}: {kind} record has no field {field!r} (needs {', '.join(fields)}; "
                             f"has {', '.join(sorted(record))})")


def string_list(value, field: str, where: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{where}: {field!r} must be a non-empty list of strings, got {value!r:.80}")
    return value


def longbench_samples(record: dict, path: pathlib.Path, line_number: int, tokenizer: Tokenizer, length: int,
                      dataset: str | None, max_new_tokens: int | None) -> list[Sample]:
    where = f"{path}:{line_number}"
    require(record, LONGBENCH_FIELDS, "LongBench", where)
    name = dataset or record.get("dataset") or path.stem
    config = name[:-2] if name.endswith("_e") and name[:-2] in LONGBENCH_PROMPTS else name
    if config in LONGBENCH_CHINESE or record.get("language") == "zh":
        raise NotImplementedError(f"{where}: LongBench dataset {name!r} is Chinese; its metric needs the jieba word "
                                  f"segmenter, which longctx does not ship (English datasets: "
                                  f"{', '.join(LONGBENCH_PROMPTS)})")
    answers = record["answers"]
    answers = string_list([answers] if isinstance(answers, str) else answers, "answers", where)
    all_classes = record.get("all_classes")
    if all_classes is not None:
        all_classes = string_list(all_classes, "all_classes", where)
    for field in ("context", "input"):
        if not isinstance(record[field], str):
            raise ValueError(f"{where}: {field!r} must be a string, got {type(record[field]).__name__}")
    template = LONGBENCH_PROMPTS.get(config, GENERIC_PROMPT)
    prompt, truncation = fit_prompt(tokenizer, template.format(context=record["context"], input=record["input"]),
                                    length)
    metric = DATASET_METRICS.get(config, GENERIC_METRIC)
    return [Sample(
        task=f"longbench/{name}", prompt=prompt, answers=tuple(answers), length=length, depth=None,
        max_new_tokens=max_new_tokens or LONGBENCH_MAX_NEW_TOKENS.get(config, GENERIC_MAX_NEW_TOKENS),
        info={"benchmark": "longbench", "dataset": config, "metric": metric, "all_classes": all_classes,
              "id": record.get("_id"), **truncation},
    )]


def leval_prompt(name: str, exam: bool, document: str, instruction: str, reference: str) -> str:
    system = LEVAL_TASK_SYSTEM.get(name, LEVAL_EXAM_SYSTEM if exam else LEVAL_OPEN_SYSTEM)
    if name in LEVAL_PLAIN_TASKS:
        body = LEVAL_PLAIN_BODY.format(document=document, instruction=instruction)
    elif exam:
        body = LEVAL_EXAM_BODY.format(document=document, instruction=instruction)
    else:
        body = LEVAL_OPEN_BODY.format(document=document, instruction=instruction, n=len(reference.split()))
    return f"{system}\n\n{body}\nAnswer:"


def leval_samples(record: dict, path: pathlib.Path, line_number: int, tokenizer: Tokenizer, length: int,
                  dataset: str | None, max_new_tokens: int | None) -> list[Sample]:
    where = f"{path}:{line_number}"
    require(record, LEVAL_FIELDS, "L-Eval", where)
    name = dataset or path.stem
    if name in LEVAL_UNSUPPORTED:
        raise NotImplementedError(f"{where}: L-Eval task {name!r} needs L-Eval's task-specific answer extraction, "
                                  f"which is not implemented (unsupported: {', '.join(LEVAL_UNSUPPORTED)})")
    evaluation = record.get("evaluation")
    if evaluation in LEVAL_JUDGED:
        return []
    if evaluation not in LEVAL_METRICS:
        raise ValueError(f"{where}: 'evaluation' must be one of exam, f1, rouge, ngram, LLM, human (or absent), "
                         f"got {evaluation!r}")
    instructions = string_list(record["instructions"], "instructions", where)
    outputs = string_list(record["outputs"], "outputs", where)
    if len(instructions) != len(outputs):
        raise ValueError(f"{where}: 'instructions' ({len(instructions)}) and 'outputs' ({len(outputs)}) must have "
                         f"the same length")
    if not isinstance(record["input"], str):
        raise ValueError(f"{where}: 'input' (the document) must be a string, got {type(record['input']).__name__}")
    exam = evaluation == "exam"
    info = {"benchmark": "leval", "dataset": name, "metric": LEVAL_METRICS[evaluation], "evaluation": evaluation,
            "source": record.get("source")}
    if exam:
        info["multiple_options"] = name in LEVAL_MULTIPLE_OPTION_TASKS or any(
            len(option_letters(output) or "") > 1 for output in outputs)
    samples = []
    for index, (instruction, output) in enumerate(zip(instructions, outputs)):
        prompt, truncation = fit_prompt(tokenizer, leval_prompt(name, exam, record["input"], instruction, output),
                                        length)
        samples.append(Sample(
            task=f"leval/{name}", prompt=prompt, answers=(output,), length=length, depth=None,
            max_new_tokens=max_new_tokens or LEVAL_MAX_NEW_TOKENS,
            info={**info, "id": f"{path.name}:{line_number}#{index}", **truncation},
        ))
    return samples


def load(path: str | os.PathLike, tokenizer: Tokenizer, length: int, *, dataset: str | None = None,
         limit: int | None = None, max_new_tokens: int | None = None) -> list[Sample]:
    """Samples of a LongBench or L-Eval .jsonl file (format told by its first record; see the module docstring).

    length: the most tokens a prompt may have, BOS included (>= 2); longer prompts are middle-truncated.
    dataset: the LongBench dataset / L-Eval task name, overriding the record's "dataset" field and the file stem.
    limit: keep the first `limit` samples (reading stops there). max_new_tokens: overrides the dataset's.
    info: benchmark, dataset, metric, id, truncated, untruncated_tokens (the full prompt's tokens with BOS); LongBench
    adds all_classes (None if absent); L-Eval adds evaluation, source, and multiple_options on exam samples.
    """
    check_positive_int("length", length, minimum=2)
    check_positive_int("limit", limit, optional=True)
    check_positive_int("max_new_tokens", max_new_tokens, optional=True)
    if dataset is not None and (not isinstance(dataset, str) or not dataset):
        raise ValueError(f"dataset must be a non-empty string or None, got {dataset!r}")
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no LongBench / L-Eval jsonl file at {path}")
    length = int(length)
    samples, make_samples, generic = [], None, set()
    for line_number, record in read_records(path):
        where = f"{path}:{line_number}"
        if make_samples is None:
            if "instructions" in record or "outputs" in record:
                make_samples = leval_samples
            elif "context" in record or "answers" in record:
                make_samples = longbench_samples
            else:
                raise ValueError(f"{where}: neither a LongBench record (fields {', '.join(LONGBENCH_FIELDS)}) nor an "
                                 f"L-Eval record (fields {', '.join(LEVAL_FIELDS)}); has {', '.join(sorted(record))}")
        new = make_samples(record, path, line_number, tokenizer, length, dataset, max_new_tokens)
        generic.update(s.info["dataset"] for s in new if s.info["benchmark"] == "longbench"
                       and s.info["dataset"] not in LONGBENCH_PROMPTS)
        samples.extend(new)
        if limit is not None and len(samples) >= limit:
            break
    if make_samples is None:
        raise ValueError(f"{path} has no records")
    for name in sorted(generic):
        log.warning("LongBench dataset %r is not one of LongBench's English datasets: generic prompt %r, metric %s, "
                    "%d new tokens", name, GENERIC_PROMPT, GENERIC_METRIC, GENERIC_MAX_NEW_TOKENS)
    return samples[:limit]
