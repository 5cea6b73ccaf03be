"""Write a run directory's report page (report.html, its plots in report/): `scripts/report.py RUN_DIR`."""
import argparse
from pathlib import Path

from training.errors import EXIT_RUNTIME, UserError, report, run_cli
from training.io.records import STATS_FILE, stats_path
from training.report.page import write_run_report


# Command-line arguments (see --help).
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory (it holds stats.jsonl)")
    return p.parse_args(argv)


# Entry point: exit 2 for a missing run directory or one without stats.jsonl, 1 for a malformed file in it.
def main(argv=None) -> int:
    args = parse_args(argv)
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    if not stats_path(run_dir).is_file():
        raise UserError(f"{run_dir}: no {STATS_FILE} in it (not a training run directory?)")
    try:
        path = write_run_report(run_dir)
    except UserError:
        raise
    except ValueError as e:
        return report(e, EXIT_RUNTIME)
    print(path)
    return 0


if __name__ == "__main__":
    run_cli(main)
