"""The documented base config every experiment overrides, and its validation.

Experiment files under `configs/` start from `base_config()` and change a few fields (big_vision style). Every field
is documented here, once. `validate(config)` checks the values that types alone cannot, naming the field and what is
allowed, before any work is done.
"""

import ml_collections

from longctx import positions
from longctx.attention import impl_names

CONFIG_ARG_KEYS = ("positions",)


def positions_config(name: str, **overrides) -> ml_collections.ConfigDict:
    """`model.positions` for scheme `name`: its name and every parameter with its default, then `overrides`."""
    params = positions.default_params(name)
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise ValueError(f"position scheme {name!r} has no parameter {', '.join(unknown)}; it takes: "
                         f"{', '.join(params) or 'no parameters'}")
    return ml_collections.ConfigDict({"name": name, **params, **overrides})


def parse_config_arg(arg: str | None) -> dict[str, str]:
    """Parses the `:key=value,...` suffix of `--config=configs/x.py:positions=none`."""
    if not arg:
        return {}
    parsed = {}
    for item in arg.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in CONFIG_ARG_KEYS:
            raise ValueError(f"config argument {item!r} is not key=value with key in {', '.join(CONFIG_ARG_KEYS)}")
        parsed[key] = value
    return parsed


def base_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """A ~76M-parameter Llama-style model at 4K on the stdlib corpus's bytes; `arg` may pick `positions=<scheme>`."""
    options = parse_config_arg(arg)
    c = ml_collections.ConfigDict()
    c.seed = 0  # Seeds the parameter initialisation and the data order.

    c.model = ml_collections.ConfigDict()
    c.model.vocab_size = 0  # Rows of the embedding; 0: the tokenizer's vocabulary size (an HF model's may be padded).
    c.model.hidden_size = 768  # Width of the residual stream.
    c.model.intermediate_size = 2048  # Hidden width of the SwiGLU MLP.
    c.model.num_layers = 12
    c.model.num_heads = 12  # Query heads.
    c.model.num_kv_heads = 4  # Key/value heads (grouped-query attention); divides num_heads.
    c.model.head_dim = 64
    c.model.rms_norm_eps = 1e-5
    c.model.tie_embeddings = False  # Share the token embedding with the output head.
    c.model.qkv_bias = False  # Biases on the q/k/v projections (Qwen2).
    c.model.dtype = "bfloat16"  # Compute dtype: float32 | bfloat16 | float16. Params are always float32.
    c.model.init_std = 0.02  # Standard deviation of the normal initialiser of every weight matrix.
    c.model.scan_layers = False  # nn.scan over layers: one compiled layer, faster compiles for deep models.
    # Rematerialisation of each layer: none | full | dots (keep matmul outputs) | offload (keep matmul outputs in
    # host memory, fetched back for the backward pass) | attention (keep only the Pallas flash kernels' output and
    # log-sum-exp, so the backward does not re-run the forward kernel) | dots_attention (both). With another attention
    # impl, attention keeps nothing and dots_attention is dots.
    c.model.remat = "none"
    c.model.attention = ml_collections.ConfigDict()
    c.model.attention.impl = "auto"  # auto | reference | xla | cudnn | pallas | pallas_interpret (attention.dispatch).
    # Every layer's mask: a pallas_kernels.masks spec — a registered mask's name with its parameters, or | / & of
    # them: "causal", "sliding_window(window=4096)", "sinks_window(sinks=4, window=4096)", "chunked_local(chunk=8192)",
    # "strided_heads(block=128, local_blocks=8, stride=16)" (S2-Attention), "block_mask(blocks='b.npy', block_q=128,
    # block_kv=128)". Every attention impl that cannot honour it refuses, naming it.
    c.model.attention.mask = "causal"
    # The position scheme and its parameters; pick another with `--config=<file>:positions=<name>`.
    c.model.positions = positions_config(options.get("positions", "rope"))

    c.data = ml_collections.ConfigDict()
    # Where documents come from (longctx.data.sources): "stdlib" (the interpreter's own .py files); comma-separated
    # paths/globs of .txt/.jsonl/.parquet files (optionally prefixed "files:"); "arrayrecord:<dir>" (pre-tokenised by
    # scripts/tokenize_corpus.py); "tfds:<name>" (a tensorflow-datasets set prepared in tfds_data_dir); or
    # "mixture": the weighted sources of `data.mixture`.
    c.data.source = "stdlib"
    # When source is "mixture": named components, each {"source": <spec>, "weight": <share of tokens>}, e.g.
    # configs/prolong_mix.py. Empty otherwise.
    c.data.mixture = ml_collections.ConfigDict()
    c.data.text_field = "text"  # Field holding the text in .jsonl / .parquet files and tfds examples.
    # Share of documents held out for evaluation, chosen by a stable hash of the path: 0 holds none out (a corpus to
    # train on only), 1 all of them (a corpus to evaluate on only); a split left empty raises when it is read.
    c.data.valid_fraction = 0.05
    c.data.on_error = "fatal"  # A corrupt or undecodable document: fatal (stop, naming file and line) | skip (warn).
    c.data.tfds_data_dir = ""  # Where tfds sets are prepared ("": tfds's default); nothing is ever downloaded.
    c.data.tfds_train_split = "train"  # The tfds split (any tfds split string) that training reads...
    c.data.tfds_valid_split = "validation"  # ...and the one evaluation reads.
    c.data.tokenizer = "byte"  # "byte", a HF tokenizer.json path, a sentencepiece .model path, or a GGUF file.
    c.data.seq_len = 4096  # Training length: the longest sequence of a batch.
    # How documents become rows of seq_len (longctx.data.packing): concat (concatenate and chunk: no padding, documents
    # cut at row ends) | first_fit | best_fit (bin packing of whole documents; longer ones cut into seq_len pieces) |
    # untie_knots (Untie the Knots: chunks of several documents shuffled into one sequence; data.untie_knots) |
    # decomposition (Dataset Decomposition: batches of one power-of-two length each; data.decomposition).
    c.data.packing = "first_fit"
    c.data.num_packing_bins = 0  # Rows the bin packers fill at once (more: less padding); 0: the batch's rows.
    c.data.decomposition = ml_collections.ConfigDict()
    c.data.decomposition.min_len = 256  # Shortest bucket (a power of two); shorter remainders of documents dropped.
    # Which bucket each step draws: fixed (by each bucket's share of tokens) | short_to_long | cyclic.
    c.data.decomposition.curriculum = "fixed"
    c.data.decomposition.cycles = 1  # Repetitions of the short-to-long schedule (cyclic only).
    c.data.untie_knots = ml_collections.ConfigDict()
    c.data.untie_knots.knot_prob = 1.0  # Share of rows knotted (the paper uses 0.3 to 0.8); the others concat-packed.
    c.data.untie_knots.num_chunks = 3  # Chunks each document of a knotted row is cut into, at random points.
    c.data.untie_knots.keep_chunk_order = False  # Keep a document's chunks in order when shuffling.
    # Backtracing: every chunk gets an ID, and after a document's last chunk the model must list its chunks' IDs in
    # document order (the paper's restore task).
    c.data.untie_knots.restore = False
    # Marker strings, tokenised with data.tokenizer (a tokenizer's special tokens may be named here).
    c.data.untie_knots.markers = ml_collections.ConfigDict({
        "knot_head": "<|knot|>",  # starts a chunk that continues an earlier chunk of its document
        "knot_tail": "<|/knot|>",  # ends a chunk that a later chunk continues
        "id_open": "<|id|>", "id_close": "<|/id|>",  # around a chunk's ID (restore only)
        "restore_open": "<|restore|>", "restore_sep": ",", "restore_close": "<|/restore|>",  # the restore answer
        "id_alphabet": "abcdefghijklmnopqrstuvwxyz",  # characters chunk IDs are spelled with, one token each
    })
    # Data shards: a global batch is the concatenation of `num_shards` independent streams, each over its own
    # 1/num_shards of the documents; every process reads only the shards of the rows its devices hold. 0: one per
    # group of processes holding the same rows. Fix it to resume on another process count with the same batches.
    c.data.num_shards = 0
    # Threads that read and tokenise documents ahead of the packer. 0 reads in the training loop's thread between
    # steps (the device computes meanwhile): fastest from a local disk on a few cores, where thread hand-offs cost
    # more than a read; raise it for remote storage (GCS) or slow per-document work.
    c.data.read_threads = 0
    # Share of training documents that are synthetic pass-key prompts with their answers (longctx.eval.passkey), of
    # up to seq_len tokens: teaches a small model to retrieve within its training length. 0: none.
    c.data.passkey_fraction = 0.0

    c.train = ml_collections.ConfigDict()
    c.train.steps = 10_000  # Length of the learning-rate schedule, and where training ends.
    # Sequences per optimizer step; with data.packing=decomposition, batch_size × seq_len tokens per step in rows of
    # the step's bucket length.
    c.train.batch_size = 32
    c.train.grad_accum_steps = 1  # Micro-batches per step (batch_size must divide evenly); same result, less memory.
    # Tokens of each row whose logits the loss computes at a time (longctx.train.loss.chunked_weighted_loss); must
    # divide the sequence length. 0: all at once ([batch, seq_len, vocab] float32 logits, forward and backward).
    c.train.loss_chunk = 0
    c.train.donate = True  # Donate params and optimizer state to the step, which updates them in place.
    c.train.learning_rate = 3e-4  # Peak learning rate.
    c.train.warmup_steps = 500  # Linear warm-up from 0 to the peak; clamped to train.steps (logged).
    c.train.min_lr_ratio = 0.1  # Cosine decay ends at learning_rate · min_lr_ratio at `steps`.
    c.train.weight_decay = 0.1  # AdamW decoupled weight decay (not applied to norm scales).
    c.train.b1 = 0.9
    c.train.b2 = 0.95
    c.train.eps = 1e-8
    c.train.grad_clip = 1.0  # Clip gradients to this global norm (0 disables).
    c.train.log_every = 10  # Steps between lines of metrics.jsonl.
    c.train.checkpoint_every = 1000  # Steps between checkpoints (the last step is always saved).
    c.train.keep_checkpoints = 2  # How many recent checkpoints orbax keeps.
    # A workdir whose newest params start this run (fine-tuning, e.g. at a longer length or with another position
    # scheme); params the source lacks (a new scheme's) start from their initial values. "": train from scratch.
    c.train.init_from = ""
    c.train.tensorboard = False  # Also write TensorBoard event files (needs tensorboardX) under <workdir>/tensorboard.

    c.parallel = ml_collections.ConfigDict()  # The device mesh (longctx/parallel/mesh.py); sizes multiply.
    c.parallel.data = -1  # Data-parallel devices; -1: every device the other axes leave.
    c.parallel.fsdp = 1  # Devices over which batch rows and params (their embed dimension) are split.
    c.parallel.tensor = 1  # Devices over which heads and the MLP width are split.
    c.parallel.sequence = 1  # Devices over which every sequence's tokens are split (context parallelism).
    # How attention spans the sequence axis: ring | ring_bidirectional | all_gather | ulysses.
    c.parallel.context = "ring"
    c.parallel.layout = "zigzag"  # Which tokens each sequence device holds: contiguous | zigzag | striped.
    c.parallel.distributed = False  # Multi-host: call jax.distributed.initialize (see scripts/launch_multihost.sh).
    c.parallel.coordinator_address = ""  # host:port of process 0; "" lets jax read it from SLURM, TPU or MPI.
    c.parallel.num_processes = 0  # 0: from the environment.
    c.parallel.process_id = -1  # -1: from the environment.

    c.eval = ml_collections.ConfigDict()
    c.eval.num_documents = 16  # Held-out documents per length; the same documents at every length.
    c.eval.batch_size = 4
    c.lock()
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first field whose value is not allowed."""
    from longctx.models import build_model  # Building the model checks every model field.

    if config.model.attention.impl not in impl_names():
        raise ValueError(f"model.attention.impl must be one of {', '.join(impl_names())}, "
                         f"got {config.model.attention.impl!r}")
    positive = {
        "data.seq_len": config.data.seq_len, "train.steps": config.train.steps,
        "train.batch_size": config.train.batch_size, "train.grad_accum_steps": config.train.grad_accum_steps,
        "train.log_every": config.train.log_every, "train.checkpoint_every": config.train.checkpoint_every,
        "train.keep_checkpoints": config.train.keep_checkpoints, "eval.num_documents": config.eval.num_documents,
        "eval.batch_size": config.eval.batch_size,
    }
    for field, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{field} must be a positive int, got {value!r}")
    if config.data.seq_len < 2:
        raise ValueError(f"data.seq_len must be >= 2 (a token and its successor), got {config.data.seq_len}")
    build_model(config.model, vocab_size=1, train_len=config.data.seq_len)
    if config.train.batch_size % config.train.grad_accum_steps:
        raise ValueError(f"train.batch_size ({config.train.batch_size}) must be a multiple of "
                         f"train.grad_accum_steps ({config.train.grad_accum_steps})")
    warmup = config.train.warmup_steps
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"train.warmup_steps must be an int >= 0 (one longer than train.steps is clamped to it), "
                         f"got {warmup!r}")
    if not config.train.learning_rate > 0:
        raise ValueError(f"train.learning_rate must be > 0, got {config.train.learning_rate}")
    if not 0 <= config.train.min_lr_ratio <= 1:
        raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {config.train.min_lr_ratio}")
    if config.train.grad_clip < 0:
        raise ValueError(f"train.grad_clip must be >= 0 (0 disables clipping), got {config.train.grad_clip}")
    from longctx.parallel import context, layout

    if config.parallel.context not in context.STRATEGIES:
        raise ValueError(f"parallel.context must be one of {', '.join(context.STRATEGIES)}, "
                         f"got {config.parallel.context!r}")
    if config.parallel.layout not in layout.LAYOUTS:
        raise ValueError(f"parallel.layout must be one of {', '.join(layout.LAYOUTS)}, got {config.parallel.layout!r}")
    if not 0 <= config.data.valid_fraction <= 1:
        raise ValueError(f"data.valid_fraction must be in [0, 1], got {config.data.valid_fraction}")
    if not 0 <= config.data.passkey_fraction < 1:
        raise ValueError(f"data.passkey_fraction must be in [0, 1), got {config.data.passkey_fraction}")
    validate_data(config.data)
    validate_loss_chunk(config)


def validate_loss_chunk(config: ml_collections.ConfigDict) -> None:
    """train.loss_chunk must be an int >= 0 that divides the length of every training row."""
    from longctx.data import pipeline

    chunk = config.train.loss_chunk
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise ValueError(f"train.loss_chunk must be an int >= 0 (0: no chunking), got {chunk!r}")
    if chunk:
        lengths = sorted({length for _, length in pipeline.batch_shapes(config)})
        if any(length % chunk for length in lengths):
            raise ValueError(f"train.loss_chunk={chunk} must divide every training row length, got rows of "
                             f"{', '.join(map(str, lengths))} tokens")


def validate_data(data: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first `data.*` field whose value is not allowed or has no effect."""
    from longctx.data import curriculum, pipeline, sources

    pipeline.source_specs(data)
    if data.on_error not in sources.ON_ERROR:
        raise ValueError(f"data.on_error must be one of {', '.join(sources.ON_ERROR)}, got {data.on_error!r}")
    if data.packing not in pipeline.PACKINGS:
        raise ValueError(f"data.packing must be one of {', '.join(pipeline.PACKINGS)}, got {data.packing!r}")
    for field in ("num_packing_bins", "num_shards", "read_threads"):
        if not isinstance(data[field], int) or data[field] < 0:
            raise ValueError(f"data.{field} must be an int >= 0, got {data[field]!r}")
    if data.num_packing_bins and data.packing not in ("first_fit", "best_fit"):
        raise ValueError(f"data.num_packing_bins={data.num_packing_bins} has no effect with data.packing="
                         f"{data.packing!r}; set it to 0 or use first_fit or best_fit")
    defaults = base_config().data
    for section in ("decomposition", "untie_knots"):
        if data.packing != section and data[section].to_dict() != defaults[section].to_dict():
            raise ValueError(f"data.{section} is set ({data[section].to_dict()}) but data.packing is "
                             f"{data.packing!r}; it only applies with data.packing={section!r}")
    if data.packing == "decomposition":
        curriculum.check(seq_len=data.seq_len, min_len=data.decomposition.min_len,
                         curriculum=data.decomposition.curriculum, cycles=data.decomposition.cycles)
