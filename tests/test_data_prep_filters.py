"""Deduplication, decontamination, bad rows, pass-rate and length filters, train/val split."""

import json

import pyarrow.parquet as pq
import pytest

from data_prep.filters import ContaminationIndex, normalize_text, word_ngrams
from data_prep.prepare import main
from data_prep.testing_fixtures import build_test_tokenizer_dir, write_rows

# 19 words; a training problem sharing 13 consecutive words with it is contaminated
EVAL_LONG = "A farmer has seventeen sheep and all but nine run away so how many sheep remain on the farm"
EVAL_SHORT = "Compute $3 \\cdot 5$."


def gsm_row(question, answer):
    return {"question": question, "answer": f"work\n#### {answer}"}


def run(*argv):
    return main([str(a) for a in argv])


def summary_of(out, name):
    return json.loads((out / f"{name}.summary.json").read_text())


def questions(path):
    return [r["extra_info"]["question"] for r in pq.read_table(path).to_pylist()]


@pytest.fixture
def eval_dir(tmp_path):
    write_rows(
        [{"problem": EVAL_LONG, "answer": "9"}, {"problem": EVAL_SHORT, "answer": "15"}],
        tmp_path / "evals" / "math500.jsonl",
    )
    return tmp_path / "evals"


def test_normalisation_and_ngrams():
    assert normalize_text("  What  is $\\left( 2 \\right)$\\,?\n") == normalize_text("what is ( 2 )?")
    assert normalize_text("ＡＢＣ") == "abc"  # NFKC full-width letters
    assert word_ngrams("a b c d", 3) == {("a", "b", "c"), ("b", "c", "d")}
    assert word_ngrams("a b", 3) == set()
    assert word_ngrams("$x^{2}$ + y", 2) == {("x", "2"), ("2", "y")}  # markup is not a word


def test_dedup_and_decontamination_counts(tmp_path, eval_dir):
    rows = [
        gsm_row("How many legs do 3 cats have?", 12),  # kept
        gsm_row("how many legs  do 3 cats have?", 12),  # duplicate (case/space)
        gsm_row("How many legs do 3 cats have?", 13),  # duplicate with another answer
        gsm_row("compute $3 \\cdot 5$.", 15),  # exact match of an eval problem (normalised)
        gsm_row("Story: " + " ".join(EVAL_LONG.split()[:13]) + " then what?", 9),  # shares exactly 13 words
        gsm_row("A farmer has seventeen sheep and all but nine run away.", 9),  # only 11 shared words: kept
        gsm_row("What is 2 plus 2?", 4),  # kept
    ]
    write_rows(rows, tmp_path / "train.parquet")
    out = tmp_path / "out"
    assert (
        run(
            "--dataset",
            "gsm8k",
            "--source",
            tmp_path / "train.parquet",
            "--out",
            out,
            "--decontaminate-against",
            eval_dir,
        )
        == 0
    )
    assert questions(out / "gsm8k_train.parquet") == [
        "How many legs do 3 cats have?",
        "A farmer has seventeen sheep and all but nine run away.",
        "What is 2 plus 2?",
    ]
    summary = summary_of(out, "gsm8k_train")
    assert summary["dropped"]["duplicates"] == 2
    assert summary["details"]["duplicates_with_other_answer"] == 1
    assert summary["dropped"]["contaminated"] == 2
    assert summary["details"]["contaminated_exact"] == 1
    assert summary["details"]["contaminated_ngram"] == 1
    assert summary["details"]["contaminated_by_eval_file"] == {"math500.jsonl": 2}
    assert summary["rows_in"] == 7 and summary["rows_out"] == 3
    # kept rows keep their source positions as index
    assert [r["extra_info"]["index"] for r in pq.read_table(out / "gsm8k_train.parquet").to_pylist()] == [0, 5, 6]

    # a larger window no longer catches the 13-word overlap; exact matches are still caught
    out2 = tmp_path / "out2"
    run(
        "--dataset",
        "gsm8k",
        "--source",
        tmp_path / "train.parquet",
        "--out",
        out2,
        "--decontaminate-against",
        eval_dir,
        "--ngram-size",
        14,
    )
    details = summary_of(out2, "gsm8k_train")["details"]
    assert (details["contaminated_exact"], details["contaminated_ngram"]) == (1, 0)


def test_decontaminate_against_converted_parquet(tmp_path):
    # eval sets prepared by this tool are read through extra_info.question
    write_rows(
        [{"question": "Find the sum of the first 20 positive integers.", "answer": "210"}], tmp_path / "aime25.jsonl"
    )
    assert run("--dataset", "aime2025", "--source", tmp_path / "aime25.jsonl", "--out", tmp_path / "evals") == 0
    write_rows(
        [gsm_row("Find the sum of the first 20 positive integers.", 210), gsm_row("Other?", 1)],
        tmp_path / "train.jsonl",
    )
    out = tmp_path / "out"
    run(
        "--dataset",
        "gsm8k",
        "--source",
        tmp_path / "train.jsonl",
        "--out",
        out,
        "--decontaminate-against",
        tmp_path / "evals" / "aime2025_test.parquet",
    )
    assert questions(out / "gsm8k_train.parquet") == ["Other?"]


