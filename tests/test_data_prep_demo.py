"""The offline demo generator and the prompt template."""

import re
from collections import Counter

import pyarrow.parquet as pq
import pytest

from data_prep.demo import make_demo_problems
from data_prep.prepare import main
from data_prep.prompt_template import DEFAULT_PROMPT_TEMPLATE, build_chat_prompt, format_prompt, validate_template

# the checker's own arithmetic, independent of the generator's code path
CHECK_OPS = {
    "add": lambda x, y: x + y,
    "sub": lambda x, y: x - y,
    "mul": lambda x, y: x * y,
    "div": lambda x, y: x / y,  # true division: an inexact step would show as a non-integer
}


def test_demo_is_deterministic_under_seed():
    assert make_demo_problems(50, seed=3) == make_demo_problems(50, seed=3)
    assert make_demo_problems(50, seed=3) != make_demo_problems(50, seed=4)
    assert make_demo_problems(10, seed=3) == make_demo_problems(50, seed=3)[:10]
    assert make_demo_problems(0, seed=1) == []
    with pytest.raises(ValueError):
        make_demo_problems(-1)


def test_demo_answers_are_correct_integers():
    problems = make_demo_problems(400, seed=7)
    for p in problems:
        value = p["start"]
        for op, operand in p["ops"]:
            value = CHECK_OPS[op](value, operand)
        assert float(value).is_integer() and value >= 0, p
        assert p["answer"] == str(int(value)) and p["answer_value"] == int(value)
        # every operand (and the start) is stated in the text, and the problem is multi-step
        numbers = [int(n) for n in re.findall(r"\d+", p["question"])]
        stated = [p["start"]] + [x for op, x in p["ops"] if not (op == "mul" and x == 2 and "doubles" in p["question"])]
        assert all(x in numbers for x in stated), p
        assert len(p["ops"]) >= 2
        assert len(p["question"].split()) < 45  # short: the CPU demo trains a tiny model on them
    templates = Counter(p["template"] for p in problems)
    assert len(templates) >= 6 and min(templates.values()) > 20  # varied
    assert len({p["question"] for p in problems}) > 390  # few accidental duplicates


def test_max_value_bounds_every_number_the_solution_writes():
    problems = make_demo_problems(700, seed=7, max_value=20)
    for p in problems:
        # recomputed with the checker's own arithmetic: the start, each operand and each result
        values, value = [p["start"]], p["start"]
        for op, operand in p["ops"]:
            value = CHECK_OPS[op](value, operand)
            values += [operand, value]
        assert max(values) <= 20 and float(value).is_integer() and value >= 0, p
        assert p["answer"] == str(int(value))
        assert all(int(n) <= 20 for n in re.findall(r"\d+", p["solution"])), p
    # every template still drawn about equally often (1/7 of 700 = 100 each)
    templates = Counter(p["template"] for p in problems)
    assert len(templates) == 7 and min(templates.values()) > 60, templates
    # without the bound some problems go well beyond it (what the bound changes)
    assert max(max(int(n) for n in re.findall(r"\d+", p["solution"])) for p in make_demo_problems(700, seed=7)) > 60
    assert make_demo_problems(50, seed=7, max_value=None) == make_demo_problems(50, seed=7)
    assert make_demo_problems(30, seed=7, max_value=20) == problems[:30]
    with pytest.raises(ValueError, match="max_value"):
        make_demo_problems(5, max_value=11)


def test_demo_dataset_cli_max_value(tmp_path):
    assert main(["--dataset", "demo", "--num-problems", "60", "--seed", "5", "--val-size", "8", "--max-value", "15",
                 "--out", str(tmp_path)]) == 0
    rows = pq.read_table(tmp_path / "demo_train.parquet").to_pylist() + pq.read_table(tmp_path / "demo_val.parquet").to_pylist()
    expected = {p["question"]: p["answer"] for p in make_demo_problems(60, seed=5, max_value=15)}
    assert {r["extra_info"]["question"]: r["reward_model"]["ground_truth"] for r in rows} == expected
    assert all(int(n) <= 15 for r in rows for n in re.findall(r"\d+", r["extra_info"]["solution"]))


