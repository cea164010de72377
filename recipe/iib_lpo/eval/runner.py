"""One evaluation protocol for every run: sample, score, summarise, resume.

Output layout under ``out_dir`` (one folder per evaluated run):

    <out_dir>/<run>/<benchmark>.jsonl         one line per problem, appended as chunks finish
    <out_dir>/<run>/<benchmark>.meta.json     the settings the JSONL was produced with
    <out_dir>/<run>/<benchmark>.summary.json  benchmark metrics, written when it is complete
    <out_dir>/<run>/summary.json              all finished benchmarks of the run

Nothing is lost on a crash: problems are generated in chunks and each finished problem is
appended (and flushed) before the next chunk starts; a rerun with the same settings skips done
problems and finished benchmarks, and refuses to mix results produced with other settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from recipe.iib_lpo.eval import metrics
from recipe.iib_lpo.eval.generate import (
    EvalProblem,
    GeneratedSample,
    Generator,
    SamplingConfig,
    chat_prompt_token_ids,
    load_eval_parquet,
    problem_seed,
)

logger = logging.getLogger(__name__)

# Samples per problem when not given: the paper reports P@256 on AIME and P@16 on MATH-500 /
# OlympiadBench (docs/PAPER_RESULTS.md). AMC (decision): AMC23 has only 40 problems, so per-problem
# estimates carry most of the variance; n = 64 costs about a third of AIME's 30 x 256 samples.
# First matching pattern (on the lower-cased benchmark name) wins.
DEFAULT_N_BY_PATTERN: tuple[tuple[str, int], ...] = (("aime", 256), ("amc", 64), ("math", 16), ("olympiad", 16))
DEFAULT_N_OTHER = 16

# --quick: a smoke run (few problems, few samples, short responses), never a reported number.
QUICK_N = 4
QUICK_PROBLEMS = 8
QUICK_MAX_TOKENS = 1024

NOTE_DIVERSITY = (
    "Self-BLEU and Self-ROUGE-L are reported as diversity = 1 - similarity (higher = more diverse), "
    "computed among the first {m} samples of each problem and averaged over problems; Distinct-n "
    "pools word n-grams over those samples."
)


def default_n_for(benchmark: str) -> int:
    """Default samples per problem for a benchmark name (see DEFAULT_N_BY_PATTERN)."""
    name = benchmark.lower()
    for pattern, n in DEFAULT_N_BY_PATTERN:
        if pattern in name:
            return n
    return DEFAULT_N_OTHER


@dataclass(frozen=True)
class BenchmarkSpec:
    """An eval set to run: a display name, its parquet file, and samples per problem."""

    name: str
    path: str
    n: int
    limit: int | None = None  # first `limit` problems only (quick runs)


@dataclass(frozen=True)
class RunOptions:
    """Protocol knobs shared by every benchmark of a run (all recorded in the outputs)."""

    temperature: float = 0.6  # PAPER_RESULTS.md default; the paper's eval temperature is unknown
    top_p: float = 0.95
    max_tokens: int = 8192  # response budget; truncated samples are counted, not dropped
    seed: int = 0
    diversity_samples: int = 8  # samples per problem used for diversity (Self-ROUGE-L is O(m^2 L^2))
    chunk_size: int = 64  # problems per vLLM call: the most work a crash can lose
    workers: int = 1  # processes for the diversity metrics (pure-Python LCS / BLEU)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def safe_name(name: str) -> str:
    """A file-system safe version of a run or benchmark name."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    if not cleaned:
        raise ValueError(f"name {name!r} has no usable characters")
    return cleaned


# ----------------------------------------------------------------------------- scoring


def score_problem(
    problem: EvalProblem,
    samples: Sequence[GeneratedSample],
    *,
    compute_score: Callable | None = None,
    equivalent: Callable[[str, str], bool] | None = None,
) -> dict:
    """Score the samples of one problem: per-sample correctness/preds and per-problem pass@k, maj@n.

    ``compute_score`` / ``equivalent`` default to the recipe's reward (``recipe.iib_lpo.reward.score``),
    so evaluation and training reward agree by construction.
    """
    if compute_score is None or equivalent is None:
        from recipe.iib_lpo.reward import score as reward

        compute_score = compute_score or reward.compute_score
        equivalent = equivalent or reward.answers_equivalent
    if not samples:
        raise ValueError(f"problem {problem.problem_id}: no samples to score")
    correct, preds, scores, reasons = [], [], [], []
    for sample in samples:
        result = compute_score(problem.data_source, sample.text, problem.ground_truth, problem.extra_info)
        score = float(result["score"])
        if math.isnan(score):
            raise ValueError(f"problem {problem.problem_id}: reward returned NaN")
        correct.append(bool(result["acc"]))
        preds.append(result.get("pred"))
        scores.append(score)
        reasons.append(result.get("reason"))
    n, c = len(samples), sum(correct)
    vote = metrics.maj_at_k(preds, problem.ground_truth, equivalent=equivalent, sample_correct=correct)
    return {
        "problem_id": problem.problem_id,
        "data_source": problem.data_source,
        "ground_truth": problem.ground_truth,
        "level": problem.extra_info.get("level"),
        "n": n,
        "num_correct": c,
        "pass_at_k": {str(k): metrics.pass_at_k(n, c, k) for k in metrics.default_k_values(n)},
        "maj_at_n": {"answer": vote.answer, "votes": vote.votes, "num_valid": vote.num_valid, "correct": vote.correct},
        "samples": [s.text for s in samples],
        "preds": preds,
        "correct": correct,
        "scores": scores,
        "reasons": reasons,
        "num_tokens": [s.num_tokens for s in samples],
        "finish_reasons": [s.finish_reason for s in samples],
    }


