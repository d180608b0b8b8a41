"""The model and its DeepSpeed engine inside a Ray Train worker."""

from __future__ import annotations

SHM_COMM_OP = "deepspeed_shm_comm"


def skip_unused_shm_op() -> None:
    """Keep DeepSpeed from JIT-building its shared-memory all-reduce op on CPU.

    DeepSpeed's CPU comm backend builds ``deepspeed_shm_comm`` with ninja when it starts (30 s of both
    cores on a 2-core Xeon, ~100 s on an EPYC), although only tensor-parallel inference
    (``inference_all_reduce``) uses it: ZeRO training's collectives go through torch.distributed
    (gloo). Its build command holds the venv's absolute paths, so every venv that shares
    ``~/.cache/torch_extensions`` (a CI clone, another checkout) invalidates the cache for the others
    and the next job rebuilds it (docs: /work/notes/train_fixed_cost.md, bench_train_fixed_cost).
    Marking the op incompatible in DeepSpeed's own table makes ``build_shm_op`` return None and
    ``inference_all_reduce`` fall back to torch.distributed; there is no DeepSpeed setting for it.
    """
    import deepspeed.ops  # lazy: DeepSpeed is imported only in training workers

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
