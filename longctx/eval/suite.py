"""`evaluate(workdir, lengths, schemes, options)`: a trained run measured at each length under each position scheme,
on every task asked for.

Tasks (`TASKS`):
- "ppl": perplexity vs length on held-out documents (`ppl.py`; also sliding-window perplexity with
  `Options.stride`) and the loss as a function of position at the longest length.
- "passkey", "niah", "ruler": retrieval prompts built per length (and depth) by `passkey.py`, `niah.py`,
  `ruler.py`, answered by greedy generation through the KV cache (`longctx.infer.generate`), scored per sample.
- "longbench": LongBench- / L-Eval-style jsonl files the user brings (`longbench.py`), truncated in the middle to
  each length.

The scheme at evaluation time may differ from training's: the run's parameters are kept and only the scheme is
swapped, taking over the trained scheme's parameters that the new one shares (e.g. `theta`); `overrides` set the
scheme's own parameters (`--config.model.positions.factor=8`).
"""

import collections
import dataclasses
import functools
import json
import logging
import numbers
import pathlib
import time
from typing import Any

import ml_collections
import numpy as np
import tqdm

from longctx import positions
from longctx.config import positions_config
from longctx.data import ChatPrompts, Tokenizer, load_tokenizer, pipeline
from longctx.eval import longbench, niah, passkey, ppl, ruler
from longctx.eval.tasks import Sample
from longctx.infer.compress import Compression
from longctx.infer.generate import Generator, check_generation
from longctx.models import adapt_params, build_model, check_forward, param_structure
from longctx.train import checkpoint

log = logging.getLogger("longctx.eval")

TASKS = ("ppl", "passkey", "niah", "ruler", "longbench")
GENERATION_TASKS = ("passkey", "niah", "ruler", "longbench")
PROMPT_FORMATS = ("plain", "chat")
MAX_NEW_TOKENS_BOUND = 128  # room the generation checks give the answers (the tasks' answers are shorter)


