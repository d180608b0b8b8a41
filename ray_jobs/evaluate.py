"""evaluate: prediction sets (infer outputs) -> report.md, results.json and PNG plots.

    divconq evaluate --config configs/evaluate.yaml
"""

from __future__ import annotations

import logging
import sys
import time

from pipeline.evaluation import EvaluateConfig, evaluate
from pipeline.jobs import parse_job_args, run_main
from pipeline.manifest import write_manifest
from pipeline import storage

log = logging.getLogger("divconq.evaluate")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args("evaluate", EvaluateConfig, argv, __doc__)

    def body() -> None:
        started = time.time()
        results = evaluate(cfg)
        write_manifest(cfg.output.dir, "evaluate", cfg, inputs={s.name: s.predictions for s in cfg.settings},
                       counts={"settings": len(cfg.settings), "rows": len(results["table"])}, started_at=started)
        log.info("report: %s", storage.join(cfg.output.dir, "report.md"))

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
