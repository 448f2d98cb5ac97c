"""Write the example train/valid/test.jsonl: invented tables, WikiSQL-style questions.

Questions are drawn as WikiSQL logical forms over the invented tables below and
rendered by wikisql.py, so the text matches the WikiSQL data exactly in shape.
It also writes preference/{train,valid,test}.jsonl for DPO/ORPO/SimPO/CPO: some of the same
questions, each with its SQL as "chosen" and a wrong SQL as "rejected"; and kto/ for KTO, the same
pairs unpaired: each question with its SQL (label true) and with the wrong one (label false).

    python data/make_example_data.py
"""

import json
import random
from pathlib import Path

from wikisql import render, render_sql

TABLES = [
    ("1-7100101-1", ["Club", "City", "Played", "Wins", "Losses", "Points"], [
        ["Harbor Rovers", "Port Elin", 30, 18, 5, 61],
        ["Kestrel United", "Amberford", 30, 15, 9, 51],
        ["Millbrook Athletic", "Millbrook", 30, 12, 10, 44],
        ["Northgate FC", "Amberford", 30, 11, 13, 39],
        ["Saltmarsh Town", "Port Elin", 30, 9, 14, 34],
        ["Riverside Wanderers", "Coldwater", 30, 6, 19, 23],
    ]),
    ("1-7100205-2", ["Peak", "Range", "Country", "Height (m)", "First ascent"], [
        ["Mount Varra", "Greyspine", "Norland", 4210, 1921],
        ["Tessel Horn", "Greyspine", "Norland", 3980, 1934],
        ["Calder Peak", "Sunward Hills", "Ostria", 2875, 1899],
        ["White Maiden", "Sunward Hills", "Ostria", 3102, 1910],
        ["Iron Crown", "Frostreach", "Valdemar", 4608, 1956],
        ["Lonely Tooth", "Frostreach", "Valdemar", 3770, 1948],
    ]),
    ("1-7100340-1", ["Title", "Author", "Genre", "Pages", "Year"], [
        ["The Glass Orchard", "Mira Hollis", "Mystery", 312, 2004],
        ["Salt and Ember", "Jonah Pell", "Fantasy", 488, 2011],
        ["A Quiet Harbor", "Mira Hollis", "Drama", 256, 2009],
        ["Clockwork Winter", "Ada Renwick", "Science fiction", 401, 2015],
        ["The Last Lantern", "Jonah Pell", "Fantasy", 523, 2018],
        ["Paper Comets", "Ada Renwick", "Science fiction", 290, 2020],
    ]),
    ("1-7100412-3", ["Station", "Line", "Zone", "Platforms", "Opened"], [
        ["Central Square", "Red", 1, 6, 1898],
        ["Elm Park", "Red", 2, 2, 1912],
        ["Foundry Road", "Blue", 2, 4, 1925],
        ["Lakeside", "Blue", 3, 2, 1961],
        ["Old Mill", "Green", 3, 3, 1974],
        ["Airport Terminal", "Green", 4, 4, 2003],
    ]),
    ("1-7100577-1", ["Item", "Category", "Calories", "Price (cents)", "Vegan"], [
        ["Rye loaf", "Bread", 240, 450, "Yes"],
        ["Butter croissant", "Pastry", 310, 275, "No"],
        ["Apple turnover", "Pastry", 280, 300, "No"],
        ["Seeded roll", "Bread", 180, 120, "Yes"],
        ["Carrot cake", "Cake", 420, 395, "No"],
        ["Lemon drizzle", "Cake", 360, 350, "Yes"],
    ]),
    ("1-7100690-2", ["Rank", "Runner", "Nation", "Bib", "Time"], [
        [1, "Tomas Brevik", "Norland", 101, "2:08:14"],
        [2, "Ines Calloway", "Ostria", 215, "2:09:02"],
        [3, "Yusuf Amari", "Valdemar", 87, "2:09:40"],
        [4, "Lena Marsh", "Norland", 342, "2:11:19"],
        [5, "Pavel Roan", "Ostria", 56, "2:12:05"],
        [6, "Sara Quint", "Valdemar", 190, "2:13:48"],
    ]),
    ("1-7100734-1", ["No.", "Title", "Directed by", "Written by", "Viewers (millions)"], [
        [1, "Pilot", "Nora Vale", "Sam Okafor", 7],
        [2, "The Long Night", "Nora Vale", "Rita Feld", 6],
        [3, "Cold Open", "Ike Brandt", "Sam Okafor", 5],
        [4, "Ghost Signal", "Ike Brandt", "Rita Feld", 6],
        [5, "Homecoming", "Nora Vale", "Leo Strand", 8],
        [6, "Static", "Mae Corrin", "Leo Strand", 4],
    ]),
    ("1-7100862-1", ["Planet", "Moons", "Diameter (km)", "Orbit (days)", "Discovered by"], [
        ["Aster", 0, 4870, 88, "Halden"],
        ["Brisa", 2, 12100, 225, "Halden"],
        ["Corvel", 1, 6790, 410, "Okonjo"],
        ["Dune Major", 14, 98200, 4330, "Okonjo"],
        ["Eskar", 5, 51100, 10750, "Varga"],
        ["Fenn", 3, 49500, 30700, "Varga"],
    ]),
]

