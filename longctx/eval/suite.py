"""`evaluate(workdir, lengths, schemes)`: perplexity of a trained run at each length under each position scheme.

The scheme at evaluation time may differ from training's: the run's parameters are kept and only the scheme is
swapped, taking over the trained scheme's parameters that the new one shares (e.g. `theta`).
"""

import dataclasses
import logging
import numbers
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm

from longctx import positions
from longctx.config import positions_config
from longctx.data import Tokenizer, load_documents, load_tokenizer, tokenize_documents
from longctx.eval import ppl
from longctx.models import build_model, check_forward, init_params
from longctx.train import checkpoint

log = logging.getLogger("longctx.eval")


def scheme_config(trained: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """`model.positions` for scheme `name`, sharing the trained scheme's values of the parameters both take."""
    shared = {key: value for key, value in trained.items() if key != "name" and key in positions.default_params(name)}
    return positions_config(name, **shared)


@dataclasses.dataclass
class Evaluation:
    """An evaluation whose inputs have all been checked: what `prepare` hands to `run`."""

    workdir: pathlib.Path
    config: ml_collections.ConfigDict
    step: int
    schemes: list[str]
    lengths: list[int]
    tokenizer: Tokenizer
    windows: dict[int, np.ndarray]
    unigram_log_probs: np.ndarray


def scheme_model(config: ml_collections.ConfigDict, name: str, vocab_size: int):
    """The run's model with position scheme `name` in place of the trained one (same parameters)."""
    model_config = ml_collections.ConfigDict(config.model.to_dict())
    model_config.positions = scheme_config(config.model.positions, name)
    return build_model(model_config, vocab_size, config.data.seq_len)


def check_lengths(lengths: list[int]) -> None:
    if not lengths or any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 2 for n in lengths):
        raise ValueError(f"--lengths must be integers >= 2, got {lengths}")
    if any(a >= b for a, b in zip(lengths, lengths[1:])):
        raise ValueError(f"--lengths must be increasing without repeats, got {','.join(map(str, lengths))}")


def prepare(workdir: str | pathlib.Path, lengths: list[int], schemes: list[str] | None = None,
            step: int | None = None, num_documents: int | None = None) -> Evaluation:
    """Checks the request and loads the held-out windows; raises ValueError / FileNotFoundError naming the culprit.

    `schemes` defaults to the trained scheme; "all" in it means every registered scheme, the trained one first.
    """
    workdir = pathlib.Path(workdir)
    config = checkpoint.load_run_config(workdir)
    trained = config.model.positions.name
    schemes = schemes or [trained]
    if "all" in schemes:
        schemes = [trained] + [name for name in positions.names() if name != trained]
    if len(set(schemes)) != len(schemes):
        raise ValueError(f"--positions names a scheme twice: {','.join(schemes)}")
    for name in schemes:
        positions.scheme_class(name)
    check_lengths(lengths)
    num_documents = config.eval.num_documents if num_documents is None else num_documents
    if isinstance(num_documents, bool) or not isinstance(num_documents, numbers.Integral) or num_documents < 1:
        raise ValueError(f"--num_documents must be a positive int, got {num_documents!r}")
    checkpoints = checkpoint.Checkpoints(workdir)
    available = checkpoints.manager.all_steps()
    checkpoints.close()
    if not available:
        raise FileNotFoundError(f"{workdir} holds no checkpoint to evaluate")
    if step is not None and step not in available:
        raise ValueError(f"--step {step} has no checkpoint in {workdir}; it has steps {sorted(available)}")

    tokenizer = load_tokenizer(config.data.tokenizer)
    for name in schemes:
        model = scheme_model(config, name, tokenizer.vocab_size)
        for length in lengths:
            check_forward(model, config.eval.batch_size, length, packed=False)

    def tokenized(split: str) -> list[np.ndarray]:
        documents = load_documents(config.data.source, split, text_field=config.data.text_field,
                                   valid_fraction=config.data.valid_fraction)
        return tokenize_documents(documents, tokenizer)

    windows = ppl.eval_windows(tokenized("valid"), lengths, num_documents)
    found = len(windows[lengths[0]])
    if found < num_documents:
        log.warning("only %d held-out documents have %d tokens or more; evaluating on %d, not the %d asked for",
                    found, max(lengths), found, num_documents)
    unigram = ppl.unigram_log_probs(tokenized("train"), tokenizer.vocab_size)
    return Evaluation(workdir, config, step or max(available), schemes, lengths, tokenizer, windows, unigram)


def params_for(model, params: dict, name: str) -> dict:
    """The trained `params` as `model` (the run's model under scheme `name`) takes them: parameters of the trained
    scheme that this one lacks are dropped, and those this scheme owns but the run never trained (CLEX's ODE on a RoPE
    run) start from their initial values, which is how the scheme's paper applies it without training."""
    abstract = jax.eval_shape(lambda: init_params(model, jax.random.key(0))[0])
    fresh = sorted(set(abstract) - set(params))
    if fresh:
        log.info("position scheme %s: %s not in the checkpoint; using their initial values", name, ", ".join(fresh))
        initial = init_params(model, jax.random.key(0))[0]
        params = {**params, **{key: initial[key] for key in fresh}}
    return {key: params[key] for key in abstract}


def run(evaluation: Evaluation) -> dict[str, Any]:
    """Computes every perplexity of `evaluation`; returns the report as a JSON-able dict."""
    config, lengths, windows = evaluation.config, evaluation.lengths, evaluation.windows
    vocab_size = evaluation.tokenizer.vocab_size
    trained_model = build_model(config.model, vocab_size, config.data.seq_len)
    abstract = jax.eval_shape(lambda: init_params(trained_model, jax.random.key(0))[0])
    checkpoints = checkpoint.Checkpoints(evaluation.workdir)
    params = checkpoints.restore_params(evaluation.step, abstract)
    checkpoints.close()

    report = {
        "workdir": str(evaluation.workdir), "step": evaluation.step, "train_seq_len": config.data.seq_len,
        "lengths": lengths, "num_documents": len(windows[lengths[0]]),
        "trained_positions": config.model.positions.to_dict(), "ppl": {},
        "unigram": {str(n): ppl.perplexity(ppl.unigram_nll(evaluation.unigram_log_probs, windows[n]))
                    for n in lengths},
    }
    with tqdm.tqdm(total=len(evaluation.schemes) * len(lengths), desc="eval", disable=None) as bar:
        for name in evaluation.schemes:
            model = scheme_model(config, name, vocab_size)
            model_params = params_for(model, params, name)
            report["ppl"][name] = {}
            for length in lengths:
                nll = ppl.model_nll(model, model_params, windows[length], config.eval.batch_size)
                report["ppl"][name][str(length)] = ppl.perplexity(nll)
                bar.update(1)
    return report


def evaluate(workdir: str | pathlib.Path, lengths: list[int], schemes: list[str] | None = None,
             step: int | None = None, num_documents: int | None = None) -> dict[str, Any]:
    """Evaluates the run in `workdir` (its newest checkpoint, or `step`); returns the report."""
    return run(prepare(workdir, lengths, schemes, step=step, num_documents=num_documents))
