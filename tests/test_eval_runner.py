"""The eval runner's protocol without an engine: scoring with the recipe's reward, summaries,
resume after a crash, refusal to mix settings, report merging and plots.

The generator here is a scripted test double (known responses -> known correctness); the real
vLLM path is covered by test_eval_cli.py."""

import json

import pandas as pd
import pytest

from recipe.iib_lpo.eval import metrics
from recipe.iib_lpo.eval.generate import GeneratedSample, load_eval_parquet
from recipe.iib_lpo.eval.report import load_run_summaries, main_table, render_report
from recipe.iib_lpo.eval.runner import BenchmarkSpec, RunOptions, evaluate_run

PROBLEMS = [("What is 2 + 3?", "5"), ("What is 7 * 6?", "42"), ("Compute 10 - 4.", "6"), ("What is 1/2 + 1/4?", "\\frac{3}{4}")]


def write_eval_parquet(path, name, problems, with_levels=False):
    """A small eval set in data_prep's verl schema."""
    from data_prep.prompt_template import build_chat_prompt

    rows = []
    for i, (question, answer) in enumerate(problems):
        extra = {"index": i, "split": "test", "question": question, "answer": answer}
        if with_levels:
            extra["level"] = f"Level {1 + i % 5}"
        rows.append(
            {
                "data_source": name,
                "prompt": build_chat_prompt(question),
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": answer},
                "extra_info": extra,
            }
        )
    pd.DataFrame(rows).to_parquet(path)
    return path


class ScriptedGenerator:
    """Problem i gets i + 1 correct samples out of n (answers boxed), the rest wrong or unboxed."""

    def __init__(self, tokenizer, golds, fail_after_calls=None):
        self.tokenizer, self.golds = tokenizer, golds
        self.calls, self.fail_after_calls, self.prompts_seen = 0, fail_after_calls, []

    def generate(self, prompts, sampling, seeds):
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise RuntimeError("simulated crash")
        self.calls += 1
        out = []
        for prompt in prompts:
            text = self.tokenizer.decode(prompt)
            index = next(i for i, (q, _) in enumerate(PROBLEMS) if q in text)
            self.prompts_seen.append(index)
            gold = self.golds[index]
            samples = []
            for j in range(sampling.n):
                if j <= index:
                    body = f"We compute it step by step. The answer is \\boxed{{{gold}}}."
                elif j % 2:
                    body = "I am not sure, let me think again about it."
                else:
                    body = "We compute it carefully and get \\boxed{1000}."
                samples.append(GeneratedSample(text=body, num_tokens=10 + j, finish_reason="length" if j == 0 else "stop"))
            out.append(samples)
        return out

    def close(self):
        pass


@pytest.fixture()
def eval_set(tmp_path):
    return write_eval_parquet(tmp_path / "math500.parquet", "math500", PROBLEMS)


def _tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def test_scores_and_summary_follow_from_known_responses(tiny_qwen2_dir, eval_set, tmp_path):
    gen = ScriptedGenerator(_tokenizer(tiny_qwen2_dir), [a for _, a in PROBLEMS])
    bench = BenchmarkSpec("math500", str(eval_set), n=4)
    out = tmp_path / "out"
    summary = evaluate_run("scripted", str(tiny_qwen2_dir), [bench], out, RunOptions(diversity_samples=4, chunk_size=2), generator_factory=lambda: gen, progress=False)
    m = summary["benchmarks"]["math500"]["metrics"]
    # problem i has c = i + 1 of n = 4 correct (the reward accepts \frac{3}{4} == \frac{3}{4})
    assert m["p_at_1"] == pytest.approx((1 + 2 + 3 + 4) / 16)
    for k in (1, 2, 4):
        assert m["pass_at_k"][str(k)] == pytest.approx(sum(metrics.pass_at_k(4, c, k) for c in (1, 2, 3, 4)) / 4)
    # maj@4: problem 0 votes gold 1 vs "1000" 1 -> tie, gold first -> correct; all others correct
    assert m["maj_at_n"] == 1.0
    assert m["mean_tokens"] == pytest.approx(11.5) and m["truncated_fraction"] == 0.25
    # unboxed (odd j > i): j = 1, 3 of problem 0, j = 3 of problems 1 and 2
    assert m["unparseable_fraction"] == pytest.approx(4 / 16)
    assert m["reason_counts"]["correct"] == 10
    records = [json.loads(line) for line in (out / "scripted" / "math500.jsonl").read_text().splitlines()]
    assert [r["problem_id"] for r in records] == ["0", "1", "2", "3"]
    assert records[0]["correct"] == [True, False, False, False] and records[0]["preds"][1] is None
    assert records[3]["num_correct"] == 4 and records[3]["maj_at_n"]["answer"] == "\\frac{3}{4}"
    assert set(records[0]["diversity"]) >= {"distinct_1", "distinct_4", "self_bleu_diversity", "self_rouge_l_diversity", "rep4"}
    assert records[3]["diversity"]["self_bleu_diversity"] == pytest.approx(0.0, abs=1e-12)  # 4 identical samples