def _diversity_of(texts: list[str]) -> dict:
    return metrics.diversity_metrics(texts)


def add_diversity(records: list[dict], diversity_samples: int, workers: int = 1) -> None:
    """Attach ``record["diversity"]`` (metrics over the first ``diversity_samples`` samples)."""
    if diversity_samples < 2:
        raise ValueError(f"diversity_samples must be >= 2, got {diversity_samples}")
    subsets = [record["samples"][:diversity_samples] for record in records]
    if workers > 1 and len(records) > 1:
        # spawn, not fork: the parent may hold a vLLM engine's threads and a CUDA context
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_diversity_of, subsets))
    else:
        results = [_diversity_of(s) for s in subsets]
    for record, result in zip(records, results):
        record["diversity"] = result


DIVERSITY_KEYS = ("distinct_1", "distinct_4", "self_bleu_diversity", "self_rouge_l_diversity", "rep4")


def summarize_records(records: Sequence[dict]) -> dict:
    """Benchmark metrics (fractions in [0, 1]) from per-problem records of one benchmark.

    Problems may differ in n only if the caller mixed runs; that is refused because pass@k
    would then average different estimators.
    """
    if not records:
        raise ValueError("no problem records to summarise")
    ns = {r["n"] for r in records}
    if len(ns) != 1:
        raise ValueError(f"records have different sample counts {sorted(ns)}")
    n = ns.pop()
    k_values = metrics.default_k_values(n)
    all_tokens = [t for r in records for t in r["num_tokens"]]
    all_finish = [f for r in records for f in r["finish_reasons"]]
    all_preds = [p for r in records for p in r["preds"]]
    summary = {
        "num_problems": len(records),
        "n": n,
        "k_values": k_values,
        "p_at_1": sum(metrics.avg_at_k(r["correct"]) for r in records) / len(records),
        "pass_at_k": {str(k): sum(r["pass_at_k"][str(k)] for r in records) / len(records) for k in k_values},
        "maj_at_n": sum(r["maj_at_n"]["correct"] for r in records) / len(records),
        "mean_tokens": metrics.mean_response_tokens(all_tokens),
        "truncated_fraction": sum(f == "length" for f in all_finish) / len(all_finish),
        "unparseable_fraction": sum(p is None for p in all_preds) / len(all_preds),
        # the reward's verdict per sample (correct / wrong / no_answer / timeout ...), counted
        "reason_counts": dict(Counter(x for r in records for x in r.get("reasons", []) if x is not None)),
        "undefined_counts": {},
    }
    summary["p_at_n"] = summary["pass_at_k"][str(n)]
    if all("diversity" in r for r in records):
        for key in DIVERSITY_KEYS:
            value, skipped = metrics.mean_defined([r["diversity"][key] for r in records])
            summary[key] = value
            if skipped:
                # e.g. every sample shorter than 4 words: the problem has no Distinct-4
                summary["undefined_counts"][key] = skipped
                logger.warning("%s undefined for %d of %d problems (excluded from the mean)", key, skipped, len(records))
    return summary


# ----------------------------------------------------------------------------- files


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    if not path.exists():
        return records
    with open(path, encoding="utf-8") as handle:
        lines = handle.readlines()
    for line_number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if line_number == len(lines) - 1:
                # a write interrupted by a crash: that problem is simply generated again
                logger.warning("%s: dropping a truncated last line (interrupted write)", path)
                continue
            raise ValueError(f"{path}: line {line_number + 1} is not valid JSON") from None
    return records


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def _rewrite_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def run_fingerprint(model_path: str, bench: BenchmarkSpec, sampling: SamplingConfig, options: RunOptions) -> dict:
    """What makes two result files comparable; a resume must match it exactly."""
    return {
        "model_path": str(Path(model_path).resolve()) if Path(model_path).exists() else str(model_path),
        "data_sha256": file_sha256(bench.path),
        "limit": bench.limit,
        "sampling": asdict(sampling),
        "diversity_samples": options.diversity_samples,
    }


# ----------------------------------------------------------------------------- driver


