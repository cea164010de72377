"""Conversion of every supported source layout to verl's parquet schema (data_prep.prepare)."""

import json

import pyarrow.parquet as pq
import pytest

from data_prep.layouts import BadRowError, extract_dapo_problem, gsm8k_final_answer, last_boxed_content, parse_level
from data_prep.prepare import main, verl_schema
from data_prep.prompt_template import DEFAULT_PROMPT_TEMPLATE, format_prompt
from data_prep.testing_fixtures import (
    DAPO_INSTRUCTION,
    DAPO_REMINDER,
    EXPECTED,
    FIXTURE_ROWS,
    write_fixture,
    write_hendrycks_tree,
    write_rows,
)

EVAL_SETS = {"math500", "aime2024", "aime2025", "amc23", "olympiadbench"}
DATA_SOURCES = {
    "math": "lighteval/MATH",
    "dapo_math": "math_dapo",
    "gsm8k": "openai/gsm8k",
    "math500": "HuggingFaceH4/MATH-500",
    "aime2024": "aime2024",
    "aime2025": "aime2025",
    "amc23": "amc23",
    "olympiadbench": "olympiadbench",
}


def convert(dataset, source, out, *extra):
    rc = main(["--dataset", dataset, "--source", str(source), "--out", str(out), *extra])
    return rc


def read_rows(path):
    return pq.read_table(path).to_pylist()


@pytest.mark.parametrize("dataset", sorted(EXPECTED))
def test_fixture_converts_to_verl_rows(dataset, tmp_path):
    source = write_fixture(dataset, tmp_path / "src")
    assert convert(dataset, source, tmp_path / "out") == 0
    split = "test" if dataset in EVAL_SETS else "train"
    out = tmp_path / "out" / f"{dataset}_{split}.parquet"
    assert pq.read_schema(out).equals(verl_schema())  # one schema for all files: verl can concatenate them
    rows = read_rows(out)
    assert [(r["extra_info"]["question"], r["reward_model"]["ground_truth"]) for r in rows] == EXPECTED[dataset]
    for row in rows:
        question = row["extra_info"]["question"]
        assert row["data_source"] == DATA_SOURCES[dataset]
        assert row["ability"] == "math"
        assert row["reward_model"]["style"] == "rule"
        assert row["prompt"] == [{"role": "user", "content": format_prompt(question)}]
        assert (
            row["prompt"][0]["content"]
            == question + "\nPlease reason step by step, and put your final answer within \\boxed{}."
        )
        assert row["extra_info"]["split"] == split
        assert row["extra_info"]["answer"] == row["reward_model"]["ground_truth"]
        assert row["extra_info"]["original_id"]
    summary = json.loads((tmp_path / "out" / f"{dataset}_{split}.summary.json").read_text())
    assert summary["rows_in"] == len(FIXTURE_ROWS[dataset])
    assert summary["rows_out"] == len(rows)
    assert summary["rows_in"] == summary["rows_out"] + sum(summary["dropped"].values())


def test_math_keeps_level_type_and_last_boxed_answer(tmp_path):
    source = write_fixture("math", tmp_path / "src")
    convert("math", source, tmp_path / "out")
    rows = read_rows(tmp_path / "out" / "math_train.parquet")
    assert [(r["extra_info"]["level"], r["extra_info"]["type"]) for r in rows] == [
        (1, "Prealgebra"),
        (2, "Prealgebra"),
        (3, "Algebra"),
    ]
    # the third solution boxes a wrong value first; the answer is the last box
    assert rows[2]["reward_model"]["ground_truth"] == "16"
    assert rows[2]["extra_info"]["solution"] == FIXTURE_ROWS["math"][2]["solution"]
    # index = position in the source; ids derived from the file when the layout has none
    assert [r["extra_info"]["index"] for r in rows] == [0, 1, 2]
    assert [r["extra_info"]["original_id"] for r in rows] == ["math#0", "math#1", "math#2"]


def test_math_hendrycks_directory_tree(tmp_path):
    root = write_hendrycks_tree(tmp_path / "src")
    assert convert("math", root, tmp_path / "out") == 0
    rows = read_rows(tmp_path / "out" / "math_train.parquet")
    by_id = {r["extra_info"]["original_id"]: r["reward_model"]["ground_truth"] for r in rows}
    assert by_id == {"train/prealgebra/0": "11", "train/prealgebra/1": "\\frac{3}{4}", "train/algebra/2": "16"}


def test_each_format_reads_the_same_rows(tmp_path):
    outputs = []
    for fmt in ("parquet", "jsonl", "json"):
        source = write_fixture("aime2025", tmp_path / fmt, fmt)
        assert convert("aime2025", source, tmp_path / f"out_{fmt}") == 0
        outputs.append(
            [r["reward_model"]["ground_truth"] for r in read_rows(tmp_path / f"out_{fmt}" / "aime2025_test.parquet")]
        )
    assert outputs[0] == outputs[1] == outputs[2] == ["210", "101"]