def test_demo_dataset_cli(tmp_path):
    assert (
        main(["--dataset", "demo", "--num-problems", "40", "--seed", "5", "--val-size", "8", "--out", str(tmp_path)])
        == 0
    )
    train = pq.read_table(tmp_path / "demo_train.parquet").to_pylist()
    val = pq.read_table(tmp_path / "demo_val.parquet").to_pylist()
    expected = {p["question"]: p["answer"] for p in make_demo_problems(40, seed=5)}
    assert len(val) == 8 and len(train) + len(val) == len(expected)
    for row in train + val:
        assert row["data_source"] == "demo_arith"
        assert expected[row["extra_info"]["question"]] == row["reward_model"]["ground_truth"]


def test_template_validation_and_formatting():
    assert (
        format_prompt("What is 1+1?")
        == "What is 1+1?\nPlease reason step by step, and put your final answer within \\boxed{}."
    )
    assert build_chat_prompt("Q?", "Problem: {question} Answer in \\boxed{}.") == [
        {"role": "user", "content": "Problem: Q? Answer in \\boxed{}."}
    ]
    # braces elsewhere in the template are literal (no str.format)
    assert format_prompt("x", "{question} {x} {}") == "x {x} {}"
    assert validate_template(DEFAULT_PROMPT_TEMPLATE) == DEFAULT_PROMPT_TEMPLATE
    for bad in ("no field here", "{problem}\nSolve.", "{ question }", ""):
        with pytest.raises(ValueError, match=r"must contain the field '\{question\}'"):
            validate_template(bad)
    with pytest.raises(ValueError, match="non-empty"):
        format_prompt("   ")


def test_cli_rejects_template_without_field(tmp_path, capsys):
    assert (
        main(
            [
                "--dataset",
                "demo",
                "--num-problems",
                "4",
                "--out",
                str(tmp_path),
                "--prompt-template",
                "Solve: {problem}",
            ]
        )
        == 2
    )
    assert "must contain the field '{question}'" in capsys.readouterr().err
    template_file = tmp_path / "t.txt"
    template_file.write_text("Q: {question}\nA:\n")
    assert (
        main(
            [
                "--dataset",
                "demo",
                "--num-problems",
                "4",
                "--out",
                str(tmp_path),
                "--prompt-template-file",
                str(template_file),
            ]
        )
        == 0
    )
    row = pq.read_table(tmp_path / "demo_train.parquet").to_pylist()[0]
    assert row["prompt"][0]["content"] == f"Q: {row['extra_info']['question']}\nA:"


def test_demo_solutions_are_correct_step_by_step():
    """Each solution line is one operation of the problem, its arithmetic is right, and the last
    line boxes the answer (the CPU demo's warm start and the CVAE stage train on these)."""
    symbols = {"+": "add", "-": "sub", "*": "mul", "/": "div"}
    for p in make_demo_problems(300, seed=11):
        lines = p["solution"].split("\n")
        assert len(lines) == len(p["ops"]) + 1, p
        value = p["start"]
        for line, (op, operand) in zip(lines, p["ops"]):
            m = re.fullmatch(r"(\d+) ([-+*/]) (\d+) = (\d+)\.", line)
            assert m, line
            a, sym, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            assert (a, symbols[sym], b) == (value, op, operand)
            value = int(CHECK_OPS[op](value, operand))
            assert c == value
        assert lines[-1] == f"The answer is \\boxed{{{p['answer']}}}."


def test_demo_parquet_carries_the_solution(tmp_path):
    assert main(["--dataset", "demo", "--num-problems", "12", "--seed", "2", "--out", str(tmp_path)]) == 0
    rows = pq.read_table(tmp_path / "demo_train.parquet").to_pylist()
    expected = {p["question"]: p["solution"] for p in make_demo_problems(12, seed=2)}
    assert rows and all(r["extra_info"]["solution"] == expected[r["extra_info"]["question"]] for r in rows)


def test_solution_steps_inverts_solution_text_and_refuses_other_text():
    from data_prep.demo import solution_steps

    for p in make_demo_problems(200, seed=2):
        assert solution_steps(p["solution"]) == (p["start"], p["ops"])
    for bad in ("5 + 4 = 9.\nThe answer is 9.", "5 + 4 = 10.\n9 * 2 = 18.\nThe answer is \\boxed{18}.", "no steps"):
        with pytest.raises(ValueError):
            solution_steps(bad)