@dataclasses.dataclass(frozen=True)
class Options:
    """How to run the tasks. depths: needle depths of passkey and niah (0 = start, 1 = end); num_samples: prompts
    per (task, length, depth) cell; stride: also sliding-window perplexity with this stride (None: not);
    documents: a `data.source` spec (files or globs) whose every document perplexity reads, and niah and RULER's
    essay tasks hide needles in, instead of the run's held-out split (None: that split); haystack: a text file for
    niah and RULER's essay tasks instead (None: those documents); ruler_tasks: which RULER tasks; longbench: jsonl
    files; batch_size: generation batch (None: the run's eval.batch_size); prefill_chunk: prompt columns per
    prefill call; seed: of every sampled prompt; prompt_format: "plain" ([BOS] + text, as training documents
    begin) or "chat" (the text as a user's turn of the tokenizer's chat template, `longctx.data.ChatPrompts`);
    cache, page_size, compression: the KV cache generation runs with; unroll_layers: generation with the layers
    unrolled (faster decoding steps, about three times the compilation; `longctx.infer.generate.Generator`)."""

    tasks: tuple[str, ...] = ("ppl",)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    num_samples: int = 4
    stride: int | None = None
    documents: str | None = None
    haystack: str | None = None
    ruler_tasks: tuple[str, ...] = ruler.TASKS
    longbench: tuple[str, ...] = ()
    batch_size: int | None = None
    prefill_chunk: int | None = 1024
    seed: int = 0
    prompt_format: str = "plain"
    cache: str = "auto"
    page_size: int | None = None
    compression: Compression | None = None
    unroll_layers: bool = False

    def check(self) -> None:
        unknown = [task for task in self.tasks if task not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"--tasks must name some of {', '.join(TASKS)}, got {','.join(self.tasks) or 'none'}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"--tasks names a task twice: {','.join(self.tasks)}")
        if not self.depths or any(not 0 <= d <= 1 for d in self.depths) or list(self.depths) != sorted(set(
                self.depths)):
            raise ValueError(f"--depths must be increasing numbers in [0, 1], got {list(self.depths)}")
        for name in ("num_samples", "stride", "batch_size", "prefill_chunk"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                                      or value < 1):
                raise ValueError(f"--{name} must be a positive int, got {value!r}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"--prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format!r}")
        if self.prompt_format == "chat" and "longbench" in self.tasks:
            raise ValueError("--prompt_format chat: longbench prompts are cut in the middle of their ids and asked as "
                             "plain text; evaluate longbench with --prompt_format plain")
        bad = [name for name in self.ruler_tasks if name not in ruler.TASKS]
        if bad:
            raise ValueError(f"--ruler_tasks: unknown {', '.join(bad)}; RULER tasks: {', '.join(ruler.TASKS)}")
        if "longbench" in self.tasks and not self.longbench:
            raise ValueError("--tasks longbench needs --longbench=<file.jsonl,...> (LongBench or L-Eval jsonl)")
        for path in (*self.longbench, *([self.haystack] if self.haystack else [])):
            if not pathlib.Path(path).is_file():
                raise FileNotFoundError(f"no such file: {path}")


@dataclasses.dataclass
class Scheme:
    """A position scheme to evaluate with: its label in tables and its `model.positions` config."""

    label: str
    positions: ml_collections.ConfigDict


@dataclasses.dataclass
class Evaluation:
    """An evaluation whose inputs have all been checked: what `prepare` hands to `run`."""

    workdir: pathlib.Path
    config: ml_collections.ConfigDict
    step: int
    schemes: list[Scheme]
    lengths: list[int]
    options: Options
    tokenizer: Tokenizer
    windows: dict[int, np.ndarray] | None
    unigram_log_probs: np.ndarray | None
    samples: dict[str, list[Sample]]


@functools.lru_cache(maxsize=4)
def split_documents(data_json: str, split: str) -> tuple[np.ndarray, ...]:
    """The tokenized documents of `split` of the data config `data_json` (which names the tokenizer), read once per
    process: the held-out split serves perplexity and the haystack, and evaluations of one run under many schemes
    (a study's variants, each its own `evaluate`) share both splits."""
    data = ml_collections.ConfigDict(json.loads(data_json))
    return tuple(pipeline.eval_documents(data, split, load_tokenizer(data.tokenizer)))


def scheme_config(trained: ml_collections.ConfigDict, name: str, overrides: dict | None = None
                  ) -> ml_collections.ConfigDict:
    """`model.positions` for scheme `name`: the trained scheme's values of the parameters both take, then those of
    `overrides` that this scheme takes."""
    params = positions.default_params(name)
    shared = {key: value for key, value in trained.items() if key != "name" and key in params}
    shared.update({key: value for key, value in (overrides or {}).items() if key in params})
    return positions_config(name, **shared)


def resolve_schemes(trained: ml_collections.ConfigDict, names: list[str] | None,
                    overrides: dict | None = None) -> list[Scheme]:
    """The schemes `--positions` names (default: the trained one; "all": every registered scheme, the trained one
    first), each with `overrides` applied where it takes them."""
    names = names or [trained.name]
    if "all" in names:
        names = [trained.name] + [name for name in positions.names() if name != trained.name]
    if len(set(names)) != len(names):
        raise ValueError(f"--positions names a scheme twice: {','.join(names)}")
    for name in names:
        positions.scheme_class(name)
    for key in overrides or {}:
        if not any(key in positions.default_params(name) for name in names):
            raise ValueError(f"--config.model.positions.{key}: none of the evaluated schemes ({', '.join(names)}) "
                             f"takes {key!r}")
    return [Scheme(name, scheme_config(trained, name, overrides)) for name in names]


def scheme_model(config: ml_collections.ConfigDict, scheme: Scheme, vocab_size: int):
    """The run's model with `scheme` in place of the trained one (same parameters)."""
    model_config = ml_collections.ConfigDict(config.model.to_dict())
    model_config.positions = scheme.positions
    return build_model(model_config, vocab_size, config.data.seq_len)


def check_lengths(lengths: list[int]) -> None:
    if not lengths or any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 2 for n in lengths):
        raise ValueError(f"--lengths must be integers >= 2, got {lengths}")
    if any(a >= b for a, b in zip(lengths, lengths[1:])):
        raise ValueError(f"--lengths must be increasing without repeats, got {','.join(map(str, lengths))}")


