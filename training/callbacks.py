"""Callbacks: code the recipe runs at its boundaries without living in its loop.

:class:`Callback` has no-op hooks; :class:`ProgressLog` is the one production callback (a line per
report on rank 0). :class:`CrashAtStep` is test-only fault injection: a test asks for it with the
``DIVCONQ_TEST_CRASH_AT_STEP`` / ``DIVCONQ_TEST_CRASH_MARKER`` environment variables of the driver
(:func:`test_callbacks_from_env`), or passes it to ``training.job.run(cfg, callbacks=[...])``.
Callbacks are pickled to the Ray Train workers with the job plan.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Mapping, Optional

from ray.train.v2._internal.execution import context as ray_train_context
from transformers.utils import logging as transformers_logging

if TYPE_CHECKING:  # the recipe imports this module
    from training.recipe import SFTRecipe

log = logging.getLogger("divconq.train")

CRASH_AT_STEP_ENV = "DIVCONQ_TEST_CRASH_AT_STEP"
CRASH_MARKER_ENV = "DIVCONQ_TEST_CRASH_MARKER"


class Callback:
    """Hooks of :class:`training.recipe.SFTRecipe`; override the ones you need."""

    def on_model_begin(self, recipe: "SFTRecipe") -> None:
        """After ``setup``: data, engine and resume state are ready."""

    def on_step_end(self, recipe: "SFTRecipe") -> None:
        """After every optimizer step (``recipe.state.global_step`` is the step just taken)."""

    def on_report(self, recipe: "SFTRecipe", metrics: dict[str, Any]) -> None:
        """After metrics were reported to Ray Train (every rank; the metrics are global)."""

    def on_model_end(self, recipe: "SFTRecipe") -> None:
        """After the model's final checkpoint (or when it had nothing left to train)."""


def quiet_worker_logs() -> None:
    """Keep a worker's output to the progress lines: Ray Train logs every report of every rank at INFO
    (``Reporting training result N: TrainingReport(...)``, from a logger named by its file path, which
    ``RunConfig(logging_config=...)`` does not reach), and transformers draws a progress bar per load/save."""
    logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)
    transformers_logging.disable_progress_bar()


def progress_logger() -> logging.Logger:
    """``divconq.train.progress``: INFO lines that reach the driver from a Ray worker (whose root logger
    has no handler, so INFO would be dropped), one line each, without the logging preamble."""
    logger = logging.getLogger("divconq.train.progress")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


class ProgressLog(Callback):
    """A line per tenth of a model's steps on rank 0 (and its last): step of total, loss, tokens/s, ETA."""

    def __init__(self, lines: int = 10):
        self.lines = lines
        self._shown: dict[str, int] = {}  # model -> the last fraction (in 1/lines) shown

    def on_report(self, recipe: "SFTRecipe", metrics: dict[str, Any]) -> None:
        step, total = metrics["step"], max(metrics["total_steps"], 1)
        part = self.lines * step // total
        if recipe.worker.rank != 0 or (part == self._shown.get(recipe.name) and not metrics.get("done")):
            return
        self._shown[recipe.name] = part
        done_now = max(step - metrics["start_step"], 0)
        eta = metrics["elapsed_s"] / done_now * (total - step) if done_now else float("nan")
        val = f" val_loss {metrics['val_loss']:.4f}" if metrics.get("val_loss") is not None else ""
        progress_logger().info("train %s: step %d/%d (%.0f%%) loss %.4f%s, %.0f tokens/s, eta %.0f s", recipe.name, step,
                               total, 100.0 * step / total, metrics["loss"], val, metrics["tokens_per_s"], eta)


class CrashAtStep(Callback):
    """Test-only: the last rank exits hard once at ``step`` (of ``model``, or of any model);
    ``marker`` records that it did, so the restarted worker group (``failure.max_failures``) does
    not crash again."""

    def __init__(self, step: int, marker: str, model: Optional[str] = None):
        self.step, self.marker, self.model = step, marker, model

    def on_step_end(self, recipe: "SFTRecipe") -> None:
        worker = recipe.worker
        if recipe.state.global_step != self.step or worker.rank != worker.world - 1 or os.path.exists(self.marker):
            return
        if self.model is not None and recipe.name != self.model:
            return
        open(self.marker, "w").close()
        log.warning("test hook: rank %d crashing at step %d", worker.rank, self.step)
        os._exit(1)


def test_callbacks_from_env(environ: Optional[Mapping[str, str]] = None) -> list[Callback]:
    """The test hooks a test asked for through the driver's environment (none in production)."""
    env = os.environ if environ is None else environ
    step, marker = int(env.get(CRASH_AT_STEP_ENV, 0) or 0), env.get(CRASH_MARKER_ENV, "")
    return [CrashAtStep(step, marker)] if step and marker else []
