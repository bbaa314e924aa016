"""Pool experiment runs that ran different seeds of the same study into one results table.

    python launch/pool_results.py RUN_DIR [RUN_DIR ...] --output-dir runs/pooled

Each RUN_DIR is an experiment's output_dir (its results.json). The configs must agree except on
where and how fast they ran and which seeds and arms they covered, and no (arm, seed) may appear
twice (synthunlearn/experiment/pooling.py). Writes <output-dir>/results.json, results.md (with the
paired per-seed contrasts) and results.png, and prints the table. The output directory may hold an
earlier pooled table, never a run's own results.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from synthunlearn.errors import UserError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="experiment output directories")
    parser.add_argument("--output-dir", required=True, help="where the pooled results go")
    args = parser.parse_args(argv)
    from synthunlearn.experiment.pooling import pool_run_dirs

    try:
        _, text = pool_run_dirs(args.run_dirs, args.output_dir)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
