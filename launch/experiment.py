"""The paper's experiment end to end (see synthunlearn/experiment/pipeline.py; the keys: config.py).

    python launch/experiment.py [--config configs/experiment/demo.yaml] [key.sub=value ...]
    python launch/experiment.py --config configs/experiment/demo_30m.yaml --print-config

Runs (or reuses) every phase through the real launchers, evaluates each arm after SFT, writes
<output_dir>/results.json, results.md and results.png, and prints the table. --print-config prints
the resolved configuration instead (defaults, the files the config extends, the config, the
overrides) and runs nothing.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from synthunlearn.errors import UserError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "configs/experiment/demo.yaml"))
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="override experiment keys (seeds=[0], phases.sft.max_steps=20, launcher=python)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration as YAML and exit without running anything")
    args = parser.parse_args(argv)
    from synthunlearn.experiment.config import load_experiment_config, output_path
    from synthunlearn.experiment.pipeline import run_experiment

    start = time.perf_counter()

    lock = threading.Lock()   # phases run in threads: one whole line per message

    def log(message: str) -> None:
        with lock:
            print(f"[{time.perf_counter() - start:7.1f}s] {message}", flush=True)

    try:
        cfg = load_experiment_config(args.config, args.overrides)
        if args.print_config:
            import yaml
            print(yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None, width=110), end="")
            return 0
        run_experiment(cfg, log=log)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print()
    print((output_path(cfg["output_dir"]) / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
