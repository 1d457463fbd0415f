"""The training loop, top to bottom: config → mesh → data → model → jitted step → metrics and orbax checkpoints.

The step runs on the mesh of `config.parallel` (one device is a mesh too): params and optimizer state are sharded by
the model's logical axes (FSDP, tensor), batches along data/fsdp rows and sequence tokens, in the token layout of
`parallel.layout`, and attention spans the sequence axis by `parallel.context`. Every process builds the same global
batch stream and puts on its devices only the shards they hold; process 0 writes metrics and the config.

`train(config, workdir)` runs `config.train.steps` optimizer steps (the schedule's length), or stops after
`stop_after` with a checkpoint as a time-limited job would; `resume=True` continues from the newest checkpoint so that
every later loss equals the uninterrupted run's: params, optimizer state and the data iterator's position all
come back from the checkpoint, and the step is one compiled program.
"""

import dataclasses
import functools
import logging
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from longctx.config import validate
from longctx.data import load_tokenizer, padding_fraction, pipeline
from longctx.models import (Llama, adapt_params, build_model, check_forward, init_params, output_weights,
                            param_structure)
from longctx.train import checkpoint, metrics
from longctx.train.determinism import warn_if_not_reproducible
from longctx.parallel import distributed, layout, mesh as mesh_lib
from longctx.train.loss import chunked_weighted_loss, next_token_targets, weighted_loss
from longctx.train.optim import make_optimizer

log = logging.getLogger("longctx.train")


def train_step(params, opt_state, batch, rng, *, model, optimizer, grad_accum_steps, loss_chunk=0):
    """One optimizer update on `batch` ([batch_size, T] arrays: tokens, positions, segment_ids (optional: without
    them each row is one document) and the `next_token_targets` targets and weights), split into `grad_accum_steps`
    micro-batches; with `loss_chunk` > 0 the loss takes the logits `loss_chunk` tokens of each row at a time
    (`chunked_weighted_loss`).

    The gradient is that of the mean loss over every counted token of the whole batch, whatever the split. `rng` is
    the step's "positions" key (a scheme that samples in training, CLEX, draws from it once per step).
    """

    def loss_and_count(params, micro):
        out = model.apply({"params": params}, micro["tokens"], micro["positions"], micro.get("segment_ids"),
                          train=True, hidden_only=loss_chunk > 0, rngs={"positions": rng})
        if loss_chunk:
            return chunked_weighted_loss(out, output_weights(params, model.config), micro["targets"],
                                         micro["weights"], loss_chunk)
        return weighted_loss(out, micro["targets"], micro["weights"])

    grad_fn = jax.value_and_grad(loss_and_count, has_aux=True)

    def accumulate(carry, micro):
        grads, loss_sum, count = carry
        (micro_loss, micro_count), micro_grads = grad_fn(params, micro)
        return (jax.tree.map(jnp.add, grads, micro_grads), loss_sum + micro_loss, count + micro_count), None

    micro_batches = jax.tree.map(lambda x: x.reshape(grad_accum_steps, -1, *x.shape[1:]), batch)
    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, loss_sum, count), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), micro_batches)
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss_sum / count, "grad_norm": optax.global_norm(grads),
                               "loss_tokens": count}


def make_train_iterator(config: ml_collections.ConfigDict, tokenizer,
                        mesh: jax.sharding.Mesh | None = None) -> pipeline.ShardedBatches:
    """The grain iterator of this process's rows of every training batch (the data shards its devices hold on
    `mesh`; all of them without one); its state is saved in every checkpoint."""
    if mesh is None:
        num_shards = config.data.num_shards or 1
        shards = list(range(num_shards))
    else:
        shards, num_shards = mesh_lib.data_shards(mesh, config.data.num_shards)
    return pipeline.train_batches(config, tokenizer, shards, num_shards)


