"""A run's working directory: its config, its orbax checkpoints, and the rules for resuming or replacing it.

Layout of a workdir:
    config.json      the run's config (written at the start; a resume must match it)
    metrics.jsonl    one JSON object per logged step
    checkpoints/<step>/{params, opt_state, data_iter, config}   (orbax CheckpointManager)
    tensorboard/     optional event files
    report.json, report.md, ppl_vs_length.png   written by longctx.eval (by default into the workdir)
Nothing in a workdir that holds a run is replaced unless the caller passes `overwrite=True`.
"""

import json
import logging
import pathlib
import shutil
from typing import Any

import grain
import ml_collections
import orbax.checkpoint as ocp

from longctx.config import base_config

log = logging.getLogger("longctx.train")

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
REPORT_FILES = ("report.json", "report.md", "ppl_vs_length.png")  # report.json lists the report's other files
RUN_ARTIFACTS = (CONFIG_FILE, METRICS_FILE, CHECKPOINT_DIR, TENSORBOARD_DIR)  # a workdir with any of these holds a run

# Fields that change how a run is logged or saved, never what it computes: a resume may change them. Also where a
# multi-host run's processes meet and which one this is (config.json holds process 0's; every process compares).
RESUME_MAY_CHANGE = frozenset(
    {"train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.tensorboard",
     "eval.num_documents", "eval.batch_size", "parallel.coordinator_address", "parallel.process_id"}
)


class WorkdirError(Exception):
    """The workdir holds a run that this invocation may not continue or replace."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'field: saved → current' for every field that differs, but those a resume may change."""
    saved_flat, current_flat = flatten(saved), flatten(current)
    differences = []
    for field in sorted(set(saved_flat) | set(current_flat)):
        if field in RESUME_MAY_CHANGE:
            continue
        before, after = saved_flat.get(field, "<absent>"), current_flat.get(field, "<absent>")
        if before != after:
            differences.append(f"{field}: {before!r} in the run, {after!r} now")
    return differences