PREFIXES = {  # by WikiSQL aggregation index
    0: ["What is the {} when", "Name the {} when", "Tell me the {} if", "Which {} is listed when"],
    1: ["What is the highest {} when", "Name the most {} when"],
    2: ["What is the lowest {} when", "Name the smallest {} when"],
    3: ["How many {} are there when", "What is the total number of {} when", "Count the {} where"],
}
CONDITIONS = {0: "the {} is {}", 1: "the {} is more than {}", 2: "the {} is less than {}"}


def example(rng, table_id, header, rows):
    """One question over the table, drawn as a WikiSQL query record."""
    row = rng.choice(rows)
    numeric = [isinstance(v, int) for v in row]
    sel = rng.randrange(len(header))
    agg = rng.choice([0, 0, 0, 3, 1, 2] if numeric[sel] else [0, 0, 0, 3])
    others = [c for c in range(len(header)) if c != sel]
    conds = [[c, 0, row[c]] for c in rng.sample(others, rng.choice([1, 1, 1, 2]))]
    if numeric[conds[0][0]] and rng.random() < 0.3:
        conds[0][1] = rng.choice([1, 2])
    prefix = rng.choice(PREFIXES[agg])
    question = prefix.format(header[sel].lower()) + " " + " and ".join(
        CONDITIONS[op].format(header[c].lower(), v) for c, op, v in conds)
    question += "?" if prefix.startswith(("What", "Which", "How")) else ""
    return {"table_id": table_id, "question": question, "sql": {"sel": sel, "agg": agg, "conds": conds}}


def corrupt(rng, sql, rows):
    """A plausible but wrong form of `sql`: one mistake, its kind drawn at random.

    Each kind changes what the SQL renders to, so the rejected answer never equals the chosen one.
    """
    numeric = [isinstance(v, int) for v in rows[0]]
    sel, agg, conds = sql["sel"], sql["agg"], [list(c) for c in sql["conds"]]
    kind = rng.choice(["select", "aggregate", "condition"] + ["drop"] * (len(conds) > 1))
    if kind == "select":
        # Not a condition's column: `SELECT Year ... WHERE Year = 2009` is wrong in too obvious a way.
        taken = {sel} | {col for col, _, _ in conds}
        sel = rng.choice([c for c in range(len(numeric)) if c not in taken])
    elif kind == "aggregate":
        agg = rng.choice([a for a in ([0, 1, 2, 3] if numeric[sel] else [0, 3]) if a != agg])
    elif kind == "condition":
        cond = rng.choice(conds)
        col, op, value = cond
        # Comparing text with > or < is not plausible, so text columns only get a wrong value.
        ops = [(o, value) for o in (0, 1, 2) if o != op] if numeric[col] else []
        values = [(op, v) for v in sorted({row[col] for row in rows} - {value}, key=str)]
        cond[1:] = rng.choice(ops + values)
    else:
        conds.pop(rng.randrange(len(conds)))
    return {"sel": sel, "agg": agg, "conds": conds}


def write(path, records):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def preference(rng, text, query, table):
    """The SFT example `text` split after "A: " into prompt and chosen, with a wrong SQL as rejected."""
    table_id, header, rows = table
    chosen = render_sql(query["sql"], table_id, header)
    rejected = render_sql(corrupt(rng, query["sql"], rows), table_id, header)
    assert text.endswith("A: " + chosen) and rejected != chosen
    return {"prompt": text[:-len(chosen)], "chosen": chosen, "rejected": rejected}


def question(text):
    """The SFT example `text` as a GRPO prompt that asks for the SQL (up to "A:"), and the SQL as its answer."""
    prompt, _, answer = text.rpartition("\nA: ")
    return {"prompt": prompt + "\nA:", "answer": answer}


def main():
    rng = random.Random(0)
    examples = {}  # text -> (query, table); a dict keeps first-seen order and drops repeats
    while len(examples) < 500:
        table = rng.choice(TABLES)
        query = example(rng, *table)
        examples.setdefault(render(query, {"header": table[1]}), (query, table))
    texts = list(examples)
    splits = {"train": texts[:400], "valid": texts[400:450], "test": texts[450:]}
    folder = Path(__file__).parent
    for name, lines in splits.items():
        write(folder / f"{name}.jsonl", ({"text": t} for t in lines))

    # The preference pairs reuse each SFT split's first questions, so valid and test stay unseen in training.
    # Their own generator leaves the SFT draws, and so the SFT files, as they were.
    rng = random.Random(1)
    sizes = {"train": 300, "valid": 40, "test": 40}
    (folder / "preference").mkdir(exist_ok=True)
    (folder / "kto").mkdir(exist_ok=True)
    shuffle = random.Random(2).shuffle  # so that a batch mixes labels and questions
    for name, lines in splits.items():
        pairs = [preference(rng, t, *examples[t]) for t in lines[:sizes[name]]]
        write(folder / "preference" / f"{name}.jsonl", pairs)
        unpaired = [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"}
                    for p in pairs for k in ("chosen", "rejected")]
        shuffle(unpaired)
        write(folder / "kto" / f"{name}.jsonl", unpaired)

    # GRPO's prompts: questions of each SFT split, whose SQL the reward functions check (rewards.py)
    (folder / "grpo").mkdir(exist_ok=True)
    sizes = {"train": 200, "valid": 20, "test": 20}
    for name, lines in splits.items():
        write(folder / "grpo" / f"{name}.jsonl", (question(t) for t in lines[:sizes[name]]))


if __name__ == "__main__":
    main()