def test_misread_solution_changes_only_the_last_operator_and_the_answer():
    from data_prep.demo import misread_solution, solution_steps

    for p in make_demo_problems(400, seed=3):
        text, wrong = misread_solution(p["start"], p["ops"])
        start, ops = solution_steps(text)  # still a well-formed solution whose steps are exact arithmetic
        assert start == p["start"] and ops[:-1] == p["ops"][:-1]
        assert ops[-1][1] == p["ops"][-1][1] and ops[-1][0] != p["ops"][-1][0]
        assert wrong != p["answer_value"] and wrong >= 0 and text.endswith(f"\\boxed{{{wrong}}}.")


def test_warm_start_misreads_the_configured_share():
    from recipe.iib_lpo.demo.warmstart import sft_solutions

    rows = [{"solution": p["solution"]} for p in make_demo_problems(2000, seed=4)]
    assert sft_solutions(rows, 0.0, seed=0) == [r["solution"] for r in rows]
    mixed = sft_solutions(rows, 0.5, seed=0)
    share = sum(a != r["solution"] for a, r in zip(mixed, rows)) / len(rows)
    assert 0.45 < share < 0.55  # 2000 seeded draws: s.e. 0.011
    assert mixed == sft_solutions(rows, 0.5, seed=0) and mixed != sft_solutions(rows, 0.5, seed=1)
    with pytest.raises(ValueError):
        sft_solutions(rows, 1.0, seed=0)


def test_classify_solution_known_cases():
    from data_prep.demo import classify_solution, misread_solution

    ops = [["add", 4], ["mul", 2], ["sub", 1]]  # 5 + 4 = 9, 9 * 2 = 18, 18 - 1 = 17
    cases = {
        "5 + 4 = 9.\n9 * 2 = 18.\n18 - 1 = 17.\nThe answer is \\boxed{17}.": "right",
        "5 + 4 = 9.\n9 * 2 = 18.\n18 + 1 = 19.\nThe answer is \\boxed{19}.": "misread",
        "5 + 4 = 9.\n9 * 2 = 18.\n18 - 1 = 18.\nThe answer is \\boxed{18}.": "arithmetic_slip",  # last step
        "5 + 4 = 9.\n9 * 2 = 19.\n19 - 1 = 18.\nThe answer is \\boxed{18}.": "arithmetic_slip",  # earlier step
        "5 + 4 = 9.\n9 + 2 = 11.\n11 - 1 = 10.\nThe answer is \\boxed{10}.": "other",  # a middle step misread
        "5 + 4 = 9.\n9 * 3 = 27.\n27 - 1 = 26.\nThe answer is \\boxed{26}.": "other",  # wrong operand
        "5 + 4 = 9.\n8 * 2 = 16.\n16 - 1 = 15.\nThe answer is \\boxed{15}.": "other",  # does not continue
        "5 + 4 = 9.\n9 * 2 = 18.\n18 - 1 = 17.\nThe answer is \\boxed{18}.": "other",  # boxed is not the result
        "5 + 4 = 9.\n9 * 2 = 18.\nThe answer is \\boxed{18}.": "other",  # a step missing
        "5 + 4 = 9.\n9 * 2 = 18.\n18 - 1 = 17.": "other",  # no boxed answer
        "__import__('os').system('true')": "other",  # untrusted text is matched, never run
        "": "other",
    }
    for text, kind in cases.items():
        assert classify_solution(text, 5, ops) == kind, text
    assert classify_solution("6 / 4 = 1.\n1 + 1 = 2.\nThe answer is \\boxed{2}.", 6, [["div", 4], ["add", 1]]) \
        == "arithmetic_slip"  # an inexact division is a slip, not floor division
    for p in make_demo_problems(200, seed=9, max_value=20):
        assert classify_solution(p["solution"], p["start"], p["ops"]) == "right"
        assert classify_solution(misread_solution(p["start"], p["ops"])[0], p["start"], p["ops"]) == "misread"
