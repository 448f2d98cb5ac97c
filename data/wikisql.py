"""Make train/valid/test.jsonl for lora.py from the WikiSQL release.

Each example is one {"text": ...} line:

    table: <table id>
    columns: <header, comma-separated>
    Q: <question>
    A: SELECT ... FROM <table id> WHERE ...

By default the first --num-train questions of WikiSQL's train split, the first
--num-valid of its dev split and the first --num-test of its test split are
kept, which reproduces the reference's 1000/100/100 data; --seed samples them
at random instead. Validation and test tables are thus never seen in training.

    python data/wikisql.py --out data/wikisql
    python data/wikisql.py --source data.tar.bz2 --out data/wikisql  # offline
"""

import argparse
import io
import json
import random
import sys
import tarfile
import urllib.request
from pathlib import Path

URL = "https://github.com/salesforce/WikiSQL/raw/master/data.tar.bz2"
AGG_OPS = ["", "MAX", "MIN", "COUNT", "SUM", "AVG"]
COND_OPS = ["=", ">", "<", "OP"]
# Output split -> WikiSQL split.
SPLITS = {"train": "train", "valid": "dev", "test": "test"}


def render_value(value):
    # WikiSQL keeps numbers typed in JSON as numbers; the reference leaves
    # those unquoted (e.g. `Year = 2012`, `Pick < 243.0`) and quotes the rest.
    return f"'{value}'" if isinstance(value, str) else str(value)


def render_sql(sql, table_id, header):
    """Render WikiSQL's logical form as the reference's SQL string."""
    agg = AGG_OPS[sql["agg"]]
    column = header[sql["sel"]]
    text = f"SELECT {agg} {column}" if agg else f"SELECT {column}"
    text += f" FROM {table_id}"
    conds = [
        f"{header[col]} {COND_OPS[op]} {render_value(value)}"
        for col, op, value in sql["conds"]
    ]
    if conds:
        text += " WHERE " + " AND ".join(conds)
    return text


def render(query, table):
    """One WikiSQL question and its table as the text of one example."""
    header = table["header"]
    return (
        f"table: {query['table_id']}\n"
        f"columns: {', '.join(header)}\n"
        f"Q: {query['question']}\n"
        f"A: {render_sql(query['sql'], query['table_id'], header)}"
    )


def convert(queries, tables, num, seed=None):
    """Texts of `num` questions: the first ones, or a seeded random sample.

    `queries` are WikiSQL question records, `tables` maps table id to table.
    """
    queries = list(queries)
    num = min(num, len(queries))
    if seed is not None:
        queries = random.Random(seed).sample(queries, num)
    return [render(q, tables[q["table_id"]]) for q in queries[:num]]


def read_jsonl(text):
    # Not splitlines(): it also breaks at U+2028, which JSON strings may hold raw.
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def read_release(source):
    """Map file name (e.g. "dev.tables.jsonl") to its text.

    `source` is data.tar.bz2 (a path or its bytes) or a folder extracted from
    it, either the one holding data/ or data/ itself.
    """
    wanted = {f"{s}{kind}.jsonl" for s in SPLITS.values() for kind in ("", ".tables")}
    if isinstance(source, Path) and source.is_dir():
        folder = source / "data" if (source / "data").is_dir() else source
        return {n: (folder / n).read_text(encoding="utf-8") for n in wanted}
    files = {}
    tar = tarfile.open(fileobj=io.BytesIO(source)) if isinstance(source, bytes) else tarfile.open(source)
    # One pass over the members: random access into a .bz2 re-decompresses.
    with tar:
        for member in tar:
            name = Path(member.name).name
            if name in wanted and member.isfile():
                files[name] = tar.extractfile(member).read().decode("utf-8")
    missing = sorted(wanted - files.keys())
    if missing:
        raise FileNotFoundError(f"not in the archive: {', '.join(missing)}")
    return files


def download(url=URL):
    print(f"Downloading {url}", file=sys.stderr)
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def count(text):
    """argparse's type for a number of examples (this script needs only the standard library, not utils')."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer of at least 1, not {text!r}")
    return int(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Make WikiSQL jsonl files for lora.py.")
    parser.add_argument("--out", default="data/wikisql", help="output folder")
    parser.add_argument("--source", type=Path, help="downloaded data.tar.bz2 or its extracted folder")
    parser.add_argument("--num-train", type=count, default=1000)
    parser.add_argument("--num-valid", type=count, default=100)
    parser.add_argument("--num-test", type=count, default=100)
    parser.add_argument("--seed", type=int, help="sample questions at random instead of taking the first ones")
    args = parser.parse_args(argv)

    try:
        files = read_release(args.source or download())
    except (OSError, EOFError, tarfile.TarError) as e:
        # No network (URLError is an OSError), a bad path, a bad or cut-off archive.
        how = f"reading {args.source}" if args.source else f"downloading {URL}"
        sys.exit(f"error: {how} failed: {getattr(e, 'reason', e)}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {"train": args.num_train, "valid": args.num_valid, "test": args.num_test}
    for name, split in SPLITS.items():
        tables = {t["id"]: t for t in read_jsonl(files[f"{split}.tables.jsonl"])}
        texts = convert(read_jsonl(files[f"{split}.jsonl"]), tables, sizes[name], args.seed)
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
        print(f"Wrote {len(texts)} examples to {out / name}.jsonl", file=sys.stderr)


if __name__ == "__main__":
    main()
