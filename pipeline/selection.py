"""``select``: build the distillation training sets (chat form, with lineage per row).

Variants (the paper's names in brackets):

* ``decomposer_all`` (S_D-T): every parsed teacher decomposition. Prompt:
  :func:`~pipeline.prompts.decomposer_messages` without demos (the student's prompt);
  target: :func:`~pipeline.parsing.format_subquestions` of the subquestions.
* ``decomposer_correct`` (S_D-R): rejection sampling, only decompositions whose two-stage
  answer was scored correct by ``solve``; at most ``per_question`` per question, chosen by
  ``tie_break`` (deterministic).
* ``solver_teacher`` (S_E-T): every teacher solving trace that states a final answer on a "The
  answer is:" line (so the student learns the marker), right or wrong, as the paper's S_E-T.
  Prompt: :func:`~pipeline.prompts.solver_messages` without the demo; target: the raw solver text.
* ``solver_gold`` (S_E-A): the same traces with the final answer replaced by the question's
  gold answer (:func:`~pipeline.parsing.with_final_answer`), as the paper's S_E-A.

Rules shared by every variant:

* Input rows are visited in a fixed order (question id, sample index, request id), so the
  output does not depend on shard or file order.
* Duplicates are dropped: one row per (question id, conversation). For the decomposer
  variants the prompt is a function of the question, so this is exactly "identical
  (question id, target text) pairs"; for the solver variants two different decompositions
  may get the same solver text, and both stay (their prompts differ).
* Train/validation split by question: ``int(sha256(f"{question_id}|{seed}"), 16) % 1000 <
  round(validation_fraction * 1000)`` goes to validation. It depends on nothing but the
  question id and the seed, so a question never lands in both splits, in one variant or
  across variants, and the split is stable when more data is added.

It is a group-by over at most millions of small rows, so it runs on the driver (pyarrow +
plain Python), no Ray. Output layout (local or ``s3://``)::

    <out>/<variant>/train/part-00000.parquet       columns: SELECT_SCHEMA
    <out>/<variant>/validation/part-00000.parquet
    <out>/<variant>/train.jsonl                    FastChat/ShareGPT: {"id", "conversations": [{"from", "value"}]}
    <out>/<variant>/validation.jsonl
    <out>/README.md                                dataset card
    <out>/manifest.json                            (written by :func:`run`)
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections import Counter, defaultdict
from typing import Any, Iterable, Iterator, Literal, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from pipeline import storage, tables
from pipeline.config import Strict, UsageError
from pipeline.manifest import Manifest, read_manifest
from pipeline.job_config import InputConfig
from pipeline.parsing import format_subquestions, parse_solver_output, with_final_answer
from pipeline.prompts import PROMPT_VERSION, decomposer_messages, solver_messages

log = logging.getLogger(__name__)

Variant = Literal["decomposer_all", "decomposer_correct", "solver_teacher", "solver_gold"]
TieBreak = Literal["first_sample", "fewest_subquestions", "most_subquestions", "shortest_text"]

VARIANTS: tuple[str, ...] = ("decomposer_all", "decomposer_correct", "solver_teacher", "solver_gold")
PAPER_NAME = {"decomposer_all": "S_D-T", "decomposer_correct": "S_D-R", "solver_teacher": "S_E-T", "solver_gold": "S_E-A"}
DESCRIPTION = {
    "decomposer_all": "every parsed teacher decomposition (question -> subquestions)",
    "decomposer_correct": "decompositions whose two-stage answer was correct (rejection sampling)",
    "solver_teacher": "every teacher solver trace (question + subquestions -> answers), right or wrong",
    "solver_gold": "every teacher solver trace with its final answer replaced by the gold answer",
}
NEEDS_SOLVE = {"decomposer_correct", "solver_teacher", "solver_gold"}
SPLITS = ("train", "validation")
OWNER_MARKER = "_select.json"  # marks a directory as select's to replace, even when a crash left it half-written
ROLE_TO_FROM = {"system": "system", "user": "human", "assistant": "gpt"}

MESSAGE_TYPE = pa.list_(pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())]))
SELECT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("question_id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("variant", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("messages", MESSAGE_TYPE, nullable=False),
        pa.field("source_request_id", pa.string(), nullable=False),
        pa.field("teacher", pa.string()),
        pa.field("solver", pa.string()),
        pa.field("correct", pa.bool_()),
        pa.field("prompt_version", pa.string()),
    ]
)

# Columns read from the input when present (a generate output lacks the solve ones).
_INPUT_COLUMNS = ("id", "dataset", "split", "question", "context", "answers", "request_id", "sample_index", "subquestions",
                  "teacher", "prompt_version", "correct", "solver_raw_text", "solver", "solver_prompt_version", "error")
_REQUIRED = ("id", "dataset", "question", "request_id", "subquestions")


class SelectOutput(Strict):
    dir: str = Field(..., description="Output directory (local or s3://); a previous select output there is replaced.")
    overwrite: bool = Field(False, description="Replace a non-empty directory that is not a select output.")


class SelectConfig(Strict):
    input: InputConfig = Field(..., description="A solve output (or, for decomposer_all only, a generate output).")
    output: SelectOutput
    variants: list[Variant] = Field(default_factory=lambda: list(VARIANTS), min_length=1)
    per_question: Optional[int] = Field(1, ge=1, description="decomposer_correct: decompositions kept per question (null: all).")
    tie_break: TieBreak = Field("first_sample", description="decomposer_correct: which correct decompositions to keep first.")
    validation_fraction: float = Field(0.1, ge=0.0, le=1.0, description="Share of *questions* held out for validation.")
    seed: int = Field(0, description="Salt of the question-id hash that assigns splits.")
    min_train_rows: int = Field(1, ge=0, description="Warn when a variant has fewer training rows than this.")


# ---------------------------------------------------------------- pure helpers


def split_of(question_id: str, seed: int, validation_fraction: float) -> str:
    """"train" or "validation" for a question: a hash of the id and seed, nothing else."""
    bucket = int(hashlib.sha256(f"{question_id}|{seed}".encode("utf-8")).hexdigest(), 16) % 1000
    return "validation" if bucket < round(validation_fraction * 1000) else "train"


def to_sharegpt(row: dict[str, Any]) -> dict[str, Any]:
    """FastChat/ShareGPT form of an output row: ``{"id", "conversations": [{"from", "value"}]}``."""
    return {"id": row["id"],
            "conversations": [{"from": ROLE_TO_FROM[m["role"]], "value": m["content"]} for m in row["messages"]]}


def _tie_key(tie_break: str):
    def key(c: dict[str, Any]):
        order = (c["sample_index"], c["source_request_id"])
        if tie_break == "fewest_subquestions":
            return (c["n_subquestions"], *order)
        if tie_break == "most_subquestions":
            return (-c["n_subquestions"], *order)
        if tie_break == "shortest_text":
            return (len(c["target"]), *order)
        return order

    return key


def _candidate(variant: str, row: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The training example a row gives for a variant, or None when the row does not qualify."""
    subqs = list(row["subquestions"] or [])
    if variant in ("decomposer_all", "decomposer_correct"):
        if variant == "decomposer_correct" and row.get("correct") is not True:
            return None
        prompt = decomposer_messages(row, few_shot=False)
        target = format_subquestions(subqs)
    else:
        text = row.get("solver_raw_text")
        if not text or not str(text).strip():
            return None
        if parse_solver_output(str(text))[1] is None:
            return None  # a trace without the "The answer is:" line would teach the student to omit it
        gold = [a for a in (row.get("answers") or []) if str(a).strip()]
        if variant == "solver_gold" and not gold:
            return None  # no gold answer to put in (a question without one is scored by nobody)
        prompt = solver_messages(row, subqs, few_shot=False)
        target = str(text) if variant == "solver_teacher" else with_final_answer(str(text), str(gold[0]))
    messages = prompt + [{"role": "assistant", "content": target}]
    return {"question_id": row["id"], "dataset": row["dataset"], "source_request_id": row["request_id"],
            "sample_index": int(row.get("sample_index") or 0), "teacher": row.get("teacher"), "solver": row.get("solver"),
            "correct": row.get("correct"), "messages": messages, "target": target, "n_subquestions": len(subqs)}


