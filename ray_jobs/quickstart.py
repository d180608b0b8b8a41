"""quickstart: the paper's experiment in miniature, offline, on a CPU; every model learned here.

prepare (a generated world) -> train the teacher -> serve it -> generate -> solve -> select ->
train the four students -> infer every setting (and through the served S_D-R) -> evaluate.

    divconq quickstart --out runs/quickstart          # the full miniature (README: Results)
    divconq quickstart --out /tmp/qs --small          # the CI-sized smoke run

The terminal shows one line per stage (and the stage's latest progress: steps, loss, ETA, shards);
Ray's and the workers' logs go to <out>/logs/quickstart.log.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipeline import storage
from pipeline.config import ConfigError, load_config
from pipeline.quickstart import QuickstartConfig, run
from ray_jobs._shell import config_error, run_main, setup_logging
from ray_jobs._terminal import StageLines, logs_to_file

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="divconq quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/quickstart", help="output directory (local path or storage URL: s3://, gs://...)")
    parser.add_argument("--small", action="store_true", help="a smaller, faster run (CI)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port for the served app (127.0.0.1)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(QuickstartConfig, overrides={"out": args.out, "small": args.small, "port": args.port})
    except ConfigError as e:
        raise config_error("quickstart", e) from None
    local_out = storage.localize(cfg.out) if storage.is_local(cfg.out) else os.path.join("/tmp", "divconq-quickstart")
    log_path = os.path.join(local_out, "logs", "quickstart.log")

    def body() -> None:
        setup_logging()  # before the redirect, so the handler's stream is swapped to the log and back
        with logs_to_file(log_path) as terminal:
            stages = StageLines(terminal, log_path)
            terminal.write(f"divconq quickstart: logs in {log_path}\n")
            try:
                manifest = run(cfg, stages)
            finally:
                stages.stop.set()
        report = manifest.report
        print(storage.read_text(storage.join(os.path.dirname(report), "summary.md")))
        print(f"Report: {report}\nPlots: {os.path.dirname(report)}/*.png\nLogs: {log_path}")

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
