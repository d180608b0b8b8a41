"""quickstart: the whole pipeline on the embedded default, offline, on a CPU.

prepare -> generate -> solve -> select -> train (DeepSpeed on Ray Train) -> serve ->
infer (through the served app) -> evaluate -> report.

    divconq quickstart --out runs/quickstart          # ~10 min on 2 cores
    divconq quickstart --out /tmp/qs --small          # the CI-sized smoke run
"""

from __future__ import annotations

import argparse
import sys

from pipeline import storage
from pipeline.config import ConfigError, load_config
from pipeline.quickstart import QuickstartConfig, run
from ray_jobs._shell import config_error, run_main, setup_logging


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(prog="divconq quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/quickstart", help="output directory (local path or storage URL: s3://, gs://...)")
    parser.add_argument("--small", action="store_true", help="a smaller, faster run (CI)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port for the served app (127.0.0.1)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(QuickstartConfig, overrides={"out": args.out, "small": args.small, "port": args.port})
    except ConfigError as e:
        raise config_error("quickstart", e) from None

    def body() -> None:
        report = run(cfg).report
        print(f"\nquickstart complete. Report: {report}\n")
        print(storage.read_text(report))

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