def config_as_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain JSON types (tuples become lists), as it is stored and compared."""
    return json.loads(config.to_json())


def check_workdir(workdir: pathlib.Path, config: ml_collections.ConfigDict, *, resume: bool,
                  overwrite: bool) -> None:
    """Raises WorkdirError, touching nothing, unless this invocation may use `workdir`.

    An empty or new workdir may start a run. One that holds a run may be continued when `resume` and its config
    matches this one (but for RESUME_MAY_CHANGE), or replaced when `overwrite`.
    """
    if resume and overwrite:
        raise WorkdirError("--resume and --overwrite contradict each other: continue the run or replace it")
    if not holds_run(workdir) or overwrite:
        return
    if not resume:
        raise WorkdirError(
            f"{workdir} already holds a run; pass --resume to continue it, --overwrite to replace it, "
            "or choose another --workdir"
        )
    config_path = workdir / CONFIG_FILE
    if not config_path.exists():
        raise WorkdirError(f"{workdir} holds checkpoints but no {CONFIG_FILE}; refusing to guess its config "
                           "(use --overwrite to replace it, or another --workdir)")
    saved = json.loads(config_path.read_text())
    _mask_as_spec(saved)
    differences = config_differences(saved, config_as_dict(config))
    if differences:
        raise WorkdirError(
            f"cannot resume the run in {workdir}: its config differs from this one in\n  "
            + "\n  ".join(differences)
            + "\nUse the run's own config, --overwrite to replace the run, or another --workdir."
        )
    if not (workdir / CHECKPOINT_DIR).exists():
        return
    checkpoints = Checkpoints(workdir)
    latest = checkpoints.latest_step()
    resumable = latest is None or checkpoints.holds_training_state(latest)
    checkpoints.close()
    if not resumable:
        raise WorkdirError(f"cannot resume the run in {workdir}: its checkpoint at step {latest} holds weights only "
                           f"(converted from HF?), without the optimizer and data state a resume continues from")


def report_files(directory: pathlib.Path) -> list[pathlib.Path]:
    """The files of the evaluation report in `directory`: REPORT_FILES and those its report.json lists."""
    names = list(REPORT_FILES)
    try:
        listed = json.loads((directory / REPORT_FILES[0]).read_text()).get("files", [])
        names += [name for name in listed if isinstance(name, str) and "/" not in name and not name.startswith(".")
                  and name not in names]
    except (OSError, ValueError, AttributeError):
        pass
    return [directory / name for name in names]


def holds_run(workdir: pathlib.Path) -> bool:
    return any((workdir / name).exists() for name in RUN_ARTIFACTS)


def newest_step(workdir: pathlib.Path) -> int | None:
    """The step of the newest checkpoint of the run in `workdir` (None: no run there, or no checkpoint yet)."""
    if not holds_run(workdir):
        return None
    checkpoints = Checkpoints(workdir)
    step = checkpoints.latest_step()
    checkpoints.close()
    return step


def start_workdir(workdir: pathlib.Path, config: ml_collections.ConfigDict, *, overwrite: bool) -> None:
    """After `check_workdir`: removes the old run's own files and its report if `overwrite`, and writes the config
    of a new run."""
    if overwrite:
        for path in [workdir / name for name in RUN_ARTIFACTS] + report_files(workdir):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    if not (workdir / CONFIG_FILE).exists():
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / CONFIG_FILE).write_text(config.to_json(indent=2) + "\n")


def load_run_config(workdir: pathlib.Path) -> ml_collections.ConfigDict:
    """The config a run in `workdir` was trained with."""
    path = workdir / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"--workdir {workdir} holds no run: {CONFIG_FILE} is missing")
    saved = json.loads(path.read_text())
    _mask_as_spec(saved)
    config = ml_collections.ConfigDict(saved)
    _fill_missing(config, base_config(), "")
    return config


def _mask_as_spec(saved: dict[str, Any]) -> None:
    """A run saved before masks were spec strings names its mask and its `window` / `sinks` fields apart; join them."""
    attention = saved.get("model", {}).get("attention", {})
    if "window" not in attention and "sinks" not in attention:
        return
    window, sinks = attention.pop("window", 0), attention.pop("sinks", 0)
    params = {"sliding_window": f"(window={window})", "sinks_window": f"(sinks={sinks}, window={window})"}
    attention["mask"] += params.get(attention["mask"], "")
    log.info("model.attention: an older longctx's mask fields; read as the spec %r", attention["mask"])


def _fill_missing(config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict, prefix: str) -> None:
    """Adds the fields a run saved by an older longctx lacks, at their defaults (what that run did), and logs them;
    the position scheme's parameters are the scheme's own and are left as saved."""
    for key, default in defaults.items():
        name = f"{prefix}{key}"
        if key not in config:
            log.info("%s: not in the run's config (an older longctx); using the default %r", name, default)
            config[key] = default
        elif isinstance(default, ml_collections.ConfigDict) and name != "model.positions":
            _fill_missing(config[key], default, name + ".")


class Checkpoints:
    """Orbax checkpoints of a run: params, optimizer state, data-iterator state and config, saved together per step."""

    def __init__(self, workdir: pathlib.Path, keep: int = 2, create: bool = False):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
        self.manager = ocp.CheckpointManager((workdir / CHECKPOINT_DIR).absolute(), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_to_restore(self, step: int | None, run: str) -> int:
        """`step`, or the newest checkpoint's step when None. FileNotFoundError when there is no checkpoint,
        ValueError when `step` has none; `run` names the run in the message (e.g. "--workdir runs/x")."""
        available = sorted(self.manager.all_steps())
        if not available:
            raise FileNotFoundError(f"{run} holds no checkpoint")
        if step is None:
            return available[-1]
        if step not in available:
            raise ValueError(f"--step {step} has no checkpoint in {run}; it has steps {available}")
        return step

    def save(self, step: int, params, opt_state, data_iter: grain.DatasetIterator,
             config: ml_collections.ConfigDict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            data_iter=grain.checkpoint.CheckpointSave(data_iter),
            config=ocp.args.JsonSave(config_as_dict(config)),
        ))

    def save_params(self, step: int, params, config: ml_collections.ConfigDict) -> None:
        """A checkpoint of params and config only (converted weights: evaluable, not resumable)."""
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), config=ocp.args.JsonSave(config_as_dict(config))))

    def holds_training_state(self, step: int) -> bool:
        """Whether the checkpoint of `step` has the optimizer and data-iterator state a resume needs."""
        step_dir = pathlib.Path(self.manager.directory) / str(step)
        return all((step_dir / item).exists() for item in ("opt_state", "data_iter"))

    def restore_training(self, step: int, abstract_params, abstract_opt_state, data_iter: grain.DatasetIterator):
        """(params, opt_state) of `step`; `data_iter` is set to where it was when that step was saved."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            data_iter=grain.checkpoint.CheckpointRestore(data_iter),
        ))
        return restored.params, restored.opt_state

    def restore_params(self, step: int, abstract_params):
        return self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params))).params

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
