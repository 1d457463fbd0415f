"""What the command-line entry points share: the `--config` flag, checked before absl parses it."""

import difflib
import logging
import runpy
import sys

import ml_collections
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags


def define_config_flag(default: str | None = "configs/tiny.py") -> flags.FlagHolder:
    return config_flags.DEFINE_config_file(
        "config", default, "An ml_collections config file (`get_config()`), optionally `file.py:positions=<scheme>`; "
        "override any field with --config.<field>=<value>.", lock_config=True)


def _config_file_arg(argv: list[str], default: str | None) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return default


def check_config_overrides(argv: list[str], default: str | None = "configs/tiny.py") -> None:
    """Exits with a message naming every `--config.<field>` that the config has no field for, and the valid ones.

    (config_flags would raise a bare AttributeError from deep inside flag parsing instead.)
    """
    overrides = [arg[len("--config."):].split("=", 1)[0] for arg in argv if arg.startswith("--config.")]
    if not overrides:
        return
    spec = _config_file_arg(argv, default)
    if spec is None:
        return
    path, _, config_arg = spec.partition(":")
    try:
        get_config = runpy.run_path(path)["get_config"]
        config = get_config(config_arg) if config_arg else get_config()
    except Exception:  # config_flags reports a broken config file itself, with its traceback.
        return
    problems = []
    for override in overrides:
        node, walked = config, []
        for key in override.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                here = ".".join(walked) or "the config"
                valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"--config.{override}: {here} has no field {key!r}{hint}; "
                                f"its fields are: {', '.join(valid) or 'none (it is a value)'}")
                break
            node, walked = node[key], walked + [key]
    if problems:
        sys.exit("error: unknown config field\n  " + "\n  ".join(problems))


def setup_logging() -> None:
    """Our INFO messages as plain lines; the libraries' own INFO chatter (orbax logs every save) only at WARNING."""
    absl_logging.get_absl_handler().setFormatter(logging.Formatter("%(message)s"))
    absl_logging.set_verbosity(absl_logging.INFO)
    for chatty in ("absl", "jax"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