def test_resume_after_crash_generates_only_missing_problems(tiny_qwen2_dir, eval_set, tmp_path):
    tokenizer = _tokenizer(tiny_qwen2_dir)
    golds = [a for _, a in PROBLEMS]
    bench = BenchmarkSpec("math500", str(eval_set), n=4)
    options = RunOptions(diversity_samples=2, chunk_size=1)
    out = tmp_path / "out"
    crashing = ScriptedGenerator(tokenizer, golds, fail_after_calls=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate_run("r", str(tiny_qwen2_dir), [bench], out, options, generator_factory=lambda: crashing, progress=False)
    jsonl = out / "r" / "math500.jsonl"
    assert len(jsonl.read_text().splitlines()) == 2 and not (out / "r" / "math500.summary.json").exists()
    with open(jsonl, "a") as handle:
        handle.write('{"problem_id": "2", "trunc')  # a write interrupted by the crash
    resumed = ScriptedGenerator(tokenizer, golds)
    summary = evaluate_run("r", str(tiny_qwen2_dir), [bench], out, options, generator_factory=lambda: resumed, progress=False)
    assert resumed.prompts_seen == [2, 3]
    assert summary["benchmarks"]["math500"]["metrics"]["num_problems"] == 4
    fresh_out = tmp_path / "fresh"
    fresh = evaluate_run("r", str(tiny_qwen2_dir), [bench], fresh_out, options, generator_factory=lambda: ScriptedGenerator(tokenizer, golds), progress=False)
    assert fresh["benchmarks"]["math500"]["metrics"] == summary["benchmarks"]["math500"]["metrics"]

    # finished: no generator is even created; other settings are refused unless --overwrite
    def must_not_start():
        raise AssertionError("engine started for a finished benchmark")

    evaluate_run("r", str(tiny_qwen2_dir), [bench], out, options, generator_factory=must_not_start, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        evaluate_run("r", str(tiny_qwen2_dir), [BenchmarkSpec("math500", str(eval_set), n=2)], out, options, generator_factory=must_not_start, progress=False)
    again = evaluate_run("r", str(tiny_qwen2_dir), [BenchmarkSpec("math500", str(eval_set), n=2)], out, options, generator_factory=lambda: ScriptedGenerator(tokenizer, golds), overwrite=True, progress=False)
    assert again["benchmarks"]["math500"]["metrics"]["n"] == 2


def test_report_merges_runs_and_plots(tiny_qwen2_dir, eval_set, tmp_path):
    from recipe.iib_lpo.eval.plots import write_all_plots

    tokenizer = _tokenizer(tiny_qwen2_dir)
    golds = [a for _, a in PROBLEMS]
    aime = write_eval_parquet(tmp_path / "aime24.parquet", "aime24", PROBLEMS[:2])
    options = RunOptions(diversity_samples=2)
    for run, n in (("grpo", 4), ("iib_lpo", 8)):
        evaluate_run(run, str(tiny_qwen2_dir), [BenchmarkSpec("aime24", str(aime), n=n), BenchmarkSpec("math500", str(eval_set), n=4)],
                     tmp_path / run, options, generator_factory=lambda: ScriptedGenerator(tokenizer, golds), progress=False)
    runs = load_run_summaries([tmp_path / "grpo", tmp_path / "iib_lpo" / "iib_lpo"])
    table = main_table(runs).splitlines()
    # AIME first (paper order); P@k at the largest k both runs have (4)
    assert table[0] == "| Run | AIME24 P@1 | P@4 | #Tok | MATH500 P@1 | P@4 | #Tok |"
    grpo = runs[0]["benchmarks"]["aime24"]["metrics"]
    assert table[2] == f"| grpo | {100 * grpo['p_at_1']:.1f} | {100 * grpo['pass_at_k']['4']:.1f} | {grpo['mean_tokens']:.0f} | 62.5 | 100.0 | 12 |"
    report = render_report(runs)
    assert "1 - similarity" in report and "Self-BLEU (1-sim)" in report
    paths = write_all_plots(runs, tmp_path / "plots")
    assert [p.name for p in paths] == ["pass_at_k.png", "lengths.png", "diversity.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_malformed_eval_rows_are_refused(tmp_path):
    path = write_eval_parquet(tmp_path / "bad.parquet", "math500", PROBLEMS[:2])
    frame = pd.read_parquet(path)
    frame.at[1, "reward_model"] = {"style": "rule", "ground_truth": " "}
    frame.to_parquet(path)
    with pytest.raises(ValueError, match="row 1: reward_model.ground_truth"):
        load_eval_parquet(path)
    frame = pd.read_parquet(write_eval_parquet(tmp_path / "dup.parquet", "math500", PROBLEMS[:2]))
    frame.at[1, "extra_info"] = {**frame.at[0, "extra_info"]}
    frame.to_parquet(tmp_path / "dup.parquet")
    with pytest.raises(ValueError, match="duplicate problem id"):
        load_eval_parquet(tmp_path / "dup.parquet")
    assert len(load_eval_parquet(write_eval_parquet(tmp_path / "ok.parquet", "math500", PROBLEMS), limit=3)) == 3


def test_cli_plan_applies_default_n_overrides_and_quick():
    from recipe.iib_lpo.eval.cli import build_parser, plan_run

    base = ["run", "--model", "m=/ckpt/a", "--model", "/ckpt/b/", "--out", "o",
            "--data", "aime25=a.parquet", "--data", "amc23=b.parquet", "--data", "math500=c.parquet", "--data", "olympiadbench=d.parquet"]  # fmt: skip
    models, benches, options, engine = plan_run(build_parser().parse_args(base))
    assert models == [("m", "/ckpt/a"), ("b", "/ckpt/b/")]
    assert [(b.name, b.n, b.limit) for b in benches] == [("aime25", 256, None), ("amc23", 64, None), ("math500", 16, None), ("olympiadbench", 16, None)]
    assert (options.temperature, options.top_p, options.max_tokens) == (0.6, 0.95, 8192)
    _, benches, options, _ = plan_run(build_parser().parse_args(base + ["--n", "math500=32", "--quick"]))
    assert [(b.n, b.limit) for b in benches] == [(4, 8), (4, 8), (4, 8), (4, 8)] and options.max_tokens == 1024
    _, benches, _, _ = plan_run(build_parser().parse_args(base + ["--n", "math500=32", "--limit", "5"]))
    assert [(b.n, b.limit) for b in benches][2] == (32, 5)
    for bad in (["--n", "gsm8k=4"], ["--data", "math500=e.parquet"], ["--n", "math500=x"]):
        with pytest.raises(SystemExit):
            plan_run(build_parser().parse_args(base + bad))


def test_diversity_in_worker_processes_equals_in_process():
    from recipe.iib_lpo.eval.runner import add_diversity

    texts = ["a b c d e f", "a b c d x y", "q r s t u v w", "a b c d e f"]
    serial = [{"samples": texts}, {"samples": texts[::-1]}]
    parallel = [{"samples": texts}, {"samples": texts[::-1]}]
    add_diversity(serial, diversity_samples=3, workers=1)
    add_diversity(parallel, diversity_samples=3, workers=2)
    assert [r["diversity"] for r in parallel] == [r["diversity"] for r in serial]
    assert serial[0]["diversity"] == metrics.diversity_metrics(texts[:3])
    with pytest.raises(ValueError):
        add_diversity(serial, diversity_samples=1)
