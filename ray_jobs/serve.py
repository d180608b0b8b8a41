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

import logging
import signal
import sys
import threading

from pipeline.jobs import parse_job_args, run_main
from pipeline.serving.config import ServeConfig

log = logging.getLogger("divconq.serve")

SHUTDOWN_TIMEOUT_S = 30


def _quiet_shutdown(shutdown, app_name: str) -> None:
    try:
        shutdown(app_name)
        log.info("app %r deleted", app_name)
    except Exception as e:  # pragma: no cover - Ray already gone
        log.warning("could not delete app %r: %s", app_name, e)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args("serve", ServeConfig, argv, __doc__)

    def body() -> None:
        from pipeline.serving.app import shutdown, start

        base = start(cfg)
        print(f"divconq serve: {cfg.decomposer.served_name} at {base}  (OpenAI base_url: {base}/v1)", flush=True)
        if not cfg.blocking:
            return
        stop = threading.Event()

        def _on_signal(signum, _frame) -> None:
            log.info("signal %d: shutting down", signum)
            stop.set()

        previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not stop.wait(1.0):
                pass
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            # Delete the app, but never hang on exit (e.g. when Ray itself got the signal too).
            done = threading.Thread(target=_quiet_shutdown, args=(shutdown, cfg.app_name), daemon=True)
            done.start()
            done.join(SHUTDOWN_TIMEOUT_S)
            if done.is_alive():
                log.warning("app %r not confirmed deleted after %ds; exiting anyway", cfg.app_name, SHUTDOWN_TIMEOUT_S)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