def build_samples(options: Options, tokenizer: Tokenizer, lengths: list[int], haystack: str | None
                  ) -> dict[str, list[Sample]]:
    """The prompts of every generation task asked for."""
    samples = {}
    common = {"num_samples": options.num_samples, "seed": options.seed}
    if "passkey" in options.tasks:
        samples["passkey"] = passkey.build(tokenizer, lengths, options.depths, **common)
    if "niah" in options.tasks:
        samples["niah"] = niah.build(tokenizer, lengths, options.depths, haystack=haystack, **common)
    if "ruler" in options.tasks:
        samples["ruler"] = ruler.build(tokenizer, lengths, tasks=options.ruler_tasks, haystack=haystack, **common)
    if "longbench" in options.tasks:
        samples["longbench"] = [sample for length in lengths for path in options.longbench
                                for sample in longbench.load(path, tokenizer, length, limit=options.num_samples)]
    return samples


def prepare(workdir: str | pathlib.Path, lengths: list[int], schemes: list[str] | list[Scheme] | None = None, *,
            options: Options = Options(), step: int | None = None, num_documents: int | None = None,
            overrides: dict | None = None) -> Evaluation:
    """Checks the request and builds every input; raises ValueError / FileNotFoundError naming the culprit.

    `schemes`: names (see `resolve_schemes`) or ready `Scheme`s (labelled variants, as the bake-off passes).
    """
    workdir = pathlib.Path(workdir)
    config = checkpoint.load_run_config(workdir)
    options.check()
    if schemes and all(isinstance(s, Scheme) for s in schemes):
        if len({s.label for s in schemes}) != len(schemes):
            raise ValueError(f"scheme labels must differ, got {[s.label for s in schemes]}")
    else:
        schemes = resolve_schemes(config.model.positions, schemes, overrides)
    check_lengths(lengths)
    num_documents = config.eval.num_documents if num_documents is None else num_documents
    if isinstance(num_documents, bool) or not isinstance(num_documents, numbers.Integral) or num_documents < 1:
        raise ValueError(f"--num_documents must be a positive int, got {num_documents!r}")
    checkpoints = checkpoint.Checkpoints(workdir)
    step = checkpoints.step_to_restore(step, f"--workdir {workdir}")
    checkpoints.close()

    tokenizer = load_tokenizer(config.data.tokenizer)
    generating = any(task in GENERATION_TASKS for task in options.tasks)
    for scheme in schemes:
        model = scheme_model(config, scheme, tokenizer.vocab_size)
        limit = model.position_scheme.max_length()
        if limit is not None and max(lengths) > limit:
            raise ValueError(f"position scheme {scheme.label!r} is defined up to {limit} tokens, and --lengths goes "
                             f"to {max(lengths)}; evaluate at shorter lengths or raise the scheme's range")
        if "ppl" in options.tasks:
            abstract = param_structure(model)[0]
            for length in lengths:
                check_forward(model, config.eval.batch_size, length, packed=False, abstract_params=abstract)
        if generating:  # the path generation runs: prefill chunks into a cache of the longest length, then decoding,
            # with the layers as the Generator runs them (under nn.scan, unless unrolled: then traced 30 times)
            generating_model = model.clone(config=dataclasses.replace(model.config,
                                                                      scan_layers=not options.unroll_layers))
            check_generation(generating_model, param_structure(generating_model)[0],
                             batch_size=options.batch_size or config.eval.batch_size,
                             max_length=max(lengths) + MAX_NEW_TOKENS_BOUND, prefill_chunk=options.prefill_chunk,
                             cache=options.cache, page_size=options.page_size)

    if "ppl" in options.tasks and options.stride is not None and options.stride > min(lengths):
        raise ValueError(f"--stride {options.stride} is longer than the shortest length {min(lengths)}")

    def documents(split: str) -> tuple[np.ndarray, ...]:
        data = config.data
        if split == "valid" and options.documents is not None:  # every document of the given files is held out
            data = ml_collections.ConfigDict(config.data.to_dict())
            data.update(source=options.documents, valid_fraction=1.0)
            data.mixture = ml_collections.ConfigDict()  # update() would merge into a mixture, not empty it
        return split_documents(data.to_json(sort_keys=True), split)

    windows = unigram = None
    if "ppl" in options.tasks:
        windows = ppl.eval_windows(documents("valid"), lengths, num_documents)
        found = len(windows[lengths[0]])
        if found < num_documents:
            log.warning("only %d held-out documents have %d tokens or more; evaluating on %d, not the %d asked for",
                        found, max(lengths), found, num_documents)
        unigram = ppl.unigram_log_probs(documents("train"), tokenizer.vocab_size)
    haystack = None
    if {"niah", "ruler"} & set(options.tasks):
        haystack = (pathlib.Path(options.haystack).read_text() if options.haystack
                    else "\n".join(tokenizer.decode(document) for document in documents("valid")))
    prompts = tokenizer
    if options.prompt_format == "chat" and generating:
        try:
            prompts = ChatPrompts(tokenizer)
        except ValueError as error:
            raise ValueError(f"--prompt_format chat: {error}") from None
    samples = build_samples(options, prompts, lengths, haystack)
    return Evaluation(workdir, config, step, schemes, lengths, options, tokenizer, windows, unigram,
                      samples)


