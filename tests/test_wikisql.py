import json
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "data"))
import wikisql  # noqa: E402

# A few records in WikiSQL's raw format (data/<split>.jsonl, data/<split>.tables.jsonl).
TABLE = {"id": "1-100-1", "header": ["Player", "No.", "Position", "Pick", "Year"],
         "types": ["text", "text", "text", "real", "real"], "rows": []}
QUERIES = [
    {"phase": 1, "table_id": "1-100-1", "question": "What position does Dee O'Neil play?",
     "sql": {"sel": 2, "agg": 0, "conds": [[0, 0, "Dee O'Neil"]]}},
    {"phase": 1, "table_id": "1-100-1", "question": "How many players wore number 3?",
     "sql": {"sel": 0, "agg": 3, "conds": [[1, 0, "3"]]}},
    {"phase": 1, "table_id": "1-100-1", "question": "Highest pick for a centre before 2012\u00a0?",
     "sql": {"sel": 3, "agg": 1, "conds": [[2, 0, "Centre"], [4, 2, 2012]]}},
    {"phase": 1, "table_id": "1-100-1", "question": "Who was picked after 243?",
     "sql": {"sel": 0, "agg": 0, "conds": [[3, 1, 243.0]]}},
    {"phase": 1, "table_id": "1-100-1", "question": "What is the lowest year?",
     "sql": {"sel": 4, "agg": 2, "conds": []}},
]
HEAD = "table: 1-100-1\\ncolumns: Player, No., Position, Pick, Year\\nQ: "
EXPECTED = [
    HEAD + "What position does Dee O'Neil play?\\nA: SELECT Position FROM 1-100-1 WHERE Player = 'Dee O'Neil'",
    HEAD + "How many players wore number 3?\\nA: SELECT COUNT Player FROM 1-100-1 WHERE No. = '3'",
    HEAD + "Highest pick for a centre before 2012\\u00a0?\\nA: SELECT MAX Pick FROM 1-100-1 "
    "WHERE Position = 'Centre' AND Year < 2012",
    HEAD + "Who was picked after 243?\\nA: SELECT Player FROM 1-100-1 WHERE Pick > 243.0",
    HEAD + "What is the lowest year?\\nA: SELECT MIN Year FROM 1-100-1",
]
EXPECTED = ['{"text": "' + e + '"}' for e in EXPECTED]


def write_release(folder):
    """Write a tiny WikiSQL release; dev and test get the first two questions."""
    data = folder / "data"
    data.mkdir(parents=True)
    for split, queries in [("train", QUERIES), ("dev", QUERIES[:2]), ("test", QUERIES[:2])]:
        (data / f"{split}.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
        (data / f"{split}.tables.jsonl").write_text(json.dumps(TABLE) + "\n")
    return folder


def write_tarball(tmp_path):
    folder = write_release(tmp_path / "release")
    tarball = tmp_path / "data.tar.bz2"
    with tarfile.open(tarball, "w:bz2") as tar:
        tar.add(folder / "data", arcname="data")
    return tarball


def read_lines(folder, name):
    return (folder / f"{name}.jsonl").read_text().splitlines()


def test_tarball(tmp_path):
    out = tmp_path / "out"
    wikisql.main(["--source", str(write_tarball(tmp_path)), "--out", str(out), "--num-valid", "1"])
    assert read_lines(out, "train") == EXPECTED
    assert read_lines(out, "valid") == EXPECTED[:1]
    assert read_lines(out, "test") == EXPECTED[:2]


@pytest.mark.parametrize("sub", ["", "data"])
def test_folder(tmp_path, sub):
    out = tmp_path / "out"
    source = write_release(tmp_path / "release") / sub
    wikisql.main(["--source", str(source), "--out", str(out), "--num-train", "3"])
    assert read_lines(out, "train") == EXPECTED[:3]


def test_download_bytes(tmp_path, monkeypatch):
    blob = write_tarball(tmp_path).read_bytes()
    monkeypatch.setattr(wikisql, "download", lambda: blob)
    wikisql.main(["--out", str(tmp_path / "out")])
    assert read_lines(tmp_path / "out", "train") == EXPECTED


def test_seed_samples_deterministically(tmp_path):
    tables = {TABLE["id"]: TABLE}
    texts = [json.loads(e)["text"] for e in EXPECTED]
    sample = wikisql.convert(QUERIES, tables, 3, seed=1)
    assert sample == wikisql.convert(QUERIES, tables, 3, seed=1)
    assert len(sample) == 3 and set(sample) <= set(texts)
    assert wikisql.convert(QUERIES, tables, 100) == texts


def test_no_network_is_one_line_error(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit) as e:
        wikisql.main(["--out", str(tmp_path / "out")])
    message = str(e.value.code)
    assert message.startswith("error: downloading ") and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_missing_source_is_one_line_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        wikisql.main(["--source", str(tmp_path / "nowhere.tar.bz2")])
    assert str(e.value.code).startswith("error: reading ")


@pytest.mark.parametrize("name,size", [("train", 400), ("valid", 50), ("test", 50)])
def test_example_data(name, size):
    lines = read_lines(ROOT / "data", name)
    assert len(lines) == size
    for line in lines:
        text = json.loads(line)["text"]
        table, columns, question, answer = text.split("\n")
        table_id = table.removeprefix("table: ")
        assert table.startswith("table: ") and columns.startswith("columns: ")
        assert question.startswith("Q: ")
        assert answer.startswith("A: SELECT ") and f" FROM {table_id}" in answer
