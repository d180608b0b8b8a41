"""Re-measure, on the pinned Ray, the two reasons pipeline/sharded.py gives for not using Ray Data's own
``CheckpointConfig`` (row-id filtering at read time, commits per written block):

1. its filter actor reserves a CPU: on a 2-CPU local Ray with one 1-CPU model actor, does a resumed job
   still run (or wait for a CPU forever)? What does the filter actor reserve?
2. small input files coalesce into one block: with 16 small Parquet files (our ``_requests`` shards), how
   many blocks are committed (checkpoint files written) before a job that fails half-way stops, and how
   many rows does a resume keep?

    python benchmarks/check_ray_data_checkpoint.py      # ~1-2 min; writes results/check_ray_data_checkpoint.{json,md}

A run that fails is a UDF raising after it has seen half of the rows (the block in flight is lost, the
committed ones are kept), so the figures do not depend on timing.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import RESULTS_DIR, TMP_DIR, setup_env  # noqa: E402

N_FILES, ROWS_PER_FILE = 16, 8
N_ROWS = N_FILES * ROWS_PER_FILE
RESUME_TIMEOUT_S = 240


class Model:
    """Stands for a model actor (1 CPU); fails once it has seen ``fail_after`` rows when asked to."""

    def __init__(self, fail_after: int = 0):
        self.seen, self.fail_after = 0, fail_after

    def __call__(self, batch):
        self.seen += len(batch["id"])
        if self.fail_after and self.seen > self.fail_after:
            raise RuntimeError("simulated crash half-way")
        time.sleep(0.05)
        batch["out"] = [f"done {i}" for i in batch["id"]]
        return batch


def write_inputs(root: str) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = os.path.join(root, "requests")
    os.makedirs(src)
    for f in range(N_FILES):
        ids = [f"q{f * ROWS_PER_FILE + i:04d}" for i in range(ROWS_PER_FILE)]
        pq.write_table(pa.table({"id": ids}), os.path.join(src, f"shard-{f:05d}.parquet"))
    return src


def run(src: str, out: str, ckpt: str, fail_after: int, override_blocks, timeout: float) -> dict:
    """One job: read -> 1-CPU model actor -> write_parquet, with checkpointing. Returns what happened."""
    import ray
    from ray.data.checkpoint import CheckpointConfig

    ctx = ray.data.DataContext.get_current()
    ctx.checkpoint_config = CheckpointConfig(id_column="id", checkpoint_path=ckpt, delete_checkpoint_on_success=False)
    ctx.enable_progress_bars = False
    kw = {"override_num_blocks": override_blocks} if override_blocks else {}
    ds = ray.data.read_parquet(src, **kw).map_batches(Model, fn_constructor_kwargs={"fail_after": fail_after},
                                                      batch_size=ROWS_PER_FILE, concurrency=1, num_cpus=1)
    result: dict = {}
    min_cpu = [float(ray.cluster_resources().get("CPU", 0))]

    def job():
        try:
            ds.write_parquet(out)
            result["ok"] = True
        except Exception as e:  # noqa: BLE001 - the crash we asked for
            result["ok"], result["error"] = False, type(e).__name__

    t = threading.Thread(target=job, daemon=True)
    started = time.perf_counter()
    t.start()
    while t.is_alive() and time.perf_counter() - started < timeout:
        min_cpu[0] = min(min_cpu[0], float(ray.available_resources().get("CPU", 0)))
        t.join(0.2)
    result["finished"] = not t.is_alive()
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["min_available_cpu"] = min_cpu[0]
    result["checkpoint_files"] = len([f for f in _files(ckpt) if f.endswith(".parquet") and "pending" not in f])
    result["rows_written"] = _rows(out)
    return result


def _files(d: str) -> list[str]:
    return [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs] if os.path.isdir(d) else []


def _rows(d: str) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in _files(d) if f.endswith(".parquet"))


def scenario(root: str, name: str, override_blocks) -> dict:
    src = write_inputs(os.path.join(root, name))
    out, ckpt = os.path.join(root, name, "out"), os.path.join(root, name, "ckpt")
    first = run(src, out, ckpt, fail_after=N_ROWS // 2, override_blocks=override_blocks, timeout=RESUME_TIMEOUT_S)
    resumed = run(src, out, ckpt, fail_after=0, override_blocks=override_blocks, timeout=RESUME_TIMEOUT_S)
    return {"override_num_blocks": override_blocks, "crashed_run": first, "resumed_run": resumed}


def scenario_filter(root: str) -> dict:
    """A checkpoint that holds half of the ids (a finished run over the first 8 files), then a run over
    all 16: Ray Data adds its CheckpointFilter actor pool; does the job still run beside the model actor?"""
    src = write_inputs(os.path.join(root, "filter"))
    half = os.path.join(root, "filter", "half")
    os.makedirs(half)
    for f in sorted(os.listdir(src))[: N_FILES // 2]:
        shutil.copy(os.path.join(src, f), half)
    out, ckpt = os.path.join(root, "filter", "out"), os.path.join(root, "filter", "ckpt")
    first = run(half, out, ckpt, fail_after=0, override_blocks=None, timeout=RESUME_TIMEOUT_S)
    resumed = run(src, out, ckpt, fail_after=0, override_blocks=None, timeout=RESUME_TIMEOUT_S)
    return {"override_num_blocks": "half done", "crashed_run": first, "resumed_run": resumed}


def filter_actor_args() -> dict:
    """What Ray Data's planner gives the CheckpointFilter actors (from the code of the pinned version)."""
    import inspect

    from ray.data._internal.execution.operators import map_operator
    from ray.data._internal.planner.checkpoint import plan_read_op
    from ray.data.checkpoint import CheckpointConfig

    src = inspect.getsource(plan_read_op.create_checkpoint_filter_op)
    defaults_cpu = "ray_remote_args[\"num_cpus\"] = 1" in inspect.getsource(map_operator)
    return {"remote_args_set_by_planner": "memory only" if "num_cpus" not in src else "num_cpus set",
            "map_operator_defaults_num_cpus_to_1": defaults_cpu,
            "memory_bytes_min": CheckpointConfig.CHECKPOINT_ACTOR_MEMORY_BYTES,
            "pool_min_max": [CheckpointConfig.CHECKPOINT_ACTOR_POOL_MIN_SIZE, CheckpointConfig.CHECKPOINT_ACTOR_POOL_MAX_SIZE]}


