"""``evaluate``: turn prediction sets (``infer`` outputs) into a report, results.json and plots.

For each dataset and setting: the dataset's metric (GSM8K exact match, DROP F1, Bamboogle
accuracy), decomposition quality against gold where gold exists (ROUGE-L, subquestion
count match, parse rate), tokens per question split by decomposer and solver, estimated
cost and the decomposer's share of it. Every figure carries its lineage.

The headline score divides by *all* questions of a prediction set: a quarantined row (in
``quarantine/``: its request failed, its input was bad) counts as wrong, as in the paper, so a
system that fails more rows cannot score higher; ``coverage`` (answered / all) stands beside it.
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any, Optional

import numpy as np
from pydantic import Field

from pipeline import storage, tables
from pipeline.config import PricingConfig, Strict
from pipeline.cost import render_cost_section
from pipeline.manifest import Manifest, read_manifest
from pipeline.metrics import METRIC_NAME, primary_metric

log = logging.getLogger(__name__)


class SettingRef(Strict):
    name: str
    predictions: str = Field(..., description="An infer output dir (local or s3://).")


class RolePricing(Strict):
    decomposer: PricingConfig = Field(default_factory=PricingConfig)
    solver: PricingConfig = Field(default_factory=PricingConfig)


class EvaluateOutput(Strict):
    dir: str


class EvaluateConfig(Strict):
    settings: list[SettingRef] = Field(..., min_length=1)
    output: EvaluateOutput
    pricing: RolePricing = Field(default_factory=RolePricing)
    title: str = "divconq evaluation"


def _mean(values: list[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _as_wrong(row: dict) -> dict:
    """A quarantined row scored as a wrong answer (older outputs left its scores empty)."""
    if not row.get("error"):
        return row
    tokens = {k: row.get(k) or 0 for k in ("decomposer_prompt_tokens", "decomposer_completion_tokens",
                                           "solver_prompt_tokens", "solver_completion_tokens",
                                           "decomposer_calls", "solver_calls")}
    return {**row, **tokens, "correct": False, "em": 0.0, "f1": 0.0}


def summarize(rows: list[dict], pricing: RolePricing) -> dict[str, Any]:
    """Figures of one (setting, dataset): ``rows`` holds the answered and the quarantined rows."""
    answered = [r for r in rows if not r.get("error")]
    rows = [_as_wrong(r) for r in rows]
    n = len(rows)
    dec_tokens = [r["decomposer_prompt_tokens"] + r["decomposer_completion_tokens"] for r in rows]
    sol_tokens = [r["solver_prompt_tokens"] + r["solver_completion_tokens"] for r in rows]
    dec_cost = sum(pricing.decomposer.cost(r["decomposer_prompt_tokens"], r["decomposer_completion_tokens"]) for r in rows)
    sol_cost = sum(pricing.solver.cost(r["solver_prompt_tokens"], r["solver_completion_tokens"]) for r in rows)
    total_tokens = sum(dec_tokens) + sum(sol_tokens)
    parsed = [r["decomposition_parsed"] for r in answered if r.get("decomposition_parsed") is not None]
    return {
        "n": n,
        "answered": len(answered),
        "quarantined": n - len(answered),
        "coverage": len(answered) / n if n else None,
        "accuracy": _mean([float(r["correct"]) for r in rows]),
        "em": _mean([r["em"] for r in rows]),
        "f1": _mean([r["f1"] for r in rows]),
        "rouge_l": _mean([r.get("rouge_l") for r in answered]),
        "count_match": _mean([r.get("count_match") for r in answered]),
        "parse_rate": _mean([float(p) for p in parsed]),
        "decomposer_tokens_per_q": sum(dec_tokens) / n if n else 0.0,
        "solver_tokens_per_q": sum(sol_tokens) / n if n else 0.0,
        "calls_per_q": _mean([r["decomposer_calls"] + r["solver_calls"] for r in rows]),
        "decomposer_token_share": sum(dec_tokens) / total_tokens if total_tokens else 0.0,
        "cost_per_q": (dec_cost + sol_cost) / n if n else 0.0,
        "decomposer_cost_share": dec_cost / (dec_cost + sol_cost) if dec_cost + sol_cost else None,
    }


BOOTSTRAP_RESAMPLES = 2000


def bootstrap_ci(values: list[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> Optional[tuple[float, float]]:
    """Percentile bootstrap 95 % interval of the mean of per-question scores (questions resampled
    with replacement, a fixed seed so a report is reproducible)."""
    if not values:
        return None
    v = np.asarray(values, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(v), size=(resamples, len(v)))
    means = v[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    results: dict[str, Any] = {"title": cfg.title, "settings": [], "table": []}
    for ref in cfg.settings:
        manifest = read_manifest(ref.predictions) or {}
        rows = tables.read_rows(storage.join(ref.predictions, "data"))
        qpath = storage.join(ref.predictions, "quarantine")
        quarantined = tables.read_rows(qpath) if storage.exists(qpath) else []
        mcfg = manifest.get("config", {})
        lineage = {"predictions": ref.predictions, "mode": mcfg.get("mode"), "decomposer": (mcfg.get("decomposer") or {}).get("model"),
                   "solver": (mcfg.get("solver") or {}).get("model"), "input": (mcfg.get("input") or {}).get("path"),
                   "prompt_version": rows[0]["prompt_version"] if rows else None, "rows": len(rows),
                   "quarantined": len(quarantined)}
        ledger = (manifest.get("usage") or {}).get("cost") or {}
        results["settings"].append({"name": ref.name, "lineage": lineage, "cost": ledger.get("by_stage_model") or [],
                                    "total_cost": ledger.get("total_cost"), "currency": ledger.get("currency", "USD")})
        every = rows + quarantined
        for dataset in sorted({str(r["dataset"]) for r in every}):
            subset = [r for r in every if str(r["dataset"]) == dataset]
            s = summarize(subset, cfg.pricing)
            # a dataset without a metric can only come from quarantined rows (all wrong): read as accuracy
            means = {"em": s["em"], "f1": s["f1"], "correct": s["accuracy"]}
            per_question = [primary_metric(dataset, _as_wrong(r), unknown="accuracy") for r in subset]
            s.update(setting=ref.name, dataset=dataset, metric=METRIC_NAME.get(dataset, "accuracy"),
                     score=primary_metric(dataset, means, unknown="accuracy"), score_ci95=bootstrap_ci(per_question))
            results["table"].append(s)
    out = cfg.output.dir
    storage.write_json(storage.join(out, "results.json"), results)
    plots = write_plots(results, out)
    summary = render_summary(results)
    storage.write_text(storage.join(out, "summary.md"), summary)
    storage.write_text(storage.join(out, "report.md"), render_report(results, plots, summary))
    return results


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{100 * v:.1f}" if pct else f"{v:.1f}"
    return str(v)


def _fmt_ci(ci: Optional[tuple[float, float]]) -> str:
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "–"


def render_summary(results: dict[str, Any]) -> str:
    """The paper's table shape: one row per setting, each dataset's score with its 95 % interval, then
    tokens and cost per question over all datasets (cost from each setting's ledger: every model at its
    own price)."""
    table, settings = results["table"], results["settings"]
    names = list(dict.fromkeys(s["setting"] for s in table))
    datasets = sorted({s["dataset"] for s in table})
    head = ["setting"] + [f"{d} ({_metric_of(table, d)})" for d in datasets] + ["tokens/q (QD + QA)", "cost/q"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name in names:
        rows = {s["dataset"]: s for s in table if s["setting"] == name}
        n = sum(r["n"] for r in rows.values())
        dec = sum(r["decomposer_tokens_per_q"] * r["n"] for r in rows.values()) / max(n, 1)
        sol = sum(r["solver_tokens_per_q"] * r["n"] for r in rows.values()) / max(n, 1)
        total_cost = next((st.get("total_cost") for st in settings if st["name"] == name), None)
        cells = [f"{_fmt(rows[d]['score'], True)} {_fmt_ci(rows[d].get('score_ci95'))}" if d in rows else "–" for d in datasets]
        cost = f"{total_cost / n:.2e}" if total_cost is not None and n else "–"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {dec + sol:.0f} ({dec:.0f} + {sol:.0f}) | {cost} |")
    return "\n".join(lines) + "\n"


def _metric_of(table: list[dict[str, Any]], dataset: str) -> str:
    return next(s["metric"] for s in table if s["dataset"] == dataset)


def render_report(results: dict[str, Any], plots: list[str], summary: str = "") -> str:
    lines = [f"# {results['title']}", ""]
    if summary:
        lines += ["## Summary", "", summary, "Scores in %, with a percentile-bootstrap 95 % interval over questions; "
                  "cost per question from each setting's ledger (each model at its own price).", "", "## Every figure", ""]
    lines += ["| dataset | setting | metric | score | coverage | n | ROUGE-L vs gold | count match | "
             "parse rate | decomposer tok/q | solver tok/q | calls/q | decomposer token share | cost/q | score 95 % CI |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in results["table"]:
        lines.append(f"| {s['dataset']} | {s['setting']} | {s['metric']} | {_fmt(s['score'], True)} | "
                     f"{_fmt(s['coverage'], True)} | {s['n']} | "
                     f"{_fmt(s['rouge_l'], True)} | {_fmt(s['count_match'], True)} | {_fmt(s['parse_rate'], True)} | {_fmt(s['decomposer_tokens_per_q'])} | "
                     f"{_fmt(s['solver_tokens_per_q'])} | {_fmt(s['calls_per_q'])} | {_fmt(s['decomposer_token_share'], True)} | "
                     f"{s['cost_per_q']:.5f} | {_fmt_ci(s.get('score_ci95'))} |")
    lines += ["", "Scores and shares are percentages. A score divides by all n questions: a quarantined question counts "
              "as wrong; coverage is the share answered. The 95 % CI is a percentile bootstrap over questions "
              f"({BOOTSTRAP_RESAMPLES} resamples). Tokens are as counted by each backend (the offline reference "
              "backends count words).", "", "## Lineage", ""]
    for st in results["settings"]:
        lin = st["lineage"]
        lines.append(f"- **{st['name']}**: mode `{lin['mode']}`, decomposer `{lin['decomposer']}`, solver `{lin['solver']}`, "
                     f"prompt `{lin['prompt_version']}`, data `{lin['input']}`, {lin['rows']} rows "
                     f"({lin['quarantined'] or 0} quarantined), predictions `{lin['predictions']}`")
    lines += render_cost_section(results["settings"])  # actual tokens and cost per stage and model
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def write_plots(results: dict[str, Any], out: str) -> list[str]:
    """Metric per dataset and setting, and tokens per question split by stage (PNG)."""
    import matplotlib  # lazy: only the report's plots need it (~0.3 s, and a font cache on first use)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after matplotlib.use("Agg"), so no display is ever looked for

    table = results["table"]
    if not table:
        return []
    datasets = sorted({s["dataset"] for s in table})
    settings = list(dict.fromkeys(s["setting"] for s in table))
    names = []
    kinds = ["metric", "tokens"] + (["quality"] if any(s.get("rouge_l") is not None for s in table) else [])
    for kind in kinds:
        fig, axes = plt.subplots(1, len(datasets), figsize=(max(6, 4.5 * len(datasets)), 4.2 + 0.15 * max(0, len(settings) - 4)),
                                 squeeze=False)
        for ax, ds in zip(axes[0], datasets):
            rows = [next((s for s in table if s["dataset"] == ds and s["setting"] == st), None) for st in settings]
            labels = [st for st, r in zip(settings, rows) if r]
            rows = [r for r in rows if r]
            x = range(len(rows))
            if kind == "metric":
                ci = [r.get("score_ci95") or (r["score"] or 0, r["score"] or 0) for r in rows]
                err = [[100 * ((r["score"] or 0) - lo) for r, (lo, _) in zip(rows, ci)],
                       [100 * (hi - (r["score"] or 0)) for r, (_, hi) in zip(rows, ci)]]
                ax.bar(x, [100 * (r["score"] or 0) for r in rows], color="#4C72B0", yerr=err, capsize=2)
                ax.set_ylabel(f"{rows[0]['metric']} (%)")
                ax.set_ylim(0, 100)
            elif kind == "quality":
                w = 0.4
                ax.bar([i - w / 2 for i in x], [100 * (r["rouge_l"] or 0) for r in rows], w, label="ROUGE-L vs gold", color="#8172B3")
                ax.bar([i + w / 2 for i in x], [100 * (r["count_match"] or 0) for r in rows], w, label="subquestion count match", color="#64B5CD")
                ax.set_ylabel("decomposition quality (%)")
                ax.set_ylim(0, 100)
                ax.legend(fontsize=8)
            else:
                dec = [r["decomposer_tokens_per_q"] for r in rows]
                ax.bar(x, dec, label="decomposer", color="#DD8452")
                ax.bar(x, [r["solver_tokens_per_q"] for r in rows], bottom=dec, label="solver", color="#55A868")
                ax.set_ylabel("tokens per question")
                ax.legend(fontsize=8)
            ax.set_title(ds)
            ax.set_xticks(list(x))
            if len(labels) > 4:  # many settings: slanted one-line labels, which do not run into each other
                ax.set_xticklabels(labels, fontsize=7, rotation=40, ha="right")
            else:
                ax.set_xticklabels([_wrap(label) for label in labels], fontsize=7)
        fig.tight_layout()
        name, png = f"{kind}.png", io.BytesIO()
        fig.savefig(png, format="png", dpi=110)  # in memory: one atomic write to any store, no temp file left behind
        plt.close(fig)
        storage.write_bytes(storage.join(out, name), png.getvalue())
        names.append(name)
    return names


def _wrap(text: str, width: int = 18) -> str:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + len(w) + 1 > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return "\n".join(lines + [cur])


def run(cfg: EvaluateConfig) -> Manifest:
    """The evaluate job: report.md, results.json and plots of ``cfg.settings`` into ``cfg.output.dir``."""
    started = time.time()
    results = evaluate(cfg)
    manifest = Manifest.of("evaluate", cfg, inputs={s.name: s.predictions for s in cfg.settings},
                           counts={"settings": len(cfg.settings), "rows": len(results["table"])},
                           started_at=started).write(cfg.output.dir)
    log.info("report: %s", storage.join(cfg.output.dir, "report.md"))
    return manifest
