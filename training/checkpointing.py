"""The recipe's checkpoints on Ray Train: what one holds, how it is named and kept, how it is found.

A checkpoint folder holds DeepSpeed's files (every rank writes its own shard; rank 0 the module
states and ``latest``), ``trainer_state.json`` (:class:`TrainerState`: where in which epoch the
model stopped, its history) and, in a model's final checkpoint, ``hf_model/`` (the exported
Hugging Face model). All ranks report it with the same ``checkpoint_dir_name``; Ray Train merges
the rank folders into one directory of the run (``output.checkpoint_dir/output.run_name``).

Several models in one job share that run. Each reported metric set names its ``model``, so a
model finds its own latest checkpoint among the run's (``ray.train.get_all_reported_checkpoints``)
and resumes exactly there; retention uses Ray Train's own scoring (:data:`RETENTION_METRIC`):
a model's final checkpoint outranks every intermediate one, so finished models keep theirs (the
driver exports from it) while ``num_checkpoints_to_keep`` bounds the intermediate ones.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ray.train import Checkpoint, CheckpointConfig

from pipeline import storage

STATE_FILE = "trainer_state.json"
RETENTION_METRIC = "retention"
_FINAL, _PER_MODEL = 1e12, 1e7


@dataclass
class TrainerState:
    """Where a model's training stands; saved as ``trainer_state.json`` in every checkpoint."""

    model: str = ""
    epoch: int = 0
    micro_step_in_epoch: int = 0
    global_step: int = 0
    tag: str = ""
    done: bool = False
    tokens: float = 0.0
    val_loss: Optional[float] = None
    total_steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # every report, across restarts
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainerState":
        data = json.loads(text)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def read_trainer_state(checkpoint: Checkpoint) -> TrainerState:
    """The ``trainer_state.json`` of a Ray Train checkpoint (local or remote)."""
    with checkpoint.filesystem.open_input_stream(checkpoint.path.rstrip("/") + "/" + STATE_FILE) as f:
        return TrainerState.from_json(f.read().decode("utf-8"))


def checkpoint_from_uri(uri: str) -> Checkpoint:
    """A checkpoint folder given by URI (``resume_from``), local or s3://."""
    fs, path = storage.arrow_filesystem(uri)
    return Checkpoint(path=path, filesystem=fs)


def checkpoint_dir_name(model: str, step: int, several: bool) -> str:
    """``checkpoint_<step>``, prefixed with the model's name in a job that trains several."""
    name = f"checkpoint_{step:08d}"
    return f"{model}-{name}" if several else name


def retention_score(model_index: int, step: int, done: bool) -> float:
    """Ray Train keeps the highest scores: finals first, then the latest intermediate ones."""
    return (_FINAL if done else 0.0) + model_index * _PER_MODEL + step


def checkpoint_config(num_to_keep: int, num_models: int) -> CheckpointConfig:
    """Keep ``num_to_keep`` checkpoints per run plus every other model's final one."""
    return CheckpointConfig(num_to_keep=num_to_keep + num_models - 1, checkpoint_score_attribute=RETENTION_METRIC,
                            checkpoint_score_order="max")


def belongs_to(metrics: dict[str, Any], model: str, several: bool) -> bool:
    """Whether a reported checkpoint is ``model``'s (runs of one model may predate the ``model`` metric)."""
    return metrics.get("model") == model or (not several and "model" not in metrics)


def latest_of(model: str, reported: list[tuple[Checkpoint, dict[str, Any]]], several: bool,
              final_only: bool = False) -> Optional[tuple[Checkpoint, dict[str, Any]]]:
    """``model``'s checkpoint with the highest step among ``(checkpoint, metrics)`` pairs."""
    mine = [(c, m) for c, m in reported if belongs_to(m, model, several) and (m.get("done") or not final_only)]
    return max(mine, key=lambda cm: (cm[1].get("step", 0), bool(cm[1].get("done")))) if mine else None
