"""Reward functions for `lora.py --train-mode grpo --reward-functions rewards.py:NAME[,NAME...]`.

Each is called as TRL's GRPOTrainer calls a reward function: with the prompts, the completions (texts, or for a
chat prompt one assistant message each) and their token ids, and every other column of the data by its name, a
list a completion; it returns one reward a completion (None: not scored). Copy one to a file of your own to change
it.
"""
import re

# What a completion's answer follows, if it says it: "... so the query is: Answer: SELECT ..."
ANSWER_MARKER = "Answer:"

# A WikiSQL query, as data/grpo's answers are written: SELECT [MAX|MIN|COUNT|SUM|AVG ]a column FROM the table[ WHERE
# a column = < or > a value[ AND ...]]
SQL = re.compile(r"SELECT .+ FROM \S+(?: WHERE .+ [=<>] .+)?")


def completion_text(completion) -> str:
    """A completion's text: itself, or a chat's assistant message's content."""
    return completion if isinstance(completion, str) else completion[0]["content"]


def answer_of(completion) -> str:
    """The first line of what follows the last ANSWER_MARKER of a completion (of all of it where there is none),
    stripped: a model that goes on after its answer (a base model writes the next question) has still given it."""
    after = completion_text(completion).rpartition(ANSWER_MARKER)[2].strip()
    return after.split("\n", 1)[0].strip()


def exact_answer(completions, answer, **columns):
    """1 for a completion whose answer (answer_of) is the example's `answer` column exactly, else 0."""
    return [float(answer_of(completion) == str(expected).strip()) for completion, expected in zip(completions, answer)]


def sql_format(completions, **columns):
    """1 for a completion whose answer is shaped as a WikiSQL query (the SQL expression), else 0: a partial
    reward that a model gets before it gets the answer right."""
    return [float(SQL.fullmatch(answer_of(completion)) is not None) for completion in completions]