class Progress:
    """One bar over every prompt of an evaluation (perplexity's windows count as prompts), showing the tokens the
    model has read and written per second; each scheme's and task's seconds and tokens go into the report."""

    def __init__(self, total: int):
        self.bar = tqdm.tqdm(total=total, desc="eval", unit="prompt", disable=None)
        self.start = time.perf_counter()
        self.tokens, self.label = 0, ""
        self.timing: dict[str, dict[str, dict[str, float]]] = {}

    def begin(self, scheme: str, task: str) -> None:
        self.label, self.scheme, self.task = f"{scheme}: {task}", scheme, task
        self.task_start, self.task_tokens = time.perf_counter(), 0

    def step(self, prompts: int, tokens: int) -> None:
        self.tokens += tokens
        self.task_tokens += tokens
        self.bar.update(prompts)
        self.bar.set_postfix_str(f"{self.label}, {self.tokens / (time.perf_counter() - self.start):,.0f} tok/s")

    def end(self) -> None:
        seconds = time.perf_counter() - self.task_start
        self.timing.setdefault(self.scheme, {})[self.task] = {"seconds": round(seconds, 2),
                                                              "tokens": self.task_tokens}
        log.info("%s: %d tokens in %.1f s (%.0f tokens/s, compilation included)", self.label, self.task_tokens,
                 seconds, self.task_tokens / seconds)

    def close(self) -> None:
        self.bar.close()


def perplexity_results(evaluation: Evaluation, model, params, progress: Progress | None = None) -> dict[str, Any]:
    """ppl (and sliding-window ppl) at each length, and the loss by position at the longest."""
    lengths, windows, batch_size = evaluation.lengths, evaluation.windows, evaluation.config.eval.batch_size
    results = {"ppl": {}, "position_loss": None}
    for length in lengths:
        nll = ppl.model_nll(model, params, windows[length], batch_size)
        if progress is not None:
            progress.step(len(windows[length]), windows[length].size)
        results["ppl"][str(length)] = ppl.perplexity(nll)
        if length == lengths[-1]:
            results["position_loss"] = ppl.loss_by_position(nll)
    if evaluation.options.stride is not None:
        longest = windows[lengths[-1]]
        results["ppl_sliding"] = {
            str(length): ppl.perplexity(ppl.sliding_nll(model, params, longest, length,
                                                        min(evaluation.options.stride, length), batch_size))
            for length in lengths}
    return results


def generation_results(evaluation: Evaluation, generator: Generator, task: str,
                       progress: Progress | None = None) -> dict[str, Any]:
    """Greedy answers to `task`'s samples, scored: the mean by length (and by depth, per RULER task or per
    LongBench dataset), and one example answer per (task, length)."""
    samples, tokenizer = evaluation.samples[task], evaluation.tokenizer
    scorer = {"passkey": passkey.score, "niah": niah.score, "ruler": ruler.score, "longbench": longbench.score}[task]
    batch_size = evaluation.options.batch_size or evaluation.config.eval.batch_size
    groups = collections.defaultdict(list)
    for index, sample in enumerate(samples):
        groups[sample.max_new_tokens].append(index)
    predictions = [""] * len(samples)
    for max_new_tokens, indices in groups.items():
        outputs = generator.generate_batched([samples[i].prompt for i in indices], max_new_tokens=max_new_tokens,
                                             batch_size=batch_size, stop_ids=[tokenizer.eos_id],
                                             on_batch=progress and progress.step)
        for i, output in zip(indices, outputs):
            predictions[i] = tokenizer.decode(output)
    by_cell = collections.defaultdict(list)
    for sample, prediction in zip(samples, predictions):
        score = scorer(prediction, sample)
        by_cell[(sample.task, sample.length)].append(score)
        if sample.depth is not None and task in ("passkey", "niah"):
            by_cell[(sample.task, sample.length, sample.depth)].append(score)
        if task == "niah":
            by_cell[("niah/exact", sample.length)].append(niah.exact_match(prediction, sample))
    result: dict[str, Any] = collections.defaultdict(dict)
    for key, scores in sorted(by_cell.items(), key=lambda item: tuple(map(str, item[0]))):
        name, length = key[0], str(key[1])
        if len(key) == 3:
            result.setdefault(f"{name}/by_depth", {}).setdefault(length, {})[str(key[2])] = float(np.mean(scores))
        else:
            result[name][length] = float(np.mean(scores))
    examples = {}
    for sample, prediction in zip(samples, predictions):
        examples.setdefault(f"{sample.task}@{sample.length}", {"answers": list(sample.answers),
                                                               "prediction": prediction})
    result["examples"] = examples
    return dict(result)


