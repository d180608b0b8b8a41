"""Dataset loaders on the shipped samples (data/samples) and hand-written fixtures (tests/fixtures)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.data import SourceConfig, load_questions, load_source, row_parser
from pipeline.data.drop import answer_to_string
from pipeline.data.gsm8k import final_answer, socratic_steps, strip_annotations
from pipeline.schema import QUARANTINE_SCHEMA, QUESTION_SCHEMA, Question, Rejected, RowError

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data" / "samples"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def load(dataset: str, path: Path | str, **kw):
    return load_questions(SourceConfig(dataset=dataset, path=str(path), **kw))


def by_location(bad: list[Rejected]) -> dict[str, Rejected]:
    return {r.location: r for r in bad}


def assert_arrow_ok(good: list[Question], bad: list[Rejected]) -> None:
    pa.Table.from_pylist([q.to_row() for q in good], schema=QUESTION_SCHEMA)
    pa.Table.from_pylist([r.to_row() for r in bad], schema=QUARANTINE_SCHEMA)


# ------------------------------------------------------------------ GSM8K
def test_gsm8k_socratic_sample():
    good, bad = load("gsm8k", SAMPLES / "gsm8k" / "train_socratic.jsonl", split="train")
    assert (len(good), len(bad)) == (1000, 0)
    q = good[0]
    assert q.id == "gsm8k:train:0" and q.dataset == "gsm8k" and q.split == "train"
    assert q.question.startswith("Natalia sold clips to 48 of her friends")
    assert q.answers == ["72"]
    assert q.context == ""
    assert q.gold_subquestions == [
        "How many clips did Natalia sell in May?",
        "How many clips did Natalia sell altogether in April and May?",
    ]
    assert q.gold_subanswers == [
        "Natalia sold 48/2 = 24 clips in May.",
        "Natalia sold 48+24 = 72 clips altogether in April and May.",
    ]
    assert [x.id for x in good] == [f"gsm8k:train:{i}" for i in range(1000)]
    for x in good:
        assert x.gold_subquestions and len(x.gold_subquestions) == len(x.gold_subanswers)
        assert not any("<<" in s or "####" in s for s in x.gold_subanswers)
        assert all(s and a for s, a in zip(x.gold_subquestions, x.gold_subanswers))
        assert "," not in x.answers[0]
    assert_arrow_ok(good, bad)


def test_gsm8k_plain_and_socratic_share_ids():
    plain, bad1 = load("gsm8k", SAMPLES / "gsm8k" / "test.jsonl")
    socratic, bad2 = load("gsm8k", SAMPLES / "gsm8k" / "test_socratic.jsonl")
    assert len(plain) == len(socratic) == 100 and not bad1 and not bad2
    assert all(p.gold_subquestions is None and p.gold_subanswers is None for p in plain)
    assert all(s.gold_subquestions for s in socratic)
    for p, s in zip(plain, socratic):
        assert (p.id, p.question, p.answers) == (s.id, s.question, s.answers)
    assert plain[0].id == "gsm8k:test:0" and plain[0].answers == ["18"]
    # stable across loads
    again, _ = load("gsm8k", SAMPLES / "gsm8k" / "test.jsonl")
    assert [q.to_row() for q in again] == [q.to_row() for q in plain]


def test_gsm8k_answer_helpers():
    assert final_answer("a\nb\n#### 1,234,567") == "1234567"
    assert final_answer("x\n#### -3.5") == "-3.5"
    assert strip_annotations("She makes 9 * 2 = $<<9*2=18>>18 every day") == "She makes 9 * 2 = $18 every day"
    subqs, subas = socratic_steps("Q1? ** step <<1+1=2>>2\nQ1? ** \nQ2? ** done 3\n#### 3")
    # a step with empty text (upstream has a few) is skipped
    assert subqs == ["Q1?", "Q2?"] and subas == ["step 2", "done 3"]
    with pytest.raises(RowError, match="'answer'"):
        final_answer("no final line")
    with pytest.raises(RowError, match="separator"):
        socratic_steps("Q1? ** a\nplain step without separator\n#### 1")


def test_gsm8k_malformed_rows_are_quarantined():
    path = FIXTURES / "gsm8k_bad.jsonl"
    good, bad = load("gsm8k", path)
    assert [q.id for q in good] == ["gsm8k:test:0", "gsm8k:test:9"]  # 0-based line numbers
    assert good[1].answers == ["2400"]
    assert good[1].gold_subquestions == ["How much does Sam earn a week?", "How much does Sam earn in 2 weeks?"]
    assert good[1].gold_subanswers == ["Sam earns $1,200 a week.", "He earns 1,200 * 2 = $2,400."]
    rej = by_location(bad)
    assert set(rej) == {"line 2", "line 3", "line 4", "line 5", "line 6", "line 7", "line 9"}
    assert "invalid JSON" in rej["line 2"].error
    assert rej["line 2"].raw.startswith('{"question": "Broken line"')
    assert rej["line 3"].error == "field 'answer' is missing"
    assert "'question'" in rej["line 4"].error and "empty" in rej["line 4"].error
    assert "'question'" in rej["line 5"].error and "must be a string" in rej["line 5"].error
    assert "'question'" in rej["line 6"].error and "limit" in rej["line 6"].error
    assert "'answer'" in rej["line 7"].error and "####" in rej["line 7"].error
    assert "JSON object" in rej["line 9"].error
    assert all(r.source == str(path) for r in bad)
    assert_arrow_ok(good, bad)


# ------------------------------------------------------------------ DROP
def test_drop_sample_parsed_jsonl():
    path = SAMPLES / "drop" / "dev.jsonl"
    good, bad = load("drop", path, split="dev")
    assert (len(good), len(bad)) == (60, 0)
    assert len({q.context for q in good}) == 5  # every question of 5 passages
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    assert [q.id for q in good] == [f"drop:dev:{r['id']}" for r in raw]
    for q, r in zip(good, raw):
        assert q.context == r["passage"] and q.question == r["question"].strip()
        assert q.answers[0] == r["answer"].strip()
        assert len(q.answers) == len(set(q.answers))
    again, _ = load("drop", path, split="dev")
    assert [q.to_row() for q in again] == [q.to_row() for q in good]
    assert_arrow_ok(good, bad)


def test_drop_simple_evals_raw_matches_parsed_form():
    raw, bad = load("drop", SAMPLES / "drop" / "drop_v0_dev.head10.jsonl.gz", split="dev")
    assert (len(raw), len(bad)) == (10, 0)
    assert [q.id for q in raw] == [f"drop:dev:{i}" for i in range(10)]
    assert raw[0].answers == ["under the age of 18 and 25 to 44 and 45 to 64"]
    assert raw[1].answers == ["Pakistanis and Filipinos", "Pakistani and Filipino"]
    assert raw[0].context.startswith("In the city, the age distribution") and raw[0].context.endswith("83.5 males.")
    assert raw[0].question == "Which age groups each made up more than 20% of the population?"
    parsed, _ = load("drop", SAMPLES / "drop" / "dev.jsonl", split="dev")
    parsed_by_id = {q.id: q for q in parsed}
    shared = [q for q in raw if q.id in parsed_by_id]
    assert len(shared) >= 2
    for q in shared:
        assert q.to_row() == parsed_by_id[q.id].to_row()


def test_drop_official_json():
    path = FIXTURES / "drop_official.json"
    good, bad = load("drop", path, split="dev")
    got = {q.id: q for q in good}
    assert list(got) == ["drop:dev:q-number", "drop:dev:q-date", "drop:dev:q-spans", "drop:dev:q-span"]
    assert got["drop:dev:q-number"].answers == ["2", "two"]
    assert got["drop:dev:q-date"].answers == ["5 September 1998", "1998", "September 1998"]
    assert got["drop:dev:q-spans"].answers == ["Tom Brady and Peyton Manning", "Peyton Manning and Tom Brady"]
    assert got["drop:dev:q-span"].answers == ["Ottoman Empire", "the Ottoman Empire"]  # stripped + deduped
    assert got["drop:dev:q-span"].context.startswith("In 1529 the Ottoman Empire")
    assert got["drop:dev:q-number"].question == "How many touchdown passes did Peyton Manning throw?"
    rej = by_location(bad)
    assert rej["passage nfl_1 / query q-no-question"].error == "field 'question' is missing"
    assert rej["passage nfl_1 / qa_pairs[4]"].error == "field 'query_id' is missing"
    assert "'answer'" in rej["passage nfl_1 / query q-empty-answer"].error
    assert "'answer'" in rej["passage nfl_1 / query q-answer-wrong-type"].error
    assert "duplicate id" in rej["passage history_2 / query q-span"].error
    assert "'passage' is empty" in rej["passage history_3"].error
    assert len(bad) == 6
    assert json.loads(rej["passage nfl_1 / qa_pairs[4]"].raw)["question"] == "How long was Brady's run?"
    assert_arrow_ok(good, bad)
    # same through a gzipped copy and with an explicit format
    assert [q.to_row() for q in load("drop", path, split="dev", format="json")[0]] == [q.to_row() for q in good]


def test_drop_official_json_gz(tmp_path):
    gz = tmp_path / "drop_dataset_dev.json.gz"
    gz.write_bytes(gzip.compress((FIXTURES / "drop_official.json").read_bytes()))
    good, bad = load("drop", gz, split="dev")
    assert len(good) == 4 and len(bad) == 6


def test_drop_answer_to_string():
    empty_date = {"day": "", "month": "", "year": ""}
    assert answer_to_string({"number": "12", "date": empty_date, "spans": []}) == "12"
    assert answer_to_string({"number": "", "date": {"day": "", "month": "", "year": "1998"}, "spans": []}) == "1998"
    assert answer_to_string({"number": "", "date": {"day": "", "month": "May", "year": ""}, "spans": []}) == "May"
    assert answer_to_string({"number": "", "date": empty_date, "spans": ["a", " b "]}) == "a and b"
    assert answer_to_string({"number": "", "date": empty_date, "spans": []}) == ""
    with pytest.raises(RowError, match="answer.spans"):
        answer_to_string({"spans": "not a list"})


def test_drop_malformed_rows_are_quarantined():
    good, bad = load("drop", FIXTURES / "drop_bad.jsonl", split="dev")
    assert [q.id for q in good] == ["drop:dev:0", "drop:dev:4"]
    assert good[0].answers == ["10"]
    assert good[1].answers == ["7", "seven"] and good[1].question == "How many points were scored in the first quarter?"
    rej = by_location(bad)
    assert set(rej) == {"line 2", "line 3", "line 4", "line 6", "line 7"}
    assert rej["line 2"].error == "field 'passage' is missing"
    assert "'answers'" in rej["line 3"].error
    assert "'context'" in rej["line 4"].error
    assert "'passage' is empty" in rej["line 6"].error
    assert "'question' is empty" in rej["line 7"].error


# ------------------------------------------------------------------ Bamboogle
def test_bamboogle_jsonl_and_csv_agree():
    good, bad = load("bamboogle", SAMPLES / "bamboogle" / "test.jsonl")
    assert (len(good), len(bad)) == (125, 0)
    assert [q.id for q in good] == [f"bamboogle:test:{i}" for i in range(125)]
    assert good[0].question == "Who was president of the United States in the year that Citibank was founded?"
    assert good[0].answers == ["james madison"]
    assert good[47].answers == ["Mildred Warner", "Mildred Gale"]
    assert sum(len(q.answers) > 1 for q in good) == 1
    from_csv, bad_csv = load("bamboogle", SAMPLES / "bamboogle" / "bamboogle.csv")
    assert not bad_csv
    assert [q.to_row() for q in from_csv] == [q.to_row() for q in good]
    assert_arrow_ok(good, bad)


def test_bamboogle_malformed_rows_are_quarantined():
    good, bad = load("bamboogle", FIXTURES / "bamboogle_bad.jsonl")
    assert [q.id for q in good] == ["bamboogle:test:0", "bamboogle:test:4"]
    assert good[0].answers == ["Steve Jobs", "Steve Wozniak"]
    rej = by_location(bad)
    assert rej["line 2"].error == "field 'answer' is missing"
    assert "'alt_answers'" in rej["line 3"].error
    assert "duplicate id 'bamboogle:test:0'" in rej["line 4"].error and "line 1" in rej["line 4"].error

    good, bad = load("bamboogle", FIXTURES / "bamboogle_bad.csv")
    assert [q.id for q in good] == ["bamboogle:test:0", "bamboogle:test:3"]
    assert good[1].answers == ["Mildred Warner", "Mildred Gale"]
    rej = by_location(bad)
    assert "'answer'" in rej["row 2"].error and "column 4" in rej["row 2"].error
    assert "'question' is empty" in rej["row 3"].error


# ------------------------------------------------------------------ generic
GENERIC_CSV_COLUMNS = {"id": "qid", "question": "prompt", "answers": "gold", "context": "passage"}


def test_generic_csv_with_column_mapping():
    path = FIXTURES / "generic_bad.csv"
    good, bad = load("generic", path, columns=GENERIC_CSV_COLUMNS)
    assert [q.id for q in good] == ["generic:test:a1", "generic:test:a5"]
    assert good[0].context == "The sky is blue." and good[0].answers == ["blue"]
    assert good[1].question == "What colour is coal, usually?" and good[1].context == ""
    rej = by_location(bad)
    assert set(rej) == {"row 2", "row 3", "row 4"}
    assert "missing column(s) 'gold', 'passage'" in rej["row 2"].error
    assert "header has 4" in rej["row 3"].error
    assert "'question' is empty" in rej["row 4"].error
    assert rej["row 2"].raw == "a2,What colour is grass?"


def test_generic_csv_missing_mapped_column():
    good, bad = load("generic", FIXTURES / "generic_bad.csv", columns={**GENERIC_CSV_COLUMNS, "answers": "gold_text"})
    assert good == []
    complete_rows = [r for r in bad if "header has" not in r.error]
    assert len(complete_rows) == 3
    assert all(r.error == "column 'gold_text' (mapped to field 'answers') is missing" for r in complete_rows)


def test_generic_jsonl_lists_numbers_and_optional_columns():
    cols = {"id": "uid", "question": "q", "answers": "golds", "gold_subquestions": "steps", "gold_subanswers": "step_answers"}
    good, bad = load("generic", FIXTURES / "generic.jsonl", split="dev", columns=cols)
    assert [q.id for q in good] == ["generic:dev:x1", "generic:dev:x2"]
    assert good[0].answers == ["2", "3"] and good[0].gold_subquestions == ["What is a prime?"]
    assert good[1].answers == ["42"] and good[1].gold_subquestions is None
    rej = by_location(bad)
    assert "'golds'" in rej["line 3"].error
    assert "'golds'" in rej["line 4"].error
    assert "duplicate id" in rej["line 5"].error
    assert rej["line 6"].error == "column 'steps' (mapped to field 'gold_subquestions') is missing"


def test_generic_parquet_default_columns(tmp_path):
    path = tmp_path / "qs.parquet"
    rows = [
        {"question": "What is 1 + 1?", "answers": ["2", "two"], "context": ""},
        {"question": "", "answers": ["x"], "context": ""},
        {"question": "Capital of France?", "answers": ["Paris"], "context": "France is in Europe."},
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    good, bad = load("generic", path)
    assert [q.id for q in good] == ["generic:test:0", "generic:test:2"]
    assert good[0].answers == ["2", "two"] and good[1].context == "France is in Europe."
    assert bad[0].location == "row 2" and "'question' is empty" in bad[0].error
    assert json.loads(bad[0].raw)["answers"] == ["x"]


def test_generic_json_array(tmp_path):
    path = tmp_path / "qs.json"
    path.write_text(json.dumps([{"q": "Why?", "a": "because"}, {"q": "How?"}, "not an object"]))
    good, bad = load("generic", path, columns={"question": "q", "answers": "a"})
    assert [q.answers for q in good] == [["because"]]
    assert [(r.location, r.error) for r in bad] == [
        ("row 2", "column 'a' (mapped to field 'answers') is missing"),
        ("row 3", "expected a JSON object, got str"),
    ]


# ------------------------------------------------------------------ common behaviour
def test_limit_counts_good_rows_only():
    rows = list(load_source(SourceConfig(dataset="gsm8k", path=str(FIXTURES / "gsm8k_bad.jsonl"), limit=2)))
    assert sum(isinstance(r, Question) for r in rows) == 2
    assert isinstance(rows[-1], Question)  # stops right after the 2nd good row
    good, _ = load("gsm8k", SAMPLES / "gsm8k" / "train_socratic.jsonl", split="train", limit=5)
    assert [q.id for q in good] == [f"gsm8k:train:{i}" for i in range(5)]
    assert load("bamboogle", SAMPLES / "bamboogle" / "test.jsonl", limit=0) == ([], [])


def test_missing_file_and_unknown_format(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_source(SourceConfig(dataset="gsm8k", path=str(missing)))
    with pytest.raises(FileNotFoundError):
        list(load_source(SourceConfig(dataset="drop", path=str(tmp_path / "nope.json"))))
    txt = tmp_path / "data.txt"
    txt.write_text("hello\n")
    with pytest.raises(ValueError, match="format"):
        load_source(SourceConfig(dataset="generic", path=str(txt)))
    # an explicit format makes any extension work
    txt.write_text(json.dumps({"question": "Q?", "answers": "A"}) + "\n")
    good, _ = load("generic", txt, format="jsonl")
    assert good[0].answers == ["A"]


def test_invalid_json_document_is_one_rejected_row(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"nfl_1": {"passage": ')
    good, bad = load("drop", path)
    assert good == [] and len(bad) == 1
    assert bad[0].location == "document" and "invalid JSON" in bad[0].error


def test_source_config_is_strict(tmp_path):
    with pytest.raises(ValueError):
        SourceConfig(dataset="gsm8k", path="x.jsonl", colums={})  # typo
    with pytest.raises(ValueError, match="columns"):
        SourceConfig(dataset="gsm8k", path="x.jsonl", columns={"question": "q"})
    with pytest.raises(ValueError, match="unknown field"):
        SourceConfig(dataset="generic", path="x.jsonl", columns={"qestion": "q"})
    with pytest.raises(ValueError):
        SourceConfig(dataset="squad", path="x.jsonl")
    cfg = tmp_path / "src.yaml"
    cfg.write_text("dataset: drop\npath: s3://bucket/drop/dev.jsonl\nsplit: dev\nlimit: 10\n")
    src = load_config(SourceConfig, str(cfg))
    assert src.path.startswith("s3://") and src.limit == 10 and src.format == "auto"
    with pytest.raises(ConfigError, match="limit"):
        load_config(SourceConfig, str(cfg), ["limit=-1"])


def test_hub_path_without_datasets_is_a_clear_import_error():
    pytest.importorskip("pipeline.data.hub")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install datasets"):
            load_source(SourceConfig(dataset="gsm8k", path="hf://openai/gsm8k", hub_config="socratic"))
    else:  # pragma: no cover - only where datasets is installed
        pytest.skip("datasets is installed; the hub path needs network access")


def test_row_parser_maps_hub_shaped_rows():
    # the same parsers serve hub rows: HF openai/gsm8k, chiayewken/bamboogle and ucinlp/drop shapes
    gsm = row_parser(SourceConfig(dataset="gsm8k", path="hf://openai/gsm8k", split="test"))
    q = gsm({"question": "2+2?", "answer": "What is 2+2? ** It is <<2+2=4>>4.\n#### 4"}, 7)
    assert q.id == "gsm8k:test:7" and q.gold_subanswers == ["It is 4."]
    bam = row_parser(SourceConfig(dataset="bamboogle", path="hf://chiayewken/bamboogle"))
    assert bam({"Question": "Who?", "Answer": "Me"}, 3).answers == ["Me"]
    drp = row_parser(SourceConfig(dataset="drop", path="hf://ucinlp/drop", split="validation"))
    q = drp({"section_id": "nfl_1", "query_id": "abc", "passage": "P.", "question": "Q?",
             "answers_spans": {"spans": ["x", "x", "y"], "types": ["span"] * 3}}, 0)
    assert q.id == "drop:validation:abc" and q.answers == ["x", "y"] and q.context == "P."


def test_s3_sources(monkeypatch):
    """The same loaders read s3:// URIs (moto server standing in for S3)."""
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                     "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="corpora")
        s3.upload_file(str(SAMPLES / "drop" / "drop_v0_dev.head10.jsonl.gz"), "corpora", "drop/dev.jsonl.gz")
        s3.upload_file(str(SAMPLES / "bamboogle" / "bamboogle.csv"), "corpora", "bamboogle/bamboogle.csv")
        table = pa.Table.from_pylist([{"question": "Q?", "answers": ["A"]}])
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        s3.put_object(Bucket="corpora", Key="generic/qs.parquet", Body=sink.getvalue().to_pybytes())

        drop_good, _ = load("drop", "s3://corpora/drop/dev.jsonl.gz", split="dev")
        local_good, _ = load("drop", SAMPLES / "drop" / "drop_v0_dev.head10.jsonl.gz", split="dev")
        assert [q.to_row() for q in drop_good] == [q.to_row() for q in local_good]
        bam, _ = load("bamboogle", "s3://corpora/bamboogle/bamboogle.csv", limit=3)
        assert [q.id for q in bam] == ["bamboogle:test:0", "bamboogle:test:1", "bamboogle:test:2"]
        gen, _ = load("generic", "s3://corpora/generic/qs.parquet")
        assert gen[0].answers == ["A"]
        with pytest.raises(FileNotFoundError, match="s3://corpora/missing.jsonl"):
            load_source(SourceConfig(dataset="gsm8k", path="s3://corpora/missing.jsonl"))
    finally:
        server.stop()


def test_unreadable_csv_row_and_crlf_jsonl(tmp_path):
    path = tmp_path / "big.csv"
    path.write_text("question,answers\nQ1?,A1\n" + "Q2 " + "x" * 200_000 + ",A2\nQ3?,A3\n")
    good, bad = load("generic", path)
    assert [q.question for q in good] == ["Q1?", "Q3?"]
    assert [q.id for q in good] == ["generic:test:0", "generic:test:2"]
    assert bad[0].location == "row 2" and "field larger than field limit" in bad[0].error
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes(b'{"question": "Q?", "answer": "x\\n#### 1"}\r\n\r\n{"question": "R?", "answer": "#### 2"}\r\n')
    good, bad = load("gsm8k", crlf)
    assert [(q.id, q.answers) for q in good] == [("gsm8k:test:0", ["1"]), ("gsm8k:test:2", ["2"])] and not bad
