"""serve: the distilled decomposer (+ a solver) behind an HTTP API, on Ray Serve.

    divconq serve --config configs/serve.yaml [decomposer.model=DIR http.port=8080 blocking=false]
    serve run configs/serve_deploy.yaml          # same app from a Serve config file
    serve deploy configs/serve_deploy.yaml       # ... onto a running cluster (ray start --head)

Routes: POST /v1/solve, POST /v1/chat/completions (OpenAI-compatible), GET /v1/models,
GET /v1/stats, GET /healthz. In the foreground (default) it prints the URL and serves
until Ctrl-C or SIGTERM, then deletes the app. With ``blocking=false`` it deploys and
returns: use that with a cluster (``ray.address`` / ``RAY_ADDRESS``), because a local Ray
started by this process ends with it.
"""

from __future__ import annotations

import sys

from pipeline.serving.app import run
from pipeline.serving.config import ServeConfig
from ray_jobs._shell import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main("serve", ServeConfig, run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
