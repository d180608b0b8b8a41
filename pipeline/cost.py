"""The cost ledger: actual tokens and cost per stage, model and mode, priced from a small price table.

Workers add ledger counters to their shard commit markers (:func:`ledger_usage`), under keys
``ledger|<stage>|<model>|<mode>|<field>`` (``|`` because model names contain dots), so the
existing shard totals sum them over committed shards and a resumed job counts every row once.
:func:`cost_summary` prices them: online requests at the online price, batch requests at the
batch price (``batch_discount``), cached responses at zero (with ``pricing.bill_cached``, at the
entry's own price, as if computed: a system's cost, whatever an earlier run left in the cache). Prices come from, in order: a flat
``pricing.prompt_per_1k``/``completion_per_1k`` when the config sets one, ``pricing.models``,
``pricing.table`` (a YAML file) and the shipped ``pipeline/prices.yaml``; a model in none of them
costs 0 and is listed under ``unpriced`` so a report never silently shows a free teacher.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional

import yaml

from pipeline import storage
from pipeline.config import ModelPrice, PricingConfig
from pipeline.method import StageUsage

SHIPPED_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prices.yaml")
LEDGER = "ledger"
FIELDS = ("requests", "cached", "prompt_tokens", "completion_tokens", "cached_prompt_tokens", "cached_completion_tokens")


@functools.lru_cache(maxsize=8)
def load_price_table(path: str = SHIPPED_TABLE) -> dict[str, ModelPrice]:
    data = yaml.safe_load(storage.read_text(path)) or {}
    return {name: ModelPrice.model_validate(p) for name, p in (data.get("models") or {}).items()}


def _lookup(model: str, table: dict[str, ModelPrice]) -> Optional[ModelPrice]:
    name = model.rsplit("/", 1)[-1]
    if name in table:
        return table[name]
    prefixes = [k for k in table if name.startswith(k + "-") or name.startswith(k + "@")]
    return table[max(prefixes, key=len)] if prefixes else None


def price_of(model: str, pricing: PricingConfig) -> tuple[Optional[ModelPrice], str]:
    """(price, where it came from) for ``model``; ``(None, "unpriced")`` when nobody lists it."""
    if {"prompt_per_1k", "completion_per_1k"} & pricing.model_fields_set:
        flat = ModelPrice(prompt_per_1m=pricing.prompt_per_1k * 1000, completion_per_1m=pricing.completion_per_1k * 1000,
                          batch_discount=1.0)
        return flat, "config (flat)"
    if model in pricing.models:
        return pricing.models[model], "config (models)"
    if pricing.table:
        found = _lookup(model, load_price_table(pricing.table))
        if found is not None:
            return found, pricing.table
    found = _lookup(model, load_price_table())
    return (found, "shipped table") if found is not None else (None, "unpriced")


def price_tokens(price: Optional[ModelPrice], prompt_tokens: float, completion_tokens: float, mode: str = "online") -> float:
    if price is None:
        return 0.0
    online = prompt_tokens / 1e6 * price.prompt_per_1m + completion_tokens / 1e6 * price.completion_per_1m
    return online * (price.batch_discount if mode == "batch" else 1.0)


# ---------------------------------------------------------------- recording (workers)
def backend_mode(backend: Any) -> str:
    """"batch" for a Batch-API backend (also behind the response cache), else "online"."""
    return getattr(getattr(backend, "inner", backend), "mode", "online")


def _key(stage: str, model: str, mode: str, field: str) -> str:
    return "|".join((LEDGER, stage, str(model).replace("|", "/"), mode, field))


def ledger_usage(stage: str, backend: Any, tally: StageUsage) -> dict[str, float]:
    """Commit-marker counters of one stage's calls on one backend (its :class:`~pipeline.method.StageUsage`).

    Cached responses are counted apart, with their tokens: they cost nothing unless ``pricing.bill_cached``."""
    mode = backend_mode(backend)
    billed = {"requests": tally.calls - tally.cached_calls, "cached": tally.cached_calls,
              "prompt_tokens": tally.prompt_tokens - tally.cached_prompt_tokens,
              "completion_tokens": tally.completion_tokens - tally.cached_completion_tokens,
              "cached_prompt_tokens": tally.cached_prompt_tokens, "cached_completion_tokens": tally.cached_completion_tokens}
    return {_key(stage, backend.name, mode, f): float(billed[f]) for f in FIELDS}


def merge(*usages: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for u in usages:
        for k, v in u.items():
            out[k] = out.get(k, 0) + v
    return out


# ---------------------------------------------------------------- pricing (driver)
def ledger_entries(totals: dict[str, Any]) -> list[dict[str, Any]]:
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for key, value in totals.items():
        parts = key.split("|") if isinstance(key, str) else []
        if len(parts) != 5 or parts[0] != LEDGER:
            continue
        _, stage, model, mode, field = parts
        row = rows.setdefault((stage, model, mode), {"stage": stage, "model": model, "mode": mode, **{f: 0 for f in FIELDS}})
        row[field] = int(row.get(field, 0) + value)
    return [rows[k] for k in sorted(rows)]


def cost_summary(totals: dict[str, Any], pricing: PricingConfig) -> dict[str, Any]:
    """``{by_stage_model: [...], total_cost, currency, unpriced}`` from shard totals."""
    entries, unpriced = [], []
    for e in ledger_entries(totals):
        price, source = price_of(e["model"], pricing)
        if price is None and (e["requests"] or (pricing.bill_cached and e["cached"])):
            unpriced.append(e["model"])
        prompt, completion = e["prompt_tokens"], e["completion_tokens"]
        if pricing.bill_cached:
            prompt, completion = prompt + e["cached_prompt_tokens"], completion + e["cached_completion_tokens"]
        cost = price_tokens(price, prompt, completion, e["mode"])
        entries.append({**e, "cost": round(cost, 8), "price_source": source,
                        "prompt_per_1m": price.prompt_per_1m if price else None,
                        "completion_per_1m": price.completion_per_1m if price else None,
                        "batch_discount": price.batch_discount if price else None})
    return {"by_stage_model": entries, "total_cost": round(sum(e["cost"] for e in entries), 8),
            "currency": pricing.currency, "unpriced": sorted(set(unpriced))}


def add_cost(usage: dict[str, Any], totals: dict[str, Any], pricing: PricingConfig) -> dict[str, Any]:
    """Put the ledger into a manifest's ``usage`` (and make ``estimated_cost`` its total)."""
    summary = cost_summary(totals, pricing)
    usage["cost"] = summary
    if summary["by_stage_model"]:
        usage["estimated_cost"] = summary["total_cost"]
    return usage


# ---------------------------------------------------------------- evaluation report
def render_cost_section(settings: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: the actual ledger of each setting (from its infer manifest)."""
    rows = [(s["name"], e, s.get("currency", "USD")) for s in settings for e in s.get("cost") or []]
    if not rows:
        return []
    lines = ["", "## Cost (actual, from each run's manifest)", "",
             "| setting | stage | model | mode | requests | cached | prompt tokens | completion tokens | cost |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for name, e, currency in rows:
        cost = f"{e['cost']:.6f} {currency}" + ("" if e.get("prompt_per_1m") is not None else " (unpriced)")
        lines.append(f"| {name} | {e['stage']} | {e['model']} | {e['mode']} | {e['requests']} | {e['cached']} | "
                     f"{e['prompt_tokens']} | {e['completion_tokens']} | {cost} |")
    return lines