def test_common_layout_variants(tmp_path):
    # HuggingFaceH4/aime_2024 layout (lower-case columns) and math-ai/aime24 (answer only boxed in solution)
    write_rows(
        [{"id": 60, "problem": "P one?", "solution": "s", "answer": "033", "url": "u", "year": "2024"}],
        tmp_path / "a" / "h4.parquet",
    )
    write_rows(
        [{"id": 61, "problem": "P two?", "solution": "so \\boxed{204}", "url": "u"}], tmp_path / "b" / "mathai.jsonl"
    )
    assert convert("aime2024", tmp_path / "a", tmp_path / "o1") == 0
    assert convert("aime2024", tmp_path / "b", tmp_path / "o2") == 0
    assert read_rows(tmp_path / "o1" / "aime2024_test.parquet")[0]["reward_model"]["ground_truth"] == "033"
    assert read_rows(tmp_path / "o2" / "aime2024_test.parquet")[0]["reward_model"]["ground_truth"] == "204"
    # open-r1/DAPO-Math-17k-Processed: instructed prompt text + solution column
    processed = [
        {"prompt": DAPO_INSTRUCTION + "Compute $2+2$." + DAPO_REMINDER, "solution": "4", "data_source": "math_dapo"}
    ]
    write_rows(processed, tmp_path / "c" / "dapo.parquet")
    assert convert("dapo_math", tmp_path / "c", tmp_path / "o3") == 0
    row = read_rows(tmp_path / "o3" / "dapo_math_train.parquet")[0]
    assert (row["extra_info"]["question"], row["reward_model"]["ground_truth"]) == ("Compute $2+2$.", "4")


def test_unknown_layout_lists_columns_found_and_expected(tmp_path, capsys):
    write_rows([{"query": "q", "response": "r"}], tmp_path / "weird.jsonl")
    assert convert("gsm8k", tmp_path / "weird.jsonl", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "unknown layout for dataset 'gsm8k'" in err
    assert "Columns found: ['query', 'response']" in err
    assert "needs ['question', 'answer']" in err
    assert str(tmp_path / "weird.jsonl") in err


def test_olympiadbench_scope_filters_are_counted(tmp_path):
    source = write_fixture("olympiadbench", tmp_path / "src")
    convert("olympiadbench", source, tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "olympiadbench_test.summary.json").read_text())
    assert summary["dropped"]["out_of_scope"] == 2
    assert summary["details"]["out_of_scope_reasons"] == {
        "is_multiple_answer is true": 1,
        "answer_type 'Expression' not in ['Numerical']": 1,
    }
    # 'any' keeps every single-answer problem, whatever its answer type
    convert("olympiadbench", source, tmp_path / "any", "--olympiad-answer-types", "any")
    rows = read_rows(tmp_path / "any" / "olympiadbench_test.parquet")
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["16", "-1", "(x-\\omega)(x-\\bar\\omega)"]


def test_hub_source_unreachable_gives_local_file_hint(tmp_path, capsys, monkeypatch):
    import datasets
    import huggingface_hub

    # offline mode (as on the dev machine): only the local datasets cache is tried
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert convert("aime2025", "nobody-xyz/not-a-dataset", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "could not load 'nobody-xyz/not-a-dataset' from the Hugging Face hub" in err
    assert "pass a local file or directory" in err


def test_hub_probe_failure_and_timeout(tmp_path, capsys, monkeypatch):
    import time

    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def refuse(self, repo_id, **kwargs):
        raise ConnectionError("connection refused")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", refuse)
    assert convert("aime2025", "owner/name", tmp_path / "out") == 2
    assert "(ConnectionError: connection refused)" in capsys.readouterr().err

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, repo_id, **kw: time.sleep(5))
    start = time.monotonic()
    assert convert("aime2025", "owner/name", tmp_path / "out", "--hub-timeout", "0.2") == 2
    assert time.monotonic() - start < 10
    assert "no answer within 0.2 s" in capsys.readouterr().err


def test_missing_local_path_is_an_error(tmp_path, capsys):
    assert convert("math", tmp_path / "nope" / "math.parquet", tmp_path / "out") == 2
    assert "does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- answer extraction units


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so $\\boxed{5}$", "5"),
        ("$\\boxed{\\frac{1}{2}}$ and later $\\boxed{\\sqrt{3}}$", "\\sqrt{3}"),
        ("nested \\boxed{\\left\\{1,2\\right\\}}", "\\left\\{1,2\\right\\}"),
        ("spaced \\boxed {7}", "7"),
        ("old style \\fbox{9}", "9"),
        ("bare \\boxed 5$ text", "5"),
        ("\\boxed 3 first, then \\boxed{4}", "4"),
        ("no box here", None),
        ("unbalanced \\boxed{1", None),
        ("empty \\boxed{}", None),
    ],
)
def test_last_boxed_content(text, expected):
    assert last_boxed_content(text) == expected


def test_gsm8k_answer_and_dapo_problem_extraction():
    assert gsm8k_final_answer("a\nb\n#### 1,234") == "1234"
    assert gsm8k_final_answer("#### -7") == "-7"
    with pytest.raises(BadRowError, match="no '#### <number>' line"):
        gsm8k_final_answer("just 5")
    assert extract_dapo_problem(DAPO_INSTRUCTION + "Line one.\n\nLine two." + DAPO_REMINDER) == "Line one.\n\nLine two."
    with pytest.raises(BadRowError, match="does not start with the DAPO-Math-17k instruction"):
        extract_dapo_problem("Compute 2+2." + DAPO_REMINDER)
    with pytest.raises(BadRowError, match="does not end with"):
        extract_dapo_problem(DAPO_INSTRUCTION + "Compute 2+2.")
    assert parse_level("Level 4") == 4 and parse_level(2) == 2 and parse_level("Level ?") is None


def test_default_template_is_the_paper_codes():
    assert (
        DEFAULT_PROMPT_TEMPLATE == "{question}\nPlease reason step by step, and put your final answer within \\boxed{}."
    )
