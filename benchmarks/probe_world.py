"""The whole miniature experiment of issue 12 in one process: teacher, distillation, students, evaluation.

    python -m benchmarks.probe_world [--quick] [--teacher-steps 600 --teacher-hidden 128 ...]

Plain PyTorch, no Ray: the science prototype that sizes the quickstart. It uses the real
pieces: the generated world (:mod:`pipeline.data.world`), the teacher corpus
(:mod:`pipeline.data.world_corpus`), the world tokenizer and tiny Llama of
:mod:`pipeline.tiny_models`, the SFT tokenization/packing of :mod:`training.sft_data`, the
prompt builders, parsers, selection rules and metrics of the pipeline, and greedy decoding
with a KV cache (``model.generate``, rendered and decoded as :class:`~pipeline.backends.hf_local.HFBackend`
does). Steps:

1. train the teacher on the world's facts, drills and the ``teacher`` split's worked
   examples (learning curve: fact recall and two-stage accuracy on held-out questions);
2. the teacher decomposes the ``train`` split (``--samples`` samples at ``--temperature``)
   and solves every decomposition (greedy); 3. the four training sets are selected
   (S_D-T, S_D-R with :func:`pipeline.selection.select_variant`; S_E-T / S_E-A as in the
   paper: every teacher trace, and the same with the gold final answer);
4. four students, smaller than the teacher, are trained; 5. every setting of the paper's
   Tables 1, 3 and 6 is evaluated on the ``test`` split, per family.

Writes ``benchmarks/results/probe_world.{json,md}`` (``--tag`` adds a suffix). Timings are
wall and process CPU seconds with the load average: this machine is shared, so the idle
estimate assumes both cores (CPU seconds / threads).
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

NAME = "probe_world"
Messages = list[dict[str, str]]


# ---------------------------------------------------------------- sizes
@dataclass
class Size:
    hidden: int
    layers: int
    heads: int = 4


@dataclass
class Schedule:
    steps: int
    batch: int = 16  # packed rows per step
    seq_len: int = 512
    lr: float = 3e-3
    warmup: float = 0.05
    eval_every: int = 0  # 0: evaluate only at the end


class Clock:
    """Wall and process-CPU seconds of a phase, with the load average at its end."""

    def __init__(self) -> None:
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def read(self) -> dict[str, float]:
        wall, cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
        import torch

        return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "idle_estimate_s": round(cpu / torch.get_num_threads(), 1),
                "load1": round(os.getloadavg()[0], 2)}


# ---------------------------------------------------------------- models
def new_model(tok_dir: str, size: Size, out_dir: str, seed: int):
    """A fresh tiny Llama sharing the world tokenizer in ``tok_dir`` (saved in ``out_dir``)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.tiny_models import build_tiny_model

    build_tiny_model(out_dir, hidden_size=size.hidden, num_layers=size.layers, num_heads=size.heads, max_positions=512,
                     seed=seed, tokenizer_from=tok_dir)
    return AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def train(model, tok, rows: list[dict], sched: Schedule, seed: int = 0,
          evaluate: Optional[Callable[[Any], dict]] = None, label: str = "") -> dict[str, Any]:
    """SFT grouped by length (assistant-only loss) for ``sched.steps`` steps; the learning curve when ``evaluate``."""
    import torch

    from training import sft_data

    data = sft_data.tokenize_rows(tok, rows, sched.seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=sched.lr, weight_decay=0.0, betas=(0.9, 0.95))
    warm = max(1, int(sched.warmup * sched.steps))
    lr_at = lambda s: sched.lr * (s / warm if s < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, sched.steps - warm))))  # noqa: E731
    clock, curve, step, epoch, tokens, loss_ema, eval_s = Clock(), [], 0, 0, 0, None, 0.0
    epoch_steps = len(sft_data.plan_epoch(data.lengths, sched.batch, 1, 0, seed, "group_by_length", sched.seq_len))
    model.train()
    while step < sched.steps:
        for batch in sft_data.plan_epoch(data.lengths, sched.batch, 1, epoch, seed, "group_by_length", sched.seq_len):
            if step >= sched.steps:
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            b = sft_data.collate(data.examples, batch, tok.pad_token_id)
            loss = model(**b, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens += sft_data.real_tokens(data.examples, batch)
            loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
            if evaluate and ((sched.eval_every and step % sched.eval_every == 0) or step == sched.steps):
                t, te = clock.read(), time.perf_counter()
                model.eval()
                point = {"step": step, "epoch": round(step / epoch_steps, 2), "tokens": tokens, "loss": round(loss_ema, 4),
                         "train_wall_s": round(t["wall_s"] - eval_s, 1), "load1": t["load1"], **evaluate(model)}
                model.train()
                eval_s += time.perf_counter() - te
                curve.append(point)
                print(f"  [{label}] {point}", flush=True)
        epoch += 1
    model.eval()
    t = clock.read()
    out = {"steps": step, "epochs": round(step / epoch_steps, 2), "rows": data.rows, "truncated_rows": data.truncated_rows,
           "tokens": tokens, "tokens_per_epoch": sum(data.lengths), "target_tokens_per_epoch": data.target_tokens(),
           "final_loss": round(loss_ema or 0.0, 4), "curve": curve, **t, "eval_s": round(eval_s, 1),
           "train_wall_s": round(t["wall_s"] - eval_s, 1)}
    out["train_tokens_per_s"] = round(tokens / max(1e-9, out["train_wall_s"]))
    print(f"  [{label}] trained {step} steps ({out['epochs']} epochs), {tokens} tokens, {out['train_wall_s']} s "
          f"({out['train_tokens_per_s']} tok/s, load {t['load1']})", flush=True)
    return out


# ---------------------------------------------------------------- generation
class Gen:
    """Batched generation with one model: rendered, padded and decoded as HFBackend does."""

    def __init__(self, model, tok, name: str, batch: int = 64):
        self.model, self.tok, self.name, self.batch = model, tok, name, batch
        self.tokens = {"prompt": 0, "completion": 0, "calls": 0}

    def __call__(self, prompts: list[Messages], max_new: int, temperature: float = 0.0, seed: int = 0) -> list[dict]:
        import torch

        from pipeline.chat import render_chat as render_prompt

        texts = [render_prompt(self.tok, m) for m in prompts]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[Optional[dict]] = [None] * len(texts)
        for s in range(0, len(order), self.batch):
            idx = order[s: s + self.batch]
            enc = self.tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            kw = dict(max_new_tokens=max_new, pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id)
            if temperature > 0:
                torch.manual_seed(seed * 100_003 + s)
                kw.update(do_sample=True, temperature=temperature, top_p=1.0)
            else:
                kw.update(do_sample=False)
            with torch.inference_mode():
                gen = self.model.generate(**enc, **kw)[:, enc["input_ids"].shape[1]:]
            for j, i in enumerate(idx):
                ids = gen[j]
                hit = (ids == self.tok.eos_token_id).nonzero()
                n = int(hit[0]) + 1 if len(hit) else int((ids != self.tok.pad_token_id).sum())
                out[i] = {"text": self.tok.decode(ids[:n], skip_special_tokens=True).strip(),
                          "prompt_tokens": int(enc["attention_mask"][j].sum()), "completion_tokens": n}
                self.tokens["prompt"] += out[i]["prompt_tokens"]
                self.tokens["completion"] += n
                self.tokens["calls"] += 1
        return out  # type: ignore[return-value]


# ---------------------------------------------------------------- the method (mirrors pipeline/inference.py)
MAX_NEW = {"decomposer": 64, "solver": 96, "direct": 24, "dynamic": 32, "dynamic_answer": 32}


def decompose(dec: Gen, rows: list[dict], style, temperature: float = 0.0, seed: int = 0) -> list[dict]:
    from pipeline import prompts
    from pipeline.parsing import ParseError
    from pipeline.structured import parse_decomposition

    outs = dec([style(prompts.decomposer_messages(r, few_shot=False)) for r in rows], MAX_NEW["decomposer"], temperature, seed)
    res = []
    for o in outs:
        try:
            subqs, parsed = parse_decomposition(o["text"]), True
        except ParseError:
            subqs, parsed = [], False
        res.append({"decomposer_text": o["text"], "subquestions": subqs, "parsed": parsed,
                    "tokens": o["prompt_tokens"] + o["completion_tokens"]})
    return res


def solve(sol: Gen, rows: list[dict], decs: list[dict], style) -> list[dict]:
    from pipeline import metrics, prompts
    from pipeline.parsing import extract_answer

    outs = sol([style(prompts.solver_messages(r, d["subquestions"], few_shot=False)) for r, d in zip(rows, decs)], MAX_NEW["solver"])
    res = []
    for r, d, o in zip(rows, decs, outs):
        pred = extract_answer(o["text"], r["dataset"])
        s = metrics.score(r["dataset"], pred, list(r["answers"]))
        res.append({**d, "solver_text": o["text"], "prediction": pred, "correct": bool(s["correct"]),
                    "tokens": d.get("tokens", 0) + o["prompt_tokens"] + o["completion_tokens"]})
    return res


def direct(model: Gen, rows: list[dict], style) -> list[dict]:
    from pipeline import metrics, prompts
    from pipeline.parsing import extract_answer

    outs = model([style(prompts.direct_messages(r, few_shot=False)) for r in rows], MAX_NEW["direct"])
    return [{"prediction": (p := extract_answer(o["text"], r["dataset"])),
             "correct": bool(metrics.score(r["dataset"], p, list(r["answers"]))["correct"]),
             "tokens": o["prompt_tokens"] + o["completion_tokens"]} for r, o in zip(rows, outs)]


def dynamic(dec: Gen, sol: Gen, rows: list[dict], style, max_steps: int = 6) -> list[dict]:
    """Self-ask: the decomposer asks one follow-up at a time, the solver answers it (inference.py's loop)."""
    from pipeline import metrics, prompts
    from pipeline.parsing import ParseError, parse_dynamic_step

    st = [{"history": [], "prediction": None, "tokens": 0, "steps": 0} for _ in rows]
    active = list(range(len(rows)))
    for _ in range(max_steps):
        if not active:
            break
        outs = dec([style(prompts.dynamic_messages(rows[i], st[i]["history"], few_shot=False)) for i in active], MAX_NEW["dynamic"])
        asking = []
        for i, o in zip(active, outs):
            st[i]["tokens"] += o["prompt_tokens"] + o["completion_tokens"]
            try:
                kind, text = parse_dynamic_step(o["text"])
            except ParseError:
                kind, text = "final", None
            if kind == "followup":
                asking.append((i, text))
            else:
                st[i]["prediction"] = text
        if asking:
            outs = sol([style(prompts.dynamic_answer_messages(rows[i], st[i]["history"], q, few_shot=False)) for i, q in asking],
                       MAX_NEW["dynamic_answer"])
            for (i, q), o in zip(asking, outs):
                st[i]["tokens"] += o["prompt_tokens"] + o["completion_tokens"]
                st[i]["history"].append((q, o["text"].strip()))
                st[i]["steps"] += 1
        active = [i for i, _ in asking]
    for r, s in zip(rows, st):
        s["correct"] = bool(metrics.score(r["dataset"], s["prediction"], list(r["answers"]))["correct"])
    return st


# ---------------------------------------------------------------- prompt style
def project_style(m: Messages) -> Messages:
    """The project's prompts as they are (the probe's functions take a style; compact prompts were measured and dropped)."""
    return m


# ---------------------------------------------------------------- statistics
def bootstrap(correct: list[bool], n: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(accuracy %, 2.5th, 97.5th percentile) by resampling questions."""
    if not correct:
        return (float("nan"),) * 3
    rng = random.Random(seed)
    k = len(correct)
    means = sorted(sum(correct[rng.randrange(k)] for _ in range(k)) / k for _ in range(n))
    return (100 * sum(correct) / k, 100 * means[int(0.025 * n)], 100 * means[int(0.975 * n) - 1])


def exact_decomposition(pred: list[str], gold: list[str]) -> bool:
    norm = lambda qs: [" ".join(q.lower().split()).rstrip("?") for q in qs]  # noqa: E731
    return norm(pred) == norm(gold)


def per_family(rows: list[dict], results: list[dict], key: str = "correct") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for fam in sorted({r["dataset"] for r in rows}):
        vals = [bool(x[key]) for r, x in zip(rows, results) if r["dataset"] == fam]
        acc, lo, hi = bootstrap(vals)
        toks = [x.get("tokens", 0) for r, x in zip(rows, results) if r["dataset"] == fam]
        out[fam] = {"n": len(vals), "acc": round(acc, 1), "ci": [round(lo, 1), round(hi, 1)],
                    "tokens_per_q": round(sum(toks) / max(1, len(toks)), 1)}
    return out


# ---------------------------------------------------------------- phases
def teacher_evaluator(world, tok, style, n_facts: int, n_questions: int) -> Callable[[Any], dict]:
    """Learning-curve probe: recall of held-out anchors' facts and two-stage accuracy on test questions."""
    from pipeline.data import world as W
    from pipeline.data import world_corpus

    rng = random.Random(1)
    test_companies = set(world.companies)
    test_people = {world.companies[c].founder for c in test_companies}
    facts = [f for f in world.facts() if f[1] in test_companies | test_people]
    facts = rng.sample(facts, min(n_facts, len(facts)))
    rows = sample_rows(world.questions["test"], n_questions, seed=1)

    def evaluate(model) -> dict:
        g = Gen(model, tok, "teacher")
        outs = g([[{"role": "user", "content": W.RELATIONS[r].question.format(s=s)}] for r, s, _ in facts], 24)
        recall = sum(o["text"] == W.fact_sentence(r, s, v) for o, (r, s, v) in zip(outs, facts)) / len(facts)
        decs = decompose(g, rows, style)
        res = solve(g, rows, decs, style)
        fam = per_family(rows, res)
        dec_em = sum(exact_decomposition(d["subquestions"], r["gold_subquestions"]) for d, r in zip(decs, rows)) / len(rows)
        return {"fact_recall": round(100 * recall, 1), "decomp_em": round(100 * dec_em, 1),
                **{f"acc_{k.split('_')[1]}": v["acc"] for k, v in fam.items()}}

    _ = world_corpus  # (the corpus module documents the rows this evaluator probes)
    return evaluate


def sample_rows(questions, per_family_n: int, seed: int = 0, families=None) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for fam in sorted({q.dataset for q in questions}):
        if families and fam not in families:
            continue
        qs = [q.to_row() for q in questions if q.dataset == fam]
        out += rng.sample(qs, min(per_family_n, len(qs))) if per_family_n else qs
    return out


def distill_data(teacher: Gen, world, args, style) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """The teacher decomposes (n samples) and solves the train split; the four selected training sets."""
    from pipeline.selection import canonical_order, select_variant

    clock = Clock()
    qrows = [q.to_row() for q in world.questions["train"]]
    solved = []
    for k in range(args.samples):
        decs = decompose(teacher, qrows, style, temperature=args.temperature, seed=k)
        parsed = [(r, d) for r, d in zip(qrows, decs) if d["parsed"]]
        res = solve(teacher, [r for r, _ in parsed], [d for _, d in parsed], style)
        for (r, d), x in zip(parsed, res):
            solved.append({**r, "request_id": f"{r['id']}#{k}", "sample_index": k, "subquestions": d["subquestions"],
                           "teacher": "teacher", "solver": "teacher", "correct": x["correct"], "solver_raw_text": x["solver_text"]})
    rows, _ = canonical_order(solved)
    sets = {}
    for name, variant in (("S_D-T", "decomposer_all"), ("S_D-R", "decomposer_correct"), ("S_E-T", "solver_teacher"),
                          ("S_E-A", "solver_gold")):
        sel, _ = select_variant(rows, variant, per_question=1, validation_fraction=0.0)
        sets[name] = [{"id": r["id"], "messages": restyle(r["messages"], style)} for r in sel]
    n_q = len(qrows)
    stats = {"train_questions": n_q, "samples": args.samples, "temperature": args.temperature,
             "decompositions_parsed": len(solved), "teacher_correct": sum(r["correct"] for r in solved),
             "teacher_train_accuracy": round(100 * sum(r["correct"] for r in solved) / max(1, len(solved)), 1),
             "rows": {k: len(v) for k, v in sets.items()}, **clock.read()}
    return sets, stats


def restyle(messages: list[dict], style) -> list[dict]:
    return style([dict(m) for m in messages[:-1]]) + [dict(messages[-1])]


def knowledge_coverage(world, sets: dict[str, list[dict]]) -> dict[str, float]:
    """Share of the test questions' gold fact sentences that occur in the solver students' training text."""
    seen = " ".join(r["messages"][-1]["content"] for r in sets["S_E-T"])
    out = {}
    for fam in ("world_chain", "world_numeric", "world_compare"):
        sents = [a for q in world.questions["test"] if q.dataset == fam for a in (q.gold_subanswers or []) if a.startswith("The ")]
        out[fam] = round(100 * sum(a in seen for a in sents) / max(1, len(sents)), 1)
    return out


def evaluate_settings(world, T: Gen, students: dict[str, Gen], untrained: Gen, args, style) -> dict[str, Any]:
    """Every setting of Tables 1, 3 and 6 on the test split (held-out family included), per family."""
    rows = sample_rows(world.questions["test"], args.test_per_family)
    clock, out = Clock(), {}

    def record(name: str, res: list[dict], decs: Optional[list[dict]] = None, **extra) -> None:
        fam = per_family(rows, res)
        if decs is not None:
            for f, v in fam.items():
                pairs = [(d, r) for d, r in zip(decs, rows) if r["dataset"] == f]
                v["decomp_em"] = round(100 * sum(exact_decomposition(d["subquestions"], r["gold_subquestions"]) for d, r in pairs) / len(pairs), 1)
        out[name] = {"families": fam, **extra}
        print(f"  {name}: " + ", ".join(f"{f}={v['acc']} [{v['ci'][0]}, {v['ci'][1]}] tok/q {v['tokens_per_q']}"
                                       for f, v in fam.items()), flush=True)

    record("single-stage teacher (direct)", direct(T, rows, style))
    t_dec = decompose(T, rows, style)
    record("teacher QD + teacher QA (static)", solve(T, rows, t_dec, style), t_dec)
    record("teacher dynamic (self-ask)", dynamic(T, T, rows, style))
    for name in ("S_D-T", "S_D-R"):
        d = decompose(students[name], rows, style)
        record(f"{name} + teacher QA", solve(T, rows, d, style), d)
    for name in ("S_E-T", "S_E-A"):
        record(f"teacher QD + {name}", solve(students[name], rows, t_dec, style))
    d = decompose(untrained, rows, style)
    record("untrained student + teacher QA", solve(T, rows, d, style), d)
    return {"settings": out, "test_questions": len(rows), **clock.read()}


def build_tokenizer(world, out_dir: str) -> str:
    """The world tokenizer (word level), saved as a tokenizer directory shared by every model."""
    from pipeline.data import world_corpus
    from pipeline.tiny_models import train_word_tokenizer

    tok = train_word_tokenizer(world_corpus.world_texts(world))
    tok.save_pretrained(out_dir)
    return out_dir


def teacher_rows(world, args, style) -> list[dict]:
    from pipeline.data import world_corpus

    return world_corpus.teacher_corpus(world, dynamic_every=args.dynamic_every,
                                       repeat={"fact": args.fact_repeat, "solve": args.solve_repeat,
                                               "decompose": args.decompose_repeat})


def get_teacher(world, tok, tok_dir: str, args, style, out_dir: str):
    """Train the teacher (learning curve included), or load the one a previous run saved (``--reuse-teacher``)."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    done = os.path.join(out_dir, "probe_teacher.json")
    if args.reuse_teacher and os.path.exists(done):
        with open(done) as f:
            info = json.load(f)
        print(f"teacher reused from {out_dir}", flush=True)
        return AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval(), {**info, "reused": True}
    tsize = Size(args.teacher_hidden, args.teacher_layers)
    teacher = new_model(tok_dir, tsize, out_dir, args.seed)
    sched = Schedule(args.teacher_steps, args.teacher_batch, args.seq_len, args.teacher_lr, eval_every=args.eval_every)
    rows = teacher_rows(world, args, style)
    info = {"size": asdict(tsize), "params": n_params(teacher), "schedule": asdict(sched),
            "corpus": {k: sum(1 for r in rows if r["kind"] == k) for k in sorted({r["kind"] for r in rows})}}
    info["train"] = train(teacher, tok, rows, sched, args.seed, teacher_evaluator(world, tok, style, 200, 40), "teacher")
    teacher.save_pretrained(out_dir)
    with open(done, "w") as f:
        json.dump(info, f)
    return teacher, info


def parse_args(argv=None):
    p = common.base_parser(__doc__.split("\n")[0])
    a = p.add_argument
    a("--tag", default="", help="suffix of the result files")
    a("--seed", type=int, default=0)
    a("--teacher-hidden", type=int, default=128); a("--teacher-layers", type=int, default=4)
    a("--teacher-steps", type=int, default=600); a("--teacher-lr", type=float, default=3e-3)
    a("--teacher-batch", type=int, default=16); a("--seq-len", type=int, default=512)
    a("--fact-repeat", type=int, default=4, help="copies of each fact row in the teacher's corpus")
    a("--solve-repeat", type=int, default=1); a("--decompose-repeat", type=int, default=1)
    a("--dynamic-every", type=int, default=1, help="self-ask traces for every k-th teacher question")
    a("--eval-every", type=int, default=100)
    a("--student-hidden", type=int, default=64); a("--student-layers", type=int, default=2)
    a("--decomposer-steps", type=int, default=150); a("--solver-steps", type=int, default=150)
    a("--student-lr", type=float, default=3e-3); a("--student-batch", type=int, default=16)
    a("--samples", type=int, default=2); a("--temperature", type=float, default=0.7)
    a("--test-per-family", type=int, default=200)
    a("--threads", type=int, default=2)
    a("--drills", type=int, default=2000)
    a("--reuse-teacher", action="store_true", help="load the teacher a previous run with the same --tag saved")
    a("--stop-after", choices=["teacher", "all"], default="all")
    args = p.parse_args(argv)
    if args.quick:
        args.teacher_steps, args.decomposer_steps, args.solver_steps = 60, 20, 20
        args.eval_every, args.test_per_family = 30, 20
    return args


def main(argv=None) -> int:
    import torch
    from transformers import AutoTokenizer

    from pipeline.data import world as W

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    report = common.Report(NAME, args, "probe_world: the miniature experiment in one process")
    style = project_style
    scratch = common.scratch(NAME + args.tag, clean=not args.reuse_teacher)
    world = W.generate(W.WorldConfig(seed=args.seed, drills=args.drills))
    tok_dir = build_tokenizer(world, os.path.join(scratch, "tokenizer"))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    results: dict[str, Any] = {"world": W.describe(world), "vocab": len(tok)}
    print(f"world: {results['world']}, vocab {len(tok)}", flush=True)

    teacher, results["teacher"] = get_teacher(world, tok, tok_dir, args, style, os.path.join(scratch, "teacher"))
    T = Gen(teacher, tok, "teacher")
    if args.stop_after == "teacher":
        report.write(results, "", render_notes(results), params=vars(args))
        return 0

    sets, results["distill"] = distill_data(T, world, args, style)
    results["distill"]["knowledge_coverage_of_test_facts"] = knowledge_coverage(world, sets)
    print(f"distill: {results['distill']}", flush=True)

    ssize = Size(args.student_hidden, args.student_layers)
    students, results["students"] = {}, {}
    for name, rows_ in sets.items():
        if not rows_:
            raise SystemExit(f"{name} has no training rows (teacher accuracy on the train split: "
                             f"{results['distill']['teacher_train_accuracy']} %): train the teacher longer")
        m = new_model(tok_dir, ssize, os.path.join(scratch, name), args.seed + 1)
        steps = args.decomposer_steps if name.startswith("S_D") else args.solver_steps
        sched = Schedule(steps, args.student_batch, args.seq_len, args.student_lr)
        results["students"][name] = {"size": asdict(ssize), "params": n_params(m), "schedule": asdict(sched),
                                     "train": train(m, tok, rows_, sched, args.seed, None, name)}
        students[name] = Gen(m, tok, name)
    untrained = Gen(new_model(tok_dir, ssize, os.path.join(scratch, "untrained"), args.seed + 1), tok, "untrained")

    results["evaluation"] = evaluate_settings(world, T, students, untrained, args, style)
    results["generation_tokens"] = {g.name: g.tokens for g in [T, untrained, *students.values()]}
    report.write(results, render_table(results), render_notes(results), params=vars(args))
    return 0


def render_table(results: dict[str, Any]) -> str:
    settings = results["evaluation"]["settings"]
    fams = sorted(next(iter(settings.values()))["families"])
    head = ["setting"] + [f"{f} acc [95% CI]" for f in fams] + [f"{f} tokens/q" for f in fams]
    body = []
    for name, s in settings.items():
        fam = s["families"]
        body.append([name] + [f"{fam[f]['acc']} [{fam[f]['ci'][0]}, {fam[f]['ci'][1]}]" for f in fams]
                    + [fam[f]["tokens_per_q"] for f in fams])
    return common.md_table(head, body)


def render_notes(results: dict[str, Any]) -> str:
    t = results["teacher"]
    curve = t.get("train", {}).get("curve") or []
    lines = ["## Teacher learning curve", "",
             common.md_table(list(curve[0].keys()), [list(p.values()) for p in curve]) if curve else "(reused)", "",
             f"Teacher: {t['params']} parameters, {t['size']}, corpus rows {t['corpus']}.", ""]
    if "distill" in results:
        lines += ["## Distillation data", "", f"{results['distill']}", ""]
    if "students" in results:
        lines += ["## Students", ""]
    for name, s in results.get("students", {}).items():
        tr = s["train"]
        lines.append(f"- {name}: {s['params']} parameters, {tr['rows']} rows, {tr['steps']} steps ({tr['epochs']} epochs), "
                     f"{tr['tokens']} tokens, {tr['train_wall_s']} s ({tr['train_tokens_per_s']} tok/s, load {tr['load1']}), "
                     f"loss {tr['final_loss']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