def run(evaluation: Evaluation) -> dict[str, Any]:
    """Runs every task of `evaluation`; returns the report as a JSON-able dict."""
    config, lengths, options = evaluation.config, evaluation.lengths, evaluation.options
    vocab_size = evaluation.tokenizer.vocab_size
    trained_model = build_model(config.model, vocab_size, config.data.seq_len)
    checkpoints = checkpoint.Checkpoints(evaluation.workdir)
    params = checkpoints.restore_params(evaluation.step, param_structure(trained_model)[0])
    checkpoints.close()

    report: dict[str, Any] = {
        "workdir": str(evaluation.workdir), "step": evaluation.step, "train_seq_len": config.data.seq_len,
        "lengths": lengths, "tasks": list(options.tasks),
        "options": json.loads(json.dumps(dataclasses.asdict(options))),
        "trained_positions": config.model.positions.to_dict(),
        "schemes": {scheme.label: scheme.positions.to_dict() for scheme in evaluation.schemes},
    }
    if evaluation.windows is not None:
        report["num_documents"] = len(evaluation.windows[lengths[0]])
        report["unigram"] = {str(n): ppl.perplexity(ppl.unigram_nll(evaluation.unigram_log_probs,
                                                                     evaluation.windows[n])) for n in lengths}
        report["ppl"], report["position_loss"] = {}, {}
        if options.stride is not None:
            report["ppl_sliding"] = {}
    for task in evaluation.samples:
        report[task] = {}
    prompts = sum(len(samples) for samples in evaluation.samples.values())
    if evaluation.windows is not None:
        prompts += sum(len(evaluation.windows[n]) for n in lengths)
    progress = Progress(len(evaluation.schemes) * prompts)
    longest = max((len(sample.prompt) + sample.max_new_tokens for samples in evaluation.samples.values()
                   for sample in samples), default=None)
    for scheme in evaluation.schemes:
        model = scheme_model(config, scheme, vocab_size)
        model_params = adapt_params(model, params, scheme.label)
        if evaluation.windows is not None:
            progress.begin(scheme.label, "ppl")
            results = perplexity_results(evaluation, model, model_params, progress)
            for key, value in results.items():
                report[key][scheme.label] = value
            progress.end()
        # Caches of the longest prompt's size: one compiled prefill chunk and decoding loop serve every length.
        generator = Generator(model, model_params, pad_id=evaluation.tokenizer.pad_id,
                              prefill_chunk=options.prefill_chunk, max_length=longest, cache=options.cache,
                              page_size=options.page_size, compression=options.compression,
                              unroll_layers=options.unroll_layers)
        for task in evaluation.samples:
            progress.begin(scheme.label, task)
            report[task][scheme.label] = generation_results(evaluation, generator, task, progress)
            progress.end()
    progress.close()
    report["timing"] = progress.timing
    return report


def evaluate(workdir: str | pathlib.Path, lengths: list[int], schemes: list[str] | list[Scheme] | None = None, *,
             options: Options = Options(), step: int | None = None, num_documents: int | None = None,
             overrides: dict | None = None) -> dict[str, Any]:
    """Evaluates the run in `workdir` (its newest checkpoint, or `step`); returns the report."""
    return run(prepare(workdir, lengths, schemes, options=options, step=step, num_documents=num_documents,
                       overrides=overrides))
