"""Between HF model directories and longctx runs: `hf_to_run` makes an HF checkpoint (or a llama.cpp GGUF file,
tokenizer included) a run that `longctx.eval` measures (and `--positions` re-extends); `run_to_hf` writes a trained
or converted run as a directory transformers loads.

A converted run holds the HF model's config as a longctx config (sizes, q/k/v biases, mask, position scheme and its
parameters, `model.vocab_size` for a padded embedding) and a weights-only checkpoint at step 0; it can be evaluated,
not resumed (there is no optimizer or data state to continue from).
"""

import pathlib

import jax
import ml_collections

from longctx import positions
from longctx.config import base_config, positions_config, validate
from longctx.data import HFTokenizer, load_tokenizer
from longctx.models import build_model, gguf, hf, init_params
from longctx.positions.base import scheme_params
from longctx.train import checkpoint

TOKENIZER_FILE = "tokenizer.json"


def positions_config_of(scheme: positions.PositionScheme) -> ml_collections.ConfigDict:
    """`model.positions` holding `scheme`'s name and parameters (tuples as lists, as configs store them)."""
    values = {name: getattr(scheme, name) for name in scheme_params(type(scheme))}
    values = {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}
    return positions_config(scheme.scheme_name, **values)


def is_gguf(source: pathlib.Path) -> bool:
    """Whether `source` names a GGUF model file (else an HF model directory)."""
    return source.suffix == ".gguf"


def run_config(source: pathlib.Path, *, tokenizer: str | None = None, seq_len: int | None = None,
               dtype: str = "float32") -> ml_collections.ConfigDict:
    """The longctx config of the model in `source`, an HF directory or a GGUF file: data.tokenizer is the directory's
    tokenizer.json (the GGUF file itself, which carries its tokenizer; `hf_to_run` writes that into the run) unless
    `tokenizer` is given, data.seq_len the model's max_position_embeddings (GGUF: context_length) unless `seq_len`
    is."""
    if is_gguf(source):
        hf_config = gguf.hf_config(gguf.open_file(source))
        tokenizer = tokenizer or str(source.absolute())
    else:
        hf_config = hf.read_config(source)
        if tokenizer is None:
            if not (source / TOKENIZER_FILE).exists():
                raise FileNotFoundError(f"{source} has no {TOKENIZER_FILE}; name the model's tokenizer with "
                                        f"--tokenizer")
            tokenizer = str((source / TOKENIZER_FILE).absolute())
    llama = hf.llama_config_from_hf(hf_config, dtype=dtype)
    config = base_config()
    config.model.update(
        vocab_size=llama.vocab_size, hidden_size=llama.hidden_size, intermediate_size=llama.intermediate_size,
        num_layers=llama.num_layers, num_heads=llama.num_heads, num_kv_heads=llama.num_kv_heads,
        head_dim=llama.head_dim, rms_norm_eps=llama.rms_norm_eps, tie_embeddings=llama.tie_embeddings,
        qkv_bias=llama.qkv_bias, dtype=dtype)
    config.model.attention.mask = llama.mask.spec
    with config.unlocked():
        config.model.positions = positions_config_of(positions.from_hf_config(hf_config))
    config.data.tokenizer = tokenizer
    config.data.seq_len = seq_len or hf_config["max_position_embeddings"]
    validate(config)
    return config


def hf_to_run(source: str | pathlib.Path, workdir: str | pathlib.Path, *, tokenizer: str | None = None,
              seq_len: int | None = None, dtype: str = "float32") -> ml_collections.ConfigDict:
    """Writes the model in `source` (an HF directory, or a GGUF file: `is_gguf`) as a longctx run in `workdir`
    (which must not hold a run); returns its config. Everything is read and checked before the workdir is touched.

    A GGUF file's own tokenizer is written into the run as tokenizer.json and tokenizer_config.json (its BOS / EOS /
    PAD), which load in milliseconds where reading the file's metadata takes seconds."""
    source, workdir = pathlib.Path(source), pathlib.Path(workdir)
    config = run_config(source, tokenizer=tokenizer, seq_len=seq_len, dtype=dtype)
    run_tokenizer = load_tokenizer(config.data.tokenizer)
    build_model(config.model, run_tokenizer.vocab_size, config.data.seq_len)  # the tokenizer fits the embedding
    _, params = (gguf if is_gguf(source) else hf).load(source, dtype=dtype)
    checkpoint.check_workdir(workdir, config, resume=False, overwrite=False)
    files_tokenizer = is_gguf(source) and tokenizer is None
    if files_tokenizer:
        config.data.tokenizer = str((workdir / TOKENIZER_FILE).absolute())
    checkpoint.start_workdir(workdir, config, overwrite=False)
    if files_tokenizer:
        run_tokenizer.save(workdir)
    checkpoints = checkpoint.Checkpoints(workdir, create=True)
    checkpoints.save_params(0, params, config)
    checkpoints.close()
    return config


def run_to_hf(workdir: str | pathlib.Path, hf_dir: str | pathlib.Path, *, step: int | None = None,
              dtype: str = "float32", max_position_embeddings: int | None = None,
              overwrite: bool = False) -> pathlib.Path:
    """Writes the run in `workdir` (its newest checkpoint, or `step`) as an HF directory; the run's HF tokenizer, if it
    has one, goes with it (tokenizer.json and tokenizer_config.json). `max_position_embeddings` defaults to the
    scheme's length, else data.seq_len."""
    workdir, hf_dir = pathlib.Path(workdir), pathlib.Path(hf_dir)
    config = checkpoint.load_run_config(workdir)
    tokenizer = load_tokenizer(config.data.tokenizer)
    model = build_model(config.model, tokenizer.vocab_size, config.data.seq_len)
    if max_position_embeddings is None and getattr(model.position_scheme, positions.TRAIN_LENGTH_FIELD, None) is None:
        max_position_embeddings = config.data.seq_len
    hf.hf_config_of(model, max_position_embeddings=max_position_embeddings, dtype=dtype)  # refuses before any work
    checkpoints = checkpoint.Checkpoints(workdir)
    available = checkpoints.manager.all_steps()
    if not available or (step is not None and step not in available):
        checkpoints.close()
        raise ValueError(f"{workdir} has no checkpoint {'at step ' + str(step) if step is not None else ''}; "
                         f"it has steps {sorted(available)}")
    abstract = jax.eval_shape(lambda: init_params(model, jax.random.key(0))[0])
    params = checkpoints.restore_params(max(available) if step is None else step, abstract)
    checkpoints.close()
    token_ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    path = hf.save(model, params, hf_dir, max_position_embeddings=max_position_embeddings, dtype=dtype,
                   extra_config=token_ids, overwrite=overwrite)
    if isinstance(tokenizer, HFTokenizer):  # a tokenizer.json, or a GGUF file's tokenizer
        tokenizer.save(path)
    return path