def test_contamination_index_match_kinds():
    index = ContaminationIndex(ngram_size=3)
    index.add("alpha beta gamma delta", "e1")
    assert index.match("ALPHA beta  gamma delta") == ("exact", "e1")
    assert index.match("zeta beta gamma delta eta") == ("ngram", "e1")
    assert index.match("alpha beta zeta gamma") is None


def test_bad_rows_fail_with_index_and_file_then_skip(tmp_path, capsys):
    rows = [
        gsm_row("Fine question?", 3),
        {"question": "", "answer": "work\n#### 2"},  # row 1: empty question
        {"question": "No final answer?", "answer": "just text"},  # row 2: no '####'
        gsm_row("Another fine one?", 4),
    ]
    source = write_rows(rows, tmp_path / "gsm.jsonl")
    out = tmp_path / "out"
    assert run("--dataset", "gsm8k", "--source", source, "--out", out) == 2
    err = capsys.readouterr().err
    assert "2 bad row(s)" in err
    assert f"row 1 (line 2) of {source}: no question: column 'question' is empty" in err
    assert f"row 2 (line 3) of {source}: no answer: 'answer' has no '#### <number>' line" in err
    assert "--skip-bad-rows" in err
    assert not (out / "gsm8k_train.parquet").exists()

    assert run("--dataset", "gsm8k", "--source", source, "--out", out, "--skip-bad-rows") == 0
    assert questions(out / "gsm8k_train.parquet") == ["Fine question?", "Another fine one?"]
    summary = summary_of(out, "gsm8k_train")
    assert summary["dropped"]["bad_rows"] == 2
    assert [e["where"] for e in summary["details"]["bad_row_examples"]] == [
        f"row 1 (line 2) of {source}",
        f"row 2 (line 3) of {source}",
    ]


def test_invalid_json_line_is_a_bad_row(tmp_path, capsys):
    path = tmp_path / "aime.jsonl"
    path.write_text('{"question": "Q1?", "answer": "1"}\n{not json\n{"question": "Q2?", "answer": 2}\n')
    assert run("--dataset", "aime2025", "--source", path, "--out", tmp_path / "out") == 2
    assert f"row 1 (line 2) of {path}: invalid JSON" in capsys.readouterr().err
    assert run("--dataset", "aime2025", "--source", path, "--out", tmp_path / "out", "--skip-bad-rows") == 0
    assert questions(tmp_path / "out" / "aime2025_test.parquet") == ["Q1?", "Q2?"]


def test_dapo_row_without_the_instruction_is_bad(tmp_path, capsys):
    rows = [
        {
            "prompt": [{"role": "user", "content": "Compute 2+2."}],
            "reward_model": {"ground_truth": "4"},
            "extra_info": {"index": "u1"},
        }
    ]
    source = write_rows(rows, tmp_path / "dapo.parquet")
    assert run("--dataset", "dapo_math", "--source", source, "--out", tmp_path / "out") == 2
    assert (
        f"row 0 of {source}: DAPO prompt does not start with the DAPO-Math-17k instruction" in capsys.readouterr().err
    )


def test_pass_rate_filter(tmp_path):
    rows = [gsm_row(f"Question number {i}?", i) for i in range(6)]
    source = write_rows(rows, tmp_path / "gsm.jsonl")
    rates = [
        {"id": "gsm#0", "n": 8, "c": 0},  # never solved: dropped
        {"index": 1, "n": 8, "c": 8},  # always solved: dropped
        {"question": "question number 2?", "n": 8, "c": 3},  # kept (matched by normalised text)
        {"problem_id": "3", "n": 8, "num_correct": 1, "samples": ["..."]},  # eval-runner record: kept
        {"id": "not-in-data", "n": 8, "c": 4},  # matches nothing: reported
        # rows 4 and 5 have no entry: kept and counted
    ]
    write_rows(rates, tmp_path / "rates.jsonl")
    out = tmp_path / "out"
    assert (
        run("--dataset", "gsm8k", "--source", source, "--out", out, "--pass-rate-file", tmp_path / "rates.jsonl") == 0
    )
    assert questions(out / "gsm8k_train.parquet") == [f"Question number {i}?" for i in (2, 3, 4, 5)]
    summary = summary_of(out, "gsm8k_train")
    assert (summary["dropped"]["pass_rate_all_wrong"], summary["dropped"]["pass_rate_all_correct"]) == (1, 1)
    assert summary["details"]["pass_rate_missing_kept"] == 2
    assert summary["details"]["pass_rate_unmatched_entries"] == 1


