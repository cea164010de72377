"""Offline demo problems: short multi-step arithmetic word problems with exact integer answers.

Used by the CPU demo (a tiny model trained on them) and by tests that must not download
anything. Every problem also carries its structure: a start value and the list of operations
applied to it in order, so a checker can recompute the answer without reading the text.

    make_demo_problems(3, seed=0)[0] ->
    {"id": "demo-0-0", "question": "...", "answer": "17", "answer_value": 17,
     "start": 5, "ops": [["add", 4], ["mul", 2], ["sub", 1]], "template": "...",
     "solution": "5 + 4 = 9.\n9 * 2 = 18.\n18 - 1 = 17.\nThe answer is \\boxed{17}."}

The ``solution`` is a step-by-step reference (one line per operation, then the boxed answer): the
CPU demo warm-starts its tiny model on it, and the CVAE stage trains on its step prefixes.
"""

from __future__ import annotations

import random
import re

NAMES = ["Ava", "Ben", "Cara", "Dan", "Eli", "Fay", "Gus", "Ivy", "Jon", "Kim", "Leo", "Mia"]
ITEMS = ["apples", "pencils", "marbles", "stickers", "cards", "shells", "coins", "books"]

# Operations the structured `ops` field may contain, as the word a checker must implement.
OPERATIONS = ("add", "sub", "mul", "div")


def _gain_loss(rng: random.Random) -> tuple[str, int, list]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(3, 20), rng.randint(2, 15)
    c = rng.randint(1, a + b)
    text = f"{name} has {a} {item}. {name} buys {b} more and then gives away {c}. How many {item} does {name} have now?"
    return text, a, [["add", b], ["sub", c]]


def _boxes(rng: random.Random) -> tuple[str, int, list]:
    item = rng.choice(ITEMS)
    a, b = rng.randint(2, 12), rng.randint(2, 9)
    c = rng.randint(1, a * b)
    text = f"There are {b} boxes with {a} {item} in each box. Then {c} {item} are lost. How many {item} are left?"
    return text, a, [["mul", b], ["sub", c]]


def _reading(rng: random.Random) -> tuple[str, int, list]:
    name = rng.choice(NAMES)
    a, b, c = rng.randint(2, 15), rng.randint(2, 7), rng.randint(1, 20)
    text = (
        f"{name} reads {a} pages every day for {b} days and then reads {c} more pages. "
        f"How many pages does {name} read in total?"
    )
    return text, a, [["mul", b], ["add", c]]


def _sharing(rng: random.Random) -> tuple[str, int, list]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    b, per_friend, c = rng.randint(2, 6), rng.randint(1, 8), rng.randint(1, 5)
    a = b * per_friend  # a multiple of b, so the division is exact
    text = (
        f"{name} has {a} {item} and shares them equally among {b} friends. "
        f"Each friend then finds {c} more. How many {item} does each friend have?"
    )
    return text, a, [["div", b], ["add", c]]


def _savings(rng: random.Random) -> tuple[str, int, list]:
    name = rng.choice(NAMES)
    a, b, d = rng.randint(2, 10), rng.randint(2, 6), rng.randint(2, 4)
    # spend c >= 1 so that the rest, d * per_jar, splits evenly into d jars (a * b >= 4 >= d)
    max_per_jar = (a * b - 1) // d
    per_jar = rng.randint(1, max_per_jar) if max_per_jar >= 1 else a * b // d
    c = a * b - d * per_jar
    text = (
        f"{name} saves {a} dollars each week for {b} weeks, spends {c} dollars on a gift, "
        f"and splits the rest equally into {d} jars. How many dollars go into each jar?"
    )
    return text, a, [["mul", b], ["sub", c], ["div", d]]


def _garden(rng: random.Random) -> tuple[str, int, list]:
    name = rng.choice(NAMES)
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 6)
    text = (
        f"A garden has {a} rows with {b} flowers in each row. {name} plants {c} more rows "
        f"with {b} flowers each. How many flowers are in the garden now?"
    )
    return text, a, [["add", c], ["mul", b]]