def check_batch_shapes(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """Raises ValueError when a batch shape the data can produce (one per bucket with Dataset Decomposition) does
    not split into data shards, micro-batches, the mesh or the sequence layout."""
    num_shards = mesh_lib.data_shards(mesh, config.data.num_shards)[1]
    for rows, length in pipeline.batch_shapes(config):
        what = f"a batch of {rows} × {length} tokens" + (
            f" (the data.decomposition bucket of length {length})" if length != config.data.seq_len else "")
        for field, parts in (("data.num_shards", num_shards), ("train.grad_accum_steps",
                                                               config.train.grad_accum_steps)):
            if rows % parts:
                raise ValueError(f"{what} does not split into {field}={parts} equal parts; change train.batch_size")
        try:
            mesh_lib.check_model(mesh, batch_size=rows // config.train.grad_accum_steps, seq_len=length,
                                 num_heads=config.model.num_heads, num_kv_heads=config.model.num_kv_heads)
            layout.check(config.parallel.layout, length, mesh.shape["sequence"])
        except ValueError as error:
            raise ValueError(f"{what}: {error}") from error


@dataclasses.dataclass
class Run:
    """A training run whose inputs have all been checked: what `prepare` hands to `fit`."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    model: Llama
    mesh: jax.sharding.Mesh
    data_iter: pipeline.ShardedBatches
    resume: bool
    end_step: int


def prepare(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, resume: bool = False,
            overwrite: bool = False, stop_after: int | None = None) -> Run:
    """Checks everything the user gave (config, tokenizer, workdir, data) before any training work.

    Raises ValueError, FileNotFoundError or WorkdirError with a message naming the culprit.
    """
    workdir = pathlib.Path(workdir)
    validate(config)
    distributed.initialize(config.parallel)
    mesh = mesh_lib.make_mesh(config.parallel)
    micro_batch = config.train.batch_size // config.train.grad_accum_steps
    check_batch_shapes(config, mesh)
    warn_if_not_reproducible()
    if stop_after is not None and not 1 <= stop_after <= config.train.steps:
        raise ValueError(f"--stop_after must be a step in [1, train.steps={config.train.steps}], got {stop_after}")
    tokenizer = load_tokenizer(config.data.tokenizer)
    model = build_model(config.model, tokenizer.vocab_size, config.data.seq_len, config.parallel)
    abstract_params, _ = param_structure(model)
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_RULES):
        check_forward(model, micro_batch, config.data.seq_len, packed=True, abstract_params=abstract_params)
    checkpoint.check_workdir(workdir, config, resume=resume, overwrite=overwrite)
    if config.train.init_from:
        source = checkpoint.load_run_config(pathlib.Path(config.train.init_from))
        if source.data.tokenizer != config.data.tokenizer:
            raise ValueError(f"train.init_from: the run in {config.train.init_from} used tokenizer "
                             f"{source.data.tokenizer!r}, this config {config.data.tokenizer!r}")
    data_iter = make_train_iterator(config, tokenizer, mesh)
    # Every process checks the workdir before process 0 writes its config (else a later process would find "a run"
    # there), and goes on only once it has (and, with overwrite, removed the old run's files).
    distributed.barrier("longctx.prepare: workdir checked")
    if distributed.is_main_process():
        checkpoint.start_workdir(workdir, config, overwrite=overwrite)
    distributed.barrier("longctx.prepare: workdir started")
    end_step = stop_after or config.train.steps
    return Run(config, workdir, model, mesh, data_iter, resume, end_step)


def device_batch(batch: dict[str, np.ndarray], config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
                 global_rows: int | None = None, row_offset: int = 0) -> dict[str, jax.Array]:
    """This process's rows of a batch (rows [row_offset, ...) of `global_rows`; default: the whole batch) as global
    arrays on the mesh: next-token targets and weights added, then every array permuted into the sequence layout
    (`parallel.layout`) and sharded."""
    batch = dict(batch)
    batch["targets"], weights = next_token_targets(batch["tokens"], batch["segment_ids"])
    # A packing that leaves some predictions out of the loss (Untie the Knots) sends its own weights, aligned alike.
    batch["weights"] = weights * batch["weights"] if "weights" in batch else weights
    batch = {key: layout.to_layout(value, config.parallel.layout, mesh.shape["sequence"])
             for key, value in batch.items()}
    return mesh_lib.shard_batch(batch, mesh, global_rows=global_rows, row_offset=row_offset)


def init_sharded(model: Llama, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, optimizer):
    """(params, opt_state) initialised directly into their shardings on the mesh."""
    rng = jax.random.key(config.seed)
    abstract, logical = param_structure(model)
    shardings = mesh_lib.param_shardings(abstract, logical, mesh)
    params = jax.jit(lambda r: init_params(model, r)[0], out_shardings=shardings)(rng)
    # The moments take their params' shardings, the step counts are replicated. Without out_shardings jit leaves
    # these zeros (they depend on no input value) whole on one local device, and a restored checkpoint puts them
    # there committed, which the step refuses on a mesh.
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state_shardings = optax.tree_map_params(optimizer, lambda _, sharding: sharding,
                                            jax.eval_shape(optimizer.init, params), shardings,
                                            transform_non_params=lambda _: replicated)
    opt_state = jax.jit(optimizer.init, out_shardings=state_shardings)(params)
    return params, opt_state


def source_params(source_workdir: str, model: Llama) -> dict:
    """The newest params of the run in `source_workdir`, as `model` takes them (`adapt_params`)."""
    source = checkpoint.load_run_config(pathlib.Path(source_workdir))
    tokenizer = load_tokenizer(source.data.tokenizer)
    source_model = build_model(source.model, tokenizer.vocab_size, source.data.seq_len)
    checkpoints = checkpoint.Checkpoints(pathlib.Path(source_workdir))
    step = checkpoints.step_to_restore(None, f"train.init_from: {source_workdir}")
    params = checkpoints.restore_params(step, param_structure(source_model)[0])
    checkpoints.close()
    log.info("starting from the params of %s at step %d", source_workdir, step)
    return adapt_params(model, params)


def fit(run: Run) -> list[dict]:
    """Trains `run` to its end step; returns the metrics records logged by this invocation."""
    optimizer, schedule = make_optimizer(run.config.train)
    with jax.set_mesh(None):  # outside any mesh (see init_params), a caller's own jax.set_mesh included
        params, opt_state = init_sharded(run.model, run.config, run.mesh, optimizer)
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_RULES):
        return _fit(run, optimizer, schedule, params, opt_state)


def _fit(run: Run, optimizer, schedule, params, opt_state) -> list[dict]:
    config, workdir, model, data_iter, end_step = run.config, run.workdir, run.model, run.data_iter, run.end_step
    checkpoints = checkpoint.Checkpoints(workdir, keep=config.train.keep_checkpoints, create=True)
    start_step = (checkpoints.latest_step() or 0) if run.resume else 0
    if start_step:
        params, opt_state = checkpoints.restore_training(start_step, params, opt_state, data_iter)
        log.info("resumed %s at step %d", workdir, start_step)
    elif config.train.init_from:
        params = jax.device_put(source_params(config.train.init_from, model), jax.tree.map(lambda x: x.sharding,
                                                                                             params))
        opt_state = jax.jit(optimizer.init, out_shardings=jax.tree.map(lambda x: x.sharding, opt_state))(params)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    log.info("model: %s params; %d tokens per step; steps %d..%d of %d; mesh %s", f"{num_params:,}",
             config.train.batch_size * config.data.seq_len, start_step + 1, end_step, config.train.steps,
             dict(run.mesh.shape))

    positions_key = jax.random.fold_in(jax.random.key(config.seed), 1)  # the step's key follows from its number
    step_fn = jax.jit(functools.partial(train_step, model=model, optimizer=optimizer,
                                        grad_accum_steps=config.train.grad_accum_steps,
                                        loss_chunk=config.train.loss_chunk),
                      donate_argnums=(0, 1) if config.train.donate else ())
    main = distributed.is_main_process()
    metrics_log = metrics.MetricsLog(
        workdir / checkpoint.METRICS_FILE, resume_step=start_step,
        tensorboard_dir=workdir / checkpoint.TENSORBOARD_DIR if config.train.tensorboard else None) if main else None
    bar = metrics.progress_bar(total=config.train.steps, initial=start_step, disable=not main)
    records = []
    tokens_per_step = config.train.batch_size * config.data.seq_len
    last_time, last_step = time.perf_counter(), start_step
    for step in range(start_step + 1, end_step + 1):
        host_batch = next(data_iter)
        global_rows = len(host_batch["tokens"]) * data_iter.num_shards // len(data_iter.shards)
        batch = device_batch(host_batch, config, run.mesh, global_rows=global_rows,
                             row_offset=data_iter.row_offset(global_rows))
        params, opt_state, step_metrics = step_fn(params, opt_state, batch, jax.random.fold_in(positions_key, step))
        bar.update(1)
        if step % config.train.log_every == 0 or step == end_step:
            step_metrics = {key: float(value) for key, value in jax.device_get(step_metrics).items()}
            now = time.perf_counter()
            record = {"step": step, **step_metrics, "learning_rate": float(schedule(step - 1)),
                      "tokens_per_s": tokens_per_step * (step - last_step) / (now - last_time),
                      "padding_fraction": padding_fraction(host_batch), "batch_length": host_batch["tokens"].shape[1]}
            last_time, last_step = now, step
            if main:
                metrics_log.write(record)
                metrics.show(bar, record)
            records.append(record)
            if not np.isfinite(record["loss"]):
                raise FloatingPointError(f"loss is {record['loss']} at step {step}; stopping (see {workdir})")
        if step % config.train.checkpoint_every == 0 or step == end_step:
            checkpoints.save(step, params, opt_state, data_iter, config)
    bar.close()
    checkpoints.close()
    if main:
        metrics_log.close()
    if start_step >= end_step:
        log.info("nothing to train: the run in %s is already at step %d", workdir, start_step)
    return records


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, resume: bool = False,
          overwrite: bool = False, stop_after: int | None = None) -> list[dict]:
    """Checks the inputs, then trains the run in `workdir`; returns the metrics records logged by this invocation."""
    return fit(prepare(config, workdir, resume=resume, overwrite=overwrite, stop_after=stop_after))
