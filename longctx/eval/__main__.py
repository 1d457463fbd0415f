"""python -m longctx.eval --workdir runs/x --lengths 256,512,1024 [--positions rope,none | all]

Evaluates a trained run at each length under each position scheme, prints a table with the unigram baseline beside
it, and writes report.json, report.md and ppl_vs_length.png into --output_dir (default: the workdir), replacing an
earlier report there only with --overwrite.
"""

import pathlib
import sys

from absl import app, flags

from longctx import cli
from longctx.eval.report import check_output_dir, ppl_table, write_report
from longctx.eval import suite

_WORKDIR = flags.DEFINE_string("workdir", None, "The run to evaluate (a longctx.train workdir).", required=True)
_LENGTHS = flags.DEFINE_list("lengths", None, "Context lengths to evaluate at, e.g. 256,512,1024.", required=True)
_POSITIONS = flags.DEFINE_list("positions", None, "Position schemes to evaluate with (default: the trained one); "
                               "'all' for every registered scheme.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the newest).")
_NUM_DOCUMENTS = flags.DEFINE_integer("num_documents", None, "Held-out documents per length "
                                      "(default: the run's eval.num_documents).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the report goes (default: --workdir).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a report already in --output_dir.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.setup_logging()
    try:
        lengths = [int(n) for n in _LENGTHS.value]
    except ValueError:
        sys.exit(f"error: --lengths must be comma-separated integers, got {','.join(_LENGTHS.value)}")
    output_dir = pathlib.Path(_OUTPUT_DIR.value or _WORKDIR.value)
    try:
        check_output_dir(output_dir, overwrite=_OVERWRITE.value)
        evaluation = suite.prepare(_WORKDIR.value, lengths, _POSITIONS.value, step=_STEP.value,
                                   num_documents=_NUM_DOCUMENTS.value)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {e}")
    report = suite.run(evaluation)
    paths = write_report(report, output_dir)
    print(f"\nperplexity of {report['workdir']} at step {report['step']} (trained at length "
          f"{report['train_seq_len']}, {report['num_documents']} held-out documents per length)\n")
    print(ppl_table(report))
    print("\n" + "\n".join(f"wrote {path}" for path in paths.values()))


def run():
    app.run(main)


if __name__ == "__main__":
    run()