def _bus(rng: random.Random) -> tuple[str, int, list]:
    a = rng.randint(5, 25)
    b = rng.randint(1, a)
    c = rng.randint(1, 10)
    text = (
        f"A bus starts with {a} passengers. At the first stop {b} people get off and {c} get on. "
        f"At the second stop the number of passengers doubles. How many passengers are on the bus now?"
    )
    return text, a, [["sub", b], ["add", c], ["mul", 2]]


TEMPLATES = {
    "gain_loss": _gain_loss,
    "boxes": _boxes,
    "reading": _reading,
    "sharing": _sharing,
    "savings": _savings,
    "garden": _garden,
    "bus": _bus,
}


OP_SYMBOLS = {"add": "+", "sub": "-", "mul": "*", "div": "/"}

# The wrong operator a misreading of the last step's wording puts in place of the right one ("gives away"
# read as a gain, "doubles" as "+ 2", "equally into" as a product); never a division, so it stays exact.
MISREAD_OPERATION = {"add": "sub", "sub": "add", "mul": "add", "div": "mul"}


def solution_text(start: int, ops: list, answer: int) -> str:
    """The step-by-step reference solution: ``a op b = c.`` per operation, then the boxed answer."""
    lines, value = [], start
    for op, operand in ops:
        result = _apply(value, op, operand)
        lines.append(f"{value} {OP_SYMBOLS[op]} {operand} = {result}.")
        value = result
    if value != answer:
        raise AssertionError(f"solution steps end at {value}, not at the answer {answer}")
    lines.append(f"The answer is \\boxed{{{answer}}}.")
    return "\n".join(lines)


_SYMBOL_OPS = {v: k for k, v in OP_SYMBOLS.items()}
# one line of ``solution_text``: "a op b = c." steps, then the boxed answer (numbers of at most 9 digits,
# so that untrusted model output can never make int() fail)
_STEP_LINE = re.compile(r"(\d{1,9}) ([-+*/]) (\d{1,9}) = (\d{1,9})\.")
_BOXED_LINE = re.compile(r"The answer is \\boxed\{(\d{1,9})\}\.")


def solution_steps(solution: str) -> tuple[int, list]:
    """(start, ops) of a ``solution_text`` string: the inverse of ``solution_text``, which precise errors
    for text in any other shape (e.g. a solution from another dataset)."""
    lines = solution.strip().split("\n")
    start, ops, value = None, [], None
    for line in lines[:-1]:
        match = _STEP_LINE.fullmatch(line)
        if match is None:
            raise ValueError(f"not a demo solution step: {line!r}")
        a, symbol, b, c = int(match[1]), match[2], int(match[3]), int(match[4])
        if value is not None and a != value:
            raise ValueError(f"demo solution step {line!r} does not continue from {value}")
        start = a if start is None else start
        ops.append([_SYMBOL_OPS[symbol], b])
        value = c
    if start is None or not _BOXED_LINE.fullmatch(lines[-1]):
        raise ValueError(f"not a demo solution: {solution!r}")
    return start, ops


def misread_solution(start: int, ops: list) -> tuple[str, int]:
    """A fluent but wrong solution: every step as in ``solution_text`` except the last, whose operator is
    misread (``MISREAD_OPERATION``, else the first of +, -, * that is not the right one, stays >= 0 and
    changes the result). Returns (text, the wrong answer it boxes), which always differs from the right one.

    The CPU demo's warm start learns from a mix of right and misread solutions, so it can solve a problem
    but does not prefer the right reading: the state in which RL turns pass@k into pass@1."""
    value = start
    for op, operand in ops[:-1]:
        value = _apply(value, op, operand)
    last_op, operand = ops[-1]
    right = _apply(value, last_op, operand)
    for wrong_op in (MISREAD_OPERATION[last_op], "add", "sub", "mul"):
        if wrong_op == last_op or (wrong_op == "sub" and operand > value):
            continue
        wrong = _apply(value, wrong_op, operand)
        if wrong != right:
            return solution_text(start, [*ops[:-1], [wrong_op, operand]], wrong), wrong
    raise AssertionError(f"no misreading of {ops[-1]} at {value} changes the answer")  # operands are >= 1


# What a sampled solution did: the kinds ``classify_solution`` returns.
SOLUTION_KINDS = ("right", "misread", "arithmetic_slip", "other")