def main() -> int:
    setup_env()
    import json

    import ray

    root = os.path.join(TMP_DIR, "ray_data_checkpoint")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    for attempt in range(3):  # a loaded machine can time out Ray's start-up
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception:  # noqa: BLE001
            if attempt == 2:
                raise
            time.sleep(10)
    try:
        results = {"ray": ray.__version__, "local_cpus": 2, "input": f"{N_FILES} Parquet files x {ROWS_PER_FILE} rows",
                   "filter_actor": filter_actor_args(),
                   "default_blocks": scenario(root, "default", None),
                   "one_block_per_file": scenario(root, "per_file", N_FILES),
                   "filter_actor_run": scenario_filter(root)}
    finally:
        ray.shutdown()
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, "check_ray_data_checkpoint.json"), "w") as f:
        json.dump(results, f, indent=2)
    lines = [f"# Ray Data CheckpointConfig on Ray {results['ray']} (local Ray, 2 CPUs, one 1-CPU model actor)", "",
             f"Input: {results['input']}; the first run fails after half of the rows, the second resumes. Last row: "
             "the first run finishes over 8 of the 16 files, the second runs over all 16 (a filter actor is added).", "",
             "| blocks | crashed run: checkpoint files | rows kept | resumed run finished | in s | min free CPU | rows in output |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for key in ("default_blocks", "one_block_per_file", "filter_actor_run"):
        s = results[key]
        c, r = s["crashed_run"], s["resumed_run"]
        lines.append(f"| {s['override_num_blocks'] or 'default'} | {c['checkpoint_files']} | {c['rows_written']} | "
                     f"{r['finished'] and r.get('ok')} | {r['seconds']} | {r['min_available_cpu']} | {r['rows_written']} |")
    lines += ["", f"Filter actor: {results['filter_actor']}"]
    with open(os.path.join(RESULTS_DIR, "check_ray_data_checkpoint.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
