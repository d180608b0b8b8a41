"""One GPU check of the paths a real user hits first (run by ``scripts/gpu_check.sh``).

Steps (each recorded as pass / fail / skip with its figures and the reason; the results file is
rewritten after every step, so a timeout still leaves the steps that ran):

1. ``env``           versions, device, GPU count and memory
2. ``models``        a tiny Llama-3-family student built locally (no download) + SFT rows + prepared samples
3. ``generate_hf``   the teacher as a local transformers model on the GPU (``type: hf, device: auto``,
                     one pool actor holding the GPU) on a small ``generate``           [CPU: device cpu]
   ``generate_vllm`` the teacher through ray.data.llm (``type: vllm``) on a small ``generate``       [GPU + vLLM]
4. ``train_zero2``   bf16 ZeRO-2 on nccl (1 GPU per worker; 2 workers if 2 GPUs, else 1: NCCL
                     refuses two ranks on one device)                                  [CPU: fp32, gloo, 2 workers]
5. ``train_zero3``   bf16 ZeRO-3, same placement                                        [CPU: fp32, gloo, 2 workers]
6. ``lora``          LoRA (ZeRO-2), merged export                                       [CPU: fp32]
7. ``qlora``         QLoRA (4-bit NF4, bitsandbytes), merged export                    [GPU + bitsandbytes]
8. ``serve_hf``      the student served by the transformers Decomposer, /v1/solve x 8   [CPU: device cpu]
9. ``serve_vllm``    the merged student through ray.serve.llm (``decomposer.engine: vllm``) [GPU + vLLM]

    python scripts/gpu_check.py --out gpu_check_results [--cpu] [--only train_zero2,serve_hf]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


class Check:
    def __init__(self, out: str, cpu: bool, only: list[str]):
        import torch

        self.out, self.cpu, self.only = out, cpu, set(only)
        self.gpus = 0 if cpu else torch.cuda.device_count()
        self.gpu = self.gpus > 0
        self.steps: list[dict[str, Any]] = []
        self.ctx: dict[str, Any] = {}
        os.makedirs(out, exist_ok=True)

    def step(self, name: str, fn: Callable[[], dict[str, Any]], needs: tuple[str, ...] = ()) -> None:
        if self.only and name not in self.only | {"env", "models"}:
            return
        missing = [n for n in needs if not self._have(n)]
        t0 = time.perf_counter()
        if missing:
            rec = {"step": name, "status": "skip", "reason": f"needs {', '.join(missing)}"}
        else:
            try:
                rec = {"step": name, "status": "pass", **(fn() or {})}
            except Exception as e:  # record and go on: one failing step must not hide the others
                rec = {"step": name, "status": "fail", "error": f"{type(e).__name__}: {e}"[:2000],
                       "traceback": traceback.format_exc()[-4000:]}
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        self.steps.append(rec)
        print(f"[gpu_check] {name}: {rec['status']} ({rec['seconds']} s) {rec.get('reason') or rec.get('error') or ''}",
              flush=True)
        self.write()

    def _have(self, need: str) -> bool:
        if need == "gpu":
            return self.gpu
        return importlib.util.find_spec(need) is not None

    def write(self) -> None:
        with open(os.path.join(self.out, "gpu_check.json"), "w") as f:
            json.dump({"mode": "cpu" if self.cpu else "gpu", "steps": self.steps}, f, indent=2, default=str)
        lines = ["| step | status | seconds | figures / reason |", "|---|---|---|---|"]
        for s in self.steps:
            extra = {k: v for k, v in s.items() if k not in ("step", "status", "seconds", "traceback")}
            lines.append(f"| {s['step']} | {s['status']} | {s['seconds']} | {json.dumps(extra, default=str)[:400]} |")
        with open(os.path.join(self.out, "gpu_check.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------- steps
def env_step(c: Check) -> dict[str, Any]:
    import torch

    from pipeline.manifest import TRACKED_PACKAGES  # the packages every manifest records

    versions = {"python": platform.python_version()}
    for name in (*TRACKED_PACKAGES, "peft", "bitsandbytes", "sglang"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:
            versions[name] = None
    dev: dict[str, Any] = {"cuda": torch.version.cuda, "gpus": c.gpus}
    if c.gpu:
        p = torch.cuda.get_device_properties(0)
        dev.update(name=p.name, memory_gib=round(p.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
    return {"versions": versions, "device": dev}


def models_step(c: Check) -> dict[str, Any]:
    from pipeline.tiny_models import build_family_model
    from ray_jobs.prepare import main as prepare
    from tests.test_training import make_rows, write_parquet
    from training.sft_data import corpus_from_rows

    # tests.test_training pins DS_ACCELERATOR=cpu for the suite and Ray's workers inherit it: left as it is, so a
    # GPU run exercises training.engine.choose_accelerator, which drops it for a use_gpu job
    rows = make_rows(256)
    template = open(os.path.join(REPO, "tests", "fixtures", "chat_templates", "llama.jinja")).read()
    c.ctx["base"] = build_family_model(os.path.join(c.out, "base"), "llama", corpus_from_rows(rows), template,
                                       vocab_size=1024, hidden_size=256, num_layers=4, num_heads=8, max_positions=1024)
    c.ctx["sft"] = write_parquet(os.path.join(c.out, "sft"), rows)
    c.ctx["prepared"] = os.path.join(c.out, "prepare")
    assert prepare(["--config", os.path.join(REPO, "configs", "prepare.yaml"), f"output.dir={c.ctx['prepared']}"]) == 0
    return {"base": c.ctx["base"]}


def _generate(c: Check, name: str, teacher: str, pool: str) -> dict[str, Any]:
    from ray_jobs.generate import main as generate

    out = os.path.join(c.out, name)
    t0 = time.perf_counter()
    assert generate(["--config", os.path.join(REPO, "configs", "generate.yaml"), f"input.path={c.ctx['prepared']}",
                     "input.limit=32", f"output.dir={out}", "output.shard_size=64", f"teacher={teacher}",
                     "sampling.max_tokens=48", f"pool={pool}"]) == 0
    wall = time.perf_counter() - t0
    m = json.load(open(os.path.join(out, "manifest.json")))
    return {"counts": m["counts"], "usage": m.get("usage"), "wall_s": round(wall, 1)}


def generate_hf_step(c: Check) -> dict[str, Any]:
    device = "cpu" if c.cpu else "auto"
    teacher = f"{{type: hf, model: {c.ctx['base']}, device: {device}, batch_size: 16}}"
    pool = f"{{min_actors: 1, max_actors: 1, num_cpus: 1, num_gpus: {0 if c.cpu else 1}}}"
    return _generate(c, "generate_hf", teacher, pool)


def generate_vllm_step(c: Check) -> dict[str, Any]:
    teacher = (f"{{type: vllm, model: {c.ctx['base']}, concurrency: 1, batch_size: 16, "
               "engine_kwargs: {max_model_len: 1024, gpu_memory_utilization: 0.3, enforce_eager: true}}")
    return _generate(c, "generate_vllm", teacher, "{min_actors: 1, max_actors: 1, num_cpus: 0.5, num_gpus: 0}")


def _train(c: Check, name: str, zero: int, extra: dict[str, Any]) -> dict[str, Any]:
    from ray_jobs.train import main as train

    workers = 2 if (c.cpu or c.gpus >= 2) else 1
    args = {"ray.num_cpus": None, "data.train_path": c.ctx["sft"], "data.validation_path": "null", "data.max_length": 256,
            "model.build_tiny": "false", "model.name_or_path": c.ctx["base"], "deepspeed.zero_stage": zero,
            "deepspeed.precision": "fp32" if c.cpu else "bf16", "deepspeed.micro_batch_size": 8, "optim.lr": 1.0e-3,
            "optim.scheduler": "constant", "schedule.epochs": 5, "schedule.max_steps": 8 if c.cpu else 40,
            "schedule.log_every_steps": 4, "schedule.eval_every_epoch": "false", "scaling.num_workers": workers,
            "scaling.use_gpu": str(c.gpu).lower(), "output.dir": os.path.join(c.out, name),
            "output.checkpoint_dir": os.path.join(c.out, "checkpoints"), "output.run_name": name,
            # torch's AdamW: a JIT build of DeepSpeed's FusedAdam (nvcc) would not fit the 8-minute budget
            "deepspeed.extra": "{optimizer: {params: {torch_adam: true}}}", **extra}
    assert train([f"{k}={v}" for k, v in args.items() if v is not None]) == 0
    m = json.load(open(os.path.join(c.out, name, "manifest.json")))
    losses = [h["loss"] for h in m["history"] if h.get("loss") == h.get("loss")]
    c.ctx[name] = os.path.join(c.out, name)
    return {"workers": workers, "steps": m["counts"]["steps"], "tokens_per_s": round(m["metrics"]["tokens_per_s"] or 0, 1),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


def serve_step(c: Check, model: str, engine: str) -> dict[str, Any]:
    import httpx

    from pipeline.serving import shutdown, start
    from pipeline.serving.app import load_serve_config
    from tests.servers import free_port

    gpu = {"num_cpus": 0.5, "num_gpus": 0.25 if c.gpu else 0.0}
    dec = {"model": model, "engine": engine, "device": "auto" if c.gpu else "cpu", "sampling": {"max_tokens": 32},
           "ray_actor_options": gpu}
    if engine == "vllm":
        dec["vllm"] = {"engine_kwargs": {"gpu_memory_utilization": 0.3, "enforce_eager": True}}
    cfg = load_serve_config(sections={
        "http": {"host": "127.0.0.1", "port": free_port()}, "app_name": f"check-{engine}", "blocking": False,
        "decomposer": dec, "solver": {"backend": {"type": "hf", "model": model, "device": "auto" if c.gpu else "cpu"},
                                      "sampling": {"max_tokens": 32}, "ray_actor_options": gpu}})
    try:
        base = start(cfg, ready_timeout_s=300)
        lat = []
        for i in range(8):
            t0 = time.perf_counter()
            r = httpx.post(base + "/v1/solve", json={"question": f"Bob has {i} pens and buys 2 more. How many?"}, timeout=120)
            assert r.status_code == 200, r.text
            lat.append(time.perf_counter() - t0)
        return {"p50_solve_s": round(sorted(lat)[len(lat) // 2], 3), "decomposer": r.json()["models"]["decomposer"]}
    finally:
        shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check_results")
    p.add_argument("--cpu", action="store_true", help="run the steps that have a CPU variant on CPU (fp32, gloo)")
    p.add_argument("--only", default="", help="comma-separated step names to run (env and models always run)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.cpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    c = Check(os.path.abspath(args.out), args.cpu, [s for s in args.only.split(",") if s])
    c.step("env", lambda: env_step(c))
    c.step("models", lambda: models_step(c))
    c.step("generate_hf", lambda: generate_hf_step(c))
    c.step("generate_vllm", lambda: generate_vllm_step(c), needs=("gpu", "vllm"))
    c.step("train_zero2", lambda: _train(c, "train_zero2", 2, {}))
    c.step("train_zero3", lambda: _train(c, "train_zero3", 3, {}))
    c.step("lora", lambda: _train(c, "lora", 2, {"model.lora": "{r: 8, alpha: 16, export: merged}"}))
    c.step("qlora", lambda: _train(c, "qlora", 2, {"model.lora": "{r: 8, alpha: 16, qlora: true, export: merged}"}),
           needs=("gpu", "bitsandbytes"))
    student = lambda: c.ctx.get("lora") or c.ctx.get("train_zero2") or c.ctx["base"]  # noqa: E731
    c.step("serve_hf", lambda: serve_step(c, student(), "hf"))
    c.step("serve_vllm", lambda: serve_step(c, student(), "vllm"), needs=("gpu", "vllm"))
    failed = [s["step"] for s in c.steps if s["status"] == "fail"]
    print(f"[gpu_check] results in {c.out}/gpu_check.md; failed: {failed or 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