def classify_solution(text: str, start: int, ops: list) -> str:
    """Which of ``SOLUTION_KINDS`` a sampled solution of the problem ``(start, ops)`` is:

    - ``"arithmetic_slip"``: in ``solution_text``'s shape, and some step's stated result is not the result
      of its own operands and operator (whatever else is wrong);
    - ``"right"``: every step is the problem's (its operator and operand, continuing from the previous
      result) with right arithmetic, and the boxed answer is the last result;
    - ``"misread"``: as ``"right"`` except that the last step's operator is another one (what the misread
      warm start learned half of the time, ``misread_solution``);
    - ``"other"``: anything else (not in that shape, another number of steps, a wrong operand, a step that
      does not continue from the previous result, a boxed answer that is not the last result).

    Model output is untrusted text: it is only matched against a pattern, never evaluated."""
    lines = text.strip().split("\n")
    steps = []
    for line in lines[:-1]:
        match = _STEP_LINE.fullmatch(line)
        if match is None:
            return "other"
        steps.append((int(match[1]), _SYMBOL_OPS[match[2]], int(match[3]), int(match[4])))
    boxed = _BOXED_LINE.fullmatch(lines[-1])
    if boxed is None or len(steps) != len(ops):
        return "other"
    for a, op, b, c in steps:
        exact = op != "div" or (b != 0 and a % b == 0)
        if not exact or _apply(a, op, b) != c:
            return "arithmetic_slip"
    value = start
    for i, ((a, op, b, c), (right_op, operand)) in enumerate(zip(steps, ops)):
        last = i == len(ops) - 1
        if a != value or b != operand or (op != right_op and not last):
            return "other"
        value = c
    if int(boxed[1]) != value:
        return "other"
    return "right" if steps[-1][1] == ops[-1][0] else "misread"


def _apply(value: int, op: str, operand: int) -> int:
    if op == "add":
        return value + operand
    if op == "sub":
        return value - operand
    if op == "mul":
        return value * operand
    if op == "div":
        if value % operand:
            raise AssertionError(f"demo generator produced an inexact division {value}/{operand}")
        return value // operand
    raise AssertionError(f"unknown demo operation {op!r}")


# Draws of one template's numbers before ``max_value`` is declared unreachable; at the strictest
# allowed bound (12) the worst of 2,000 problems per template needed 402 draws ("reading").
MAX_DRAWS = 10_000


def problem_values(start: int, ops: list) -> list[int]:
    """Every number a problem's solution writes: the start, each operand and each intermediate result."""
    values, value = [start], start
    for op, operand in ops:
        value = _apply(value, op, operand)
        values += [operand, value]
    return values


def make_demo_problems(n: int, seed: int = 0, max_value: int | None = None) -> list[dict]:
    """``n`` problems, identical for the same ``(n, seed, max_value)``; the first k of n equal those of k.

    ``max_value`` bounds every number the solution writes (``problem_values``): each template's numbers
    are redrawn until they fit, so the template mix stays uniform. ``None`` keeps the full ranges. A tiny
    model learns arithmetic on small numbers from a few thousand examples, which is what the CPU demo
    needs (README, "Does it learn?")."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if max_value is not None and max_value < 12:
        raise ValueError(f"max_value must be >= 12 (every template's smallest problem fits), got {max_value}")
    rng = random.Random(seed)
    names = sorted(TEMPLATES)
    problems = []
    for i in range(n):
        template = rng.choice(names)
        for _ in range(MAX_DRAWS):
            text, start, ops = TEMPLATES[template](rng)
            values = problem_values(start, ops)
            if max_value is None or max(values) <= max_value:
                break
        else:
            raise AssertionError(f"demo template {template}: no problem within max_value={max_value} "
                                 f"in {MAX_DRAWS} draws")
        value = values[-1]
        if value < 0:
            raise AssertionError(f"demo template {template} produced a negative answer {value}")
        problems.append(
            {
                "id": f"demo-{seed}-{i}",
                "question": text,
                "answer": str(value),
                "answer_value": value,
                "start": start,
                "ops": ops,
                "template": template,
                "solution": solution_text(start, ops, value),
            }
        )
    return problems
