"""The output layer only at labelled positions: the quickstart teacher's training step, both ways.

    python -m benchmarks.bench_labelled_logits [--quick] [--steps 100]

A chat row's prompt carries no labels, yet the model's own ``labels=`` loss computes logits (a matmul and
a softmax over the whole vocabulary) at every position; on a 64-wide model with a 1,463-token vocabulary
they are a large share of the step. ``training.sft_data.causal_lm_loss`` (what the train recipe calls)
keeps the output layer to the positions where some row of the batch has a label. This trains the
quickstart's own teacher (its corpus, word tokenizer, size, batches of 32 in its length-grouped order)
from the same initialization, in one process with one torch thread: the baseline is the model's own loss.
Each way runs ``--repeats`` times, interleaved; the figure is the median milliseconds per step (forward,
backward, AdamW) and its ratio. The losses show they train the same model: equal to float rounding over the
first steps (the largest gap of the first 10), after which rounding differences grow as in any two runs
whose kernels differ, so the last steps' mean loss is shown too.
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import tempfile
import time
from typing import Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

NAME = "bench_labelled_logits"


def teacher_setup(steps: int):
    """The quickstart teacher's randomly initialized model, its first ``steps`` batches and the data."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.quickstart import Quickstart, QuickstartConfig
    from pipeline.tiny_models import build_tiny_model
    from training import sft_data

    cfg = Quickstart(QuickstartConfig(out=common.scratch(NAME))).teacher_job()
    t, d = cfg.model.tiny, cfg.data
    tok = AutoTokenizer.from_pretrained(t.tokenizer_from)
    data = sft_data.tokenize_rows(tok, sft_data.read_conversations(d.train_path), d.max_length)
    plan = sft_data.plan_epoch(data.lengths, cfg.deepspeed.micro_batch_size, 1, 0, cfg.seed, d.pack_or_group, d.max_length,
                               d.shuffle, d.mega_batch_multiplier)
    batches = [sft_data.collate(data.examples, b, tok.pad_token_id) for b in sft_data.shard_batches(plan, 0, 1)[:steps]]
    out = tempfile.mkdtemp(prefix="divconq-bench-")
    build_tiny_model(out, hidden_size=t.hidden_size, num_layers=t.num_layers, num_heads=t.num_heads,
                     max_positions=max(t.max_positions, d.max_length), seed=cfg.seed, tokenizer_from=t.tokenizer_from)
    return AutoModelForCausalLM.from_pretrained(out), batches


def train(model, batches, loss_fn, lr: float) -> tuple[float, list[float]]:
    """Milliseconds per step and every step's loss, training a copy of ``model`` on ``batches``."""
    import torch

    model = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95))
    start, losses = time.perf_counter(), []
    for batch in batches:
        loss = loss_fn(model, dict(batch))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return 1000 * (time.perf_counter() - start) / len(batches), losses


def main(argv: Optional[list[str]] = None) -> int:
    import torch

    from training.sft_data import IGNORE_INDEX, causal_lm_loss

    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 100, quick 20)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each way, interleaved")
    args = p.parse_args(argv)
    rep = common.Report(NAME, args, "The output layer only at labelled positions: the quickstart teacher's step")
    torch.set_num_threads(1)
    model, batches = teacher_setup(args.steps or (20 if rep.quick else 100))
    targets = [b["labels"][:, 1:] != IGNORE_INDEX for b in batches]
    shares = {"labelled tokens": sum(int(t.sum()) for t in targets) / sum(t.numel() for t in targets),
              "kept positions": sum(int(t.any(0).sum()) * t.shape[0] for t in targets) / sum(t.numel() for t in targets)}
    ways = {"the model's own loss": lambda m, b: m(**b, use_cache=False).loss, "labelled positions": causal_lm_loss}
    runs: dict[str, list] = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, fn in ways.items():
            runs[name].append(train(model, batches, fn, lr=1e-2))
    base = statistics.median(ms for ms, _ in runs["the model's own loss"])
    results = {name: {"ms_per_step": [ms for ms, _ in r], "median_ms": statistics.median(ms for ms, _ in r),
                      "losses": r[-1][1]} for name, r in runs.items()}
    own = results["the model's own loss"]["losses"]
    rows = [[name, len(batches), f"{r['median_ms']:.1f}", f"{base / r['median_ms']:.2f}x",
             f"{max(abs(a - b) for a, b in zip(r['losses'][:10], own[:10])):.1e}",
             f"{statistics.mean(r['losses'][-20:]):.3f}"] for name, r in results.items()]
    table = common.md_table(["loss", "steps", "ms/step (median)", "speed vs own loss", "loss gap, first 10 steps",
                             "mean loss, last 20 steps"], rows)
    notes = (f"Labelled tokens: {100 * shares['labelled tokens']:.0f} % of the batches' positions; positions kept "
             f"(some row has a label there): {100 * shares['kept positions']:.0f} %.")
    rep.write({"ways": results, "shares": shares}, table, notes, params={"steps": len(batches), "repeats": args.repeats})
    return 0


if __name__ == "__main__":
    sys.exit(main())