def test_pass_rate_file_errors(tmp_path, capsys):
    source = write_rows([gsm_row("Q?", 1)], tmp_path / "gsm.jsonl")
    write_rows([{"id": "gsm#0", "n": 4, "c": 5}], tmp_path / "rates.jsonl")
    assert (
        run(
            "--dataset",
            "gsm8k",
            "--source",
            source,
            "--out",
            tmp_path / "out",
            "--pass-rate-file",
            tmp_path / "rates.jsonl",
        )
        == 2
    )
    assert "line 1 of pass-rate file" in capsys.readouterr().err


def test_train_val_split_is_seeded_and_disjoint(tmp_path):
    rows = [gsm_row(f"Split question {i}?", i) for i in range(20)]
    source = write_rows(rows, tmp_path / "gsm.parquet")
    splits = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        run("--dataset", "gsm8k", "--source", source, "--out", tmp_path / name, "--val-size", 0.25, "--seed", seed)
        splits[name] = (
            questions(tmp_path / name / "gsm8k_train.parquet"),
            questions(tmp_path / name / "gsm8k_val.parquet"),
        )
    train, val = splits["a"]
    assert len(train) == 15 and len(val) == 5 and not set(train) & set(val)
    assert set(train) | set(val) == {f"Split question {i}?" for i in range(20)}
    assert splits["a"] == splits["b"] and splits["a"] != splits["c"]
    val_rows = pq.read_table(tmp_path / "a" / "gsm8k_val.parquet").to_pylist()
    assert {r["extra_info"]["split"] for r in val_rows} == {"val"}
    summary = summary_of(tmp_path / "a", "gsm8k_val")
    assert summary["moved_to_other_split"] == {"train": 15}
    assert summary["rows_in"] == summary["rows_out"] + sum(summary["dropped"].values()) + 15


def test_training_only_options_rejected_for_eval_sets(tmp_path, capsys):
    source = write_rows([{"question": "Q?", "answer": "1"}], tmp_path / "a.jsonl")
    assert run("--dataset", "aime2025", "--source", source, "--out", tmp_path / "o", "--val-size", 0.5) == 2
    assert "--val-size applies to training sets only" in capsys.readouterr().err


def test_max_prompt_tokens_filter(tmp_path):
    tokenizer_dir = build_test_tokenizer_dir(tmp_path / "tok")
    from transformers import AutoTokenizer

    from data_prep.filters import prompt_token_count
    from data_prep.prompt_template import build_chat_prompt

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    short, long = "What is 2 plus 2?", "What is " + " plus ".join(str(i) for i in range(40)) + "?"
    n_short = prompt_token_count(tokenizer, build_chat_prompt(short))
    n_long = prompt_token_count(tokenizer, build_chat_prompt(long))
    assert n_short < n_long
    source = write_rows([gsm_row(short, 4), gsm_row(long, 780)], tmp_path / "gsm.jsonl")
    out = tmp_path / "out"
    assert (
        run(
            "--dataset",
            "gsm8k",
            "--source",
            source,
            "--out",
            out,
            "--max-prompt-tokens",
            n_short,
            "--tokenizer",
            tokenizer_dir,
        )
        == 0
    )
    assert questions(out / "gsm8k_train.parquet") == [short]
    assert summary_of(out, "gsm8k_train")["dropped"]["too_long"] == 1


def test_decontamination_directory_ignores_this_tools_training_outputs(tmp_path, capsys):
    data = tmp_path / "data"
    train_src = write_rows(
        [gsm_row("Shared training question?", 1), gsm_row("Eval question here?", 2)], tmp_path / "gsm.jsonl"
    )
    eval_src = write_rows([{"question": "Eval question here?", "answer": "2"}], tmp_path / "aime.jsonl")
    assert (
        run("--dataset", "gsm8k", "--source", train_src, "--out", data, "--val-size", 1) == 0
    )  # train + val files in data/
    assert run("--dataset", "aime2025", "--source", eval_src, "--out", data) == 0
    capsys.readouterr()
    assert (
        run("--dataset", "gsm8k", "--source", train_src, "--out", tmp_path / "out", "--decontaminate-against", data)
        == 0
    )
    assert questions(tmp_path / "out" / "gsm8k_train.parquet") == ["Shared training question?"]
    assert summary_of(tmp_path / "out", "gsm8k_train")["details"]["contaminated_by_eval_file"] == {
        "aime2025_test.parquet": 1
    }
    assert "ignored 1 train/val row(s)" in capsys.readouterr().err


def test_test_split_file_prepared_as_training_data_warns(tmp_path, capsys):
    source = write_rows([gsm_row("Q?", 1)], tmp_path / "src" / "data" / "test-00000-of-00001.parquet")
    assert run("--dataset", "gsm8k", "--source", tmp_path / "src", "--out", tmp_path / "out") == 0
    assert f"warning: {source} looks like a test split" in capsys.readouterr().err