def select_variant(rows: list[dict[str, Any]], variant: str, *, per_question: Optional[int] = 1,
                   tie_break: str = "first_sample", validation_fraction: float = 0.1, seed: int = 0
                   ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Output rows (``SELECT_SCHEMA`` columns) of one variant and its filter counts.

    ``rows`` must already be in canonical order (see :func:`canonical_order`).
    """
    stats = Counter({"candidates": 0, "duplicates_removed": 0, "over_per_question": 0})
    by_q: dict[str, list[dict[str, Any]]] = defaultdict(list)
    seen: set[tuple[str, str]] = set()
    for row in rows:
        c = _candidate(variant, row)
        if c is None:
            continue
        stats["candidates"] += 1
        key = (c["question_id"], json.dumps(c["messages"], ensure_ascii=False, sort_keys=True))
        if key in seen:
            stats["duplicates_removed"] += 1
            continue
        seen.add(key)
        by_q[c["question_id"]].append(c)
    out: list[dict[str, Any]] = []
    for qid in sorted(by_q):
        cands = by_q[qid]
        if variant == "decomposer_correct":
            cands = sorted(cands, key=_tie_key(tie_break))
            if per_question is not None and len(cands) > per_question:
                stats["over_per_question"] += len(cands) - per_question
                cands = cands[:per_question]
        split = split_of(qid, seed, validation_fraction)
        for c in cands:
            out.append({"id": f"{variant}:{c['source_request_id']}", "question_id": qid, "dataset": c["dataset"],
                        "variant": variant, "split": split, "messages": c["messages"],
                        "source_request_id": c["source_request_id"], "teacher": c["teacher"], "solver": c["solver"],
                        "correct": c["correct"], "prompt_version": PROMPT_VERSION})
    stats["rows"] = len(out)
    return out, dict(stats)


def canonical_order(rows: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Rows sorted by (question id, sample index, request id), repeated request ids dropped; and how many were."""
    ordered = sorted(rows, key=lambda r: (str(r["id"]), int(r.get("sample_index") or 0), str(r["request_id"])))
    out, seen, dup = [], set(), 0
    for r in ordered:
        if r["request_id"] in seen:
            dup += 1
            continue
        seen.add(r["request_id"])
        out.append(r)
    return out, dup


# ---------------------------------------------------------------- input


def _input_columns(path: str) -> list[str]:
    files = storage.list_files(tables.dataset_path(path), ".parquet")
    if not files:
        raise FileNotFoundError(f"no Parquet input rows under {path}")
    names = pq.ParquetFile(io.BytesIO(storage.read_bytes(files[0]))).schema_arrow.names
    missing = [c for c in _REQUIRED if c not in names]
    if missing:
        raise UsageError(f"select input {path} lacks column(s) {missing}: expected a solve or generate output")
    return [c for c in _INPUT_COLUMNS if c in names]


def read_input(inp: InputConfig) -> tuple[Iterator[dict[str, Any]], list[str]]:
    """(rows after the dataset/split filters and limit, the columns read)."""
    columns = _input_columns(inp.path)

    return inp.rows(columns=columns), columns


def lineage(path: str, max_depth: int = 6) -> list[dict[str, Any]]:
    """The chain of job manifests behind ``path`` (this input first), following their ``inputs``."""
    chain: list[dict[str, Any]] = []
    todo, seen = [path], set()
    while todo and len(chain) < max_depth:
        p = todo.pop(0)
        if p in seen or not isinstance(p, str):
            continue
        seen.add(p)
        try:
            m = read_manifest(p) if storage.is_dir(p) else None
        except Exception:  # noqa: BLE001 - lineage is best effort, never fatal
            m = None
        if not m:
            continue
        cfg = m.get("config") or {}
        entry = {"path": p, "job": m.get("job"), "started_at": m.get("started_at"), "counts": m.get("counts")}
        for key in ("teacher", "solver"):
            if isinstance(cfg.get(key), dict):
                entry[key] = {k: cfg[key].get(k) for k in ("type", "model", "base_url", "role") if cfg[key].get(k)}
        if isinstance(cfg.get("sampling"), dict):
            entry["sampling"] = cfg["sampling"]
        if m.get("accuracy"):
            entry["accuracy"] = m["accuracy"]
        chain.append(entry)
        for v in (m.get("inputs") or {}).values():
            todo.extend(v if isinstance(v, list) else [v])
    return chain


# ---------------------------------------------------------------- output


def _prepare_output(out: str, overwrite: bool) -> None:
    """Empty ``out`` when it holds a previous (possibly half-written) select output; refuse anything else."""
    marker = storage.join(out, OWNER_MARKER)
    if storage.exists(out):
        prev = read_manifest(out) if storage.is_dir(out) else None
        if overwrite or storage.exists(marker) or (prev and prev.get("job") == "select"):
            storage.delete(out)
        elif storage.list_files(out):
            raise UsageError(f"{out} is not empty and holds no select output; set output.overwrite=true or pick another dir")
    storage.write_json(marker, {"job": "select"})


def write_variant(out: str, variant: str, rows: list[dict[str, Any]]) -> None:
    for split in SPLITS:
        part = [r for r in rows if r["split"] == split]
        tables.write_rows(storage.join(out, variant, split, "part-00000.parquet"), part, SELECT_SCHEMA)
        tables.write_jsonl(storage.join(out, variant, f"{split}.jsonl"), [to_sharegpt(r) for r in part])


def _table(header: list[str], body: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in body]
    return "\n".join(lines)


def dataset_card(cfg: SelectConfig, summary: dict[str, Any]) -> str:
    """Markdown dataset card: what is in each variant and split, how it was filtered, where it came from."""
    counts = summary["variants"]
    lines = [
        "# divconq distillation training sets",
        "",
        f"Built by `divconq select` on {summary['built_at']} from `{cfg.input.path}`. "
        f"Prompt version `{PROMPT_VERSION}` (students are prompted without demonstrations).",
        "",
        "## Variants",
        "",
        _table(["variant", "paper", "contents", "train rows", "validation rows", "train questions", "validation questions"],
               [[v, PAPER_NAME[v], DESCRIPTION[v], c["splits"]["train"], c["splits"]["validation"],
                 c["questions"]["train"], c["questions"]["validation"]] for v, c in counts.items()]),
        "",
        "## Rows per dataset, variant and split",
        "",
        _table(["dataset", "variant", "train", "validation"],
               [[ds, v, n.get("train", 0), n.get("validation", 0)]
                for v, c in counts.items() for ds, n in sorted(c["by_dataset"].items())]),
        "",
        "## Filters",
        "",
        f"- Input rows: {summary['input_rows']} (datasets: {cfg.input.datasets or 'all'}, splits: {cfg.input.splits or 'all'}, "
        f"limit: {cfg.input.limit or 'none'}; repeated request ids dropped: {summary['duplicate_request_ids']}).",
        "- `decomposer_all`: every row with parsed subquestions; target `1. ...` lines or `No decomposition`.",
        f"- `decomposer_correct`: rows scored correct by `solve`; at most {cfg.per_question or 'all'} per question, "
        f"chosen by `{cfg.tie_break}` (ties: sample index, then request id).",
        "- `solver_teacher`: every solver trace that states its answer on a `The answer is:` line, right or wrong; "
        "`solver_gold`: the same traces with that answer replaced by the gold one.",
        "- Duplicates: one row per (question id, conversation), the earliest sample kept.",
        f"- Split by question: `int(sha256(f\"{{question_id}}|{cfg.seed}\"), 16) % 1000 < "
        f"{round(cfg.validation_fraction * 1000)}` goes to validation (validation_fraction={cfg.validation_fraction}, seed={cfg.seed}); "
        "no question is in both splits.",
        "",
        _table(["variant", "candidates", "duplicates removed", "over per_question", "rows"],
               [[v, c["candidates"], c["duplicates_removed"], c["over_per_question"], c["rows"]] for v, c in counts.items()]),
        "",
        "## Lineage",
        "",
    ]
    if summary["lineage"]:
        for e in summary["lineage"]:
            role = "solver" if e.get("solver") else "teacher"
            model = e.get(role)
            desc = f": {role} `{model.get('model')}` ({model.get('type')})" if model else ""
            lines.append(f"- `{e['job']}` at `{e['path']}` ({e.get('started_at')}){desc}")
    else:
        lines.append(f"- `{cfg.input.path}` (no manifest found)")
    lines += [
        f"- Teachers: {', '.join(summary['teachers']) or 'n/a'}; solvers: {', '.join(summary['solvers']) or 'n/a'}; "
        f"input prompt versions: {', '.join(summary['input_prompt_versions']) or 'n/a'}.",
        "- Every row carries `source_request_id` (the generate/solve request it came from), `teacher`, `solver` and `correct`.",
        "",
        "## Files",
        "",
        "- `<variant>/{train,validation}/part-00000.parquet`: columns "
        + ", ".join(f"`{f.name}`" for f in SELECT_SCHEMA) + " (`messages`: list of {role, content}).",
        "- `<variant>/{train,validation}.jsonl`: FastChat/ShareGPT, `{\"id\", \"conversations\": [{\"from\": "
        "\"system\"|\"human\"|\"gpt\", \"value\"}]}`.",
        "- `manifest.json`: config, counts, lineage, versions.",
    ]
    if summary["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in summary["warnings"]]
    return "\n".join(lines) + "\n"


def select(cfg: SelectConfig) -> dict[str, Any]:
    """Build every configured variant into ``cfg.output.dir`` with its card; returns the summary for the manifest."""
    rows_iter, columns = read_input(cfg.input)
    wants_solve = sorted(set(cfg.variants) & NEEDS_SOLVE)
    if wants_solve and not {"correct", "solver_raw_text"} <= set(columns):
        raise UsageError(f"variants {wants_solve} need a solve output (columns 'correct', 'solver_raw_text'); "
                         f"{cfg.input.path} looks like a generate output: run solve first or use variants=[decomposer_all]")
    rows, dup = canonical_order(r for r in rows_iter if not r.get("error") and r.get("subquestions") is not None)
    _prepare_output(cfg.output.dir, cfg.output.overwrite)
    summary: dict[str, Any] = {
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "input_rows": len(rows) + dup, "duplicate_request_ids": dup, "variants": {}, "warnings": [],
        "lineage": lineage(cfg.input.path),
        "teachers": sorted({str(r["teacher"]) for r in rows if r.get("teacher")}),
        "solvers": sorted({str(r["solver"]) for r in rows if r.get("solver")}),
        "input_prompt_versions": sorted({str(r["prompt_version"]) for r in rows if r.get("prompt_version")}),
        "prompt_version": PROMPT_VERSION,
    }
    for variant in cfg.variants:
        out_rows, stats = select_variant(rows, variant, per_question=cfg.per_question, tie_break=cfg.tie_break,
                                         validation_fraction=cfg.validation_fraction, seed=cfg.seed)
        write_variant(cfg.output.dir, variant, out_rows)
        by_ds: dict[str, dict[str, int]] = defaultdict(lambda: {s: 0 for s in SPLITS})
        questions: dict[str, set] = {s: set() for s in SPLITS}
        for r in out_rows:
            by_ds[r["dataset"]][r["split"]] += 1
            questions[r["split"]].add(r["question_id"])
        stats.update(splits={s: sum(1 for r in out_rows if r["split"] == s) for s in SPLITS},
                     questions={s: len(q) for s, q in questions.items()}, by_dataset=dict(by_ds))
        summary["variants"][variant] = stats
        if stats["splits"]["train"] < cfg.min_train_rows:
            msg = f"variant {variant} has {stats['splits']['train']} training rows (min_train_rows={cfg.min_train_rows})"
            log.warning(msg)
            summary["warnings"].append(msg)
        log.info("select: %s (%s): %s", variant, PAPER_NAME[variant], stats["splits"])
    storage.write_text(storage.join(cfg.output.dir, "README.md"), dataset_card(cfg, summary))
    return summary


def counts_of(summary: dict[str, Any]) -> dict[str, int]:
    """Flat counts for the manifest: input rows and rows per variant/split."""
    counts = {"rows_in": summary["input_rows"], "duplicate_request_ids": summary["duplicate_request_ids"]}
    for v, c in summary["variants"].items():
        for s in SPLITS:
            counts[f"{v}/{s}"] = c["splits"][s]
    return counts


MANIFEST_KEYS = ("variants", "lineage", "warnings", "teachers", "solvers", "prompt_version", "input_prompt_versions")


def run(cfg: SelectConfig) -> Manifest:
    """The select job: the training sets of ``cfg.variants`` into ``cfg.output.dir`` (a rerun replaces them)."""
    started = time.time()
    summary = select(cfg)
    manifest = Manifest.of("select", cfg, inputs={"solved": cfg.input.path}, counts=counts_of(summary),
                           started_at=started, extra={k: summary[k] for k in MANIFEST_KEYS}).write(cfg.output.dir)
    log.info("select done: %s -> %s", {v: c["splits"] for v, c in summary["variants"].items()}, cfg.output.dir)
    return manifest