def evaluate_benchmark(
    run_name: str,
    model_path: str,
    bench: BenchmarkSpec,
    out_dir: str | Path,
    generator_factory: Callable[[], Generator],
    tokenizer,
    options: RunOptions = RunOptions(),
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Evaluate one run on one benchmark (resuming if possible); returns the benchmark summary.

    ``generator_factory`` is called only when some problem still needs samples, so a finished
    benchmark never starts an engine.
    """
    run_dir = Path(out_dir) / safe_name(run_name)
    run_dir.mkdir(parents=True, exist_ok=True)
    stem = safe_name(bench.name)
    jsonl_path, meta_path, summary_path = (run_dir / f"{stem}{s}" for s in (".jsonl", ".meta.json", ".summary.json"))
    sampling = SamplingConfig(
        n=bench.n, temperature=options.temperature, top_p=options.top_p, max_tokens=options.max_tokens, seed=options.seed
    )
    fingerprint = run_fingerprint(model_path, bench, sampling, options)
    if meta_path.exists() and not overwrite:
        previous = json.loads(meta_path.read_text(encoding="utf-8"))
        if previous != fingerprint:
            raise ValueError(
                f"{meta_path} was produced with other settings:\n  before: {previous}\n  now:    {fingerprint}\n"
                "use another --out / run name, or --overwrite to discard the old results"
            )
    if overwrite:
        for path in (jsonl_path, meta_path, summary_path):
            path.unlink(missing_ok=True)
    if summary_path.exists():
        logger.info("%s / %s: already complete, skipped", run_name, bench.name)
        return json.loads(summary_path.read_text(encoding="utf-8"))
    _write_json_atomic(meta_path, fingerprint)

    problems = load_eval_parquet(bench.path, limit=bench.limit)
    by_id = {p.problem_id: p for p in problems}
    records = [r for r in _read_jsonl(jsonl_path) if r["problem_id"] in by_id]
    done = {r["problem_id"] for r in records}
    todo = [p for p in problems if p.problem_id not in done]
    if done:
        logger.info("%s / %s: resuming, %d of %d problems done", run_name, bench.name, len(done), len(problems))
        _rewrite_jsonl(jsonl_path, records)  # drop a truncated last line before appending

    from tqdm.auto import tqdm

    bar = tqdm(total=len(problems), initial=len(done), desc=f"{run_name}/{bench.name}", unit="problem", disable=not progress)
    generator = generator_factory() if todo else None
    with open(jsonl_path, "a", encoding="utf-8") as handle:
        for start in range(0, len(todo), options.chunk_size):
            chunk = todo[start : start + options.chunk_size]
            prompts = [chat_prompt_token_ids(tokenizer, p.messages) for p in chunk]
            seeds = [problem_seed(options.seed, bench.name, p.problem_id) for p in chunk]
            outputs = generator.generate(prompts, sampling, seeds)
            chunk_records = [score_problem(p, samples) for p, samples in zip(chunk, outputs)]
            add_diversity(chunk_records, options.diversity_samples, options.workers)
            for record in chunk_records:
                handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
            records.extend(chunk_records)
            bar.update(len(chunk))
    bar.close()

    order = {p.problem_id: i for i, p in enumerate(problems)}
    records.sort(key=lambda r: order[r["problem_id"]])
    summary = {
        "run": run_name,
        "benchmark": bench.name,
        "data_path": str(bench.path),
        "model_path": str(model_path),
        "fingerprint": fingerprint,
        "records_file": jsonl_path.name,
        "metrics": summarize_records(records),
        "diversity_note": NOTE_DIVERSITY.format(m=options.diversity_samples),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_json_atomic(summary_path, summary)
    return summary


def evaluate_run(
    run_name: str,
    model_path: str,
    benchmarks: Sequence[BenchmarkSpec],
    out_dir: str | Path,
    options: RunOptions = RunOptions(),
    generator_factory: Callable[[], Generator] | None = None,
    engine_kwargs: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Evaluate one model on several benchmarks with one (lazily started) engine; writes
    ``<out_dir>/<run>/summary.json`` and returns it.

    Without ``generator_factory`` a ``VLLMGenerator(model_path, **engine_kwargs)`` is started on
    first need and shut down at the end; a factory's generator is left to the caller (so runs
    of the same checkpoint under several names can share one engine).
    """
    from transformers import AutoTokenizer

    from recipe.iib_lpo.eval.generate import VLLMGenerator

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    holder: dict = {}

    def lazy_generator():
        # only the engine made here is closed here; one from generator_factory belongs to the caller
        if "generator" not in holder:
            if generator_factory is not None:
                holder["generator"], holder["owned"] = generator_factory(), False
            else:
                holder["generator"] = VLLMGenerator(model_path, seed=options.seed, **(engine_kwargs or {}))
                holder["owned"] = True
        return holder["generator"]

    run_summary = {"run": run_name, "model_path": str(model_path), "benchmarks": {}}
    run_dir = Path(out_dir) / safe_name(run_name)
    try:
        for bench in benchmarks:
            summary = evaluate_benchmark(
                run_name, model_path, bench, out_dir, lazy_generator, tokenizer, options, overwrite, progress
            )
            run_summary["benchmarks"][bench.name] = summary
            _write_json_atomic(run_dir / "summary.json", run_summary)
    finally:
        if holder.get("owned"):
            holder["generator"].close()
    return run_summary
