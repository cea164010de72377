"""The study driver: arms x seeds through the demo's stages, cached cell by cell, then the results.

Stages: the demo's data, warm start and (for the latent arm) latent stage, once, at ``--base-seed``;
then for every seed, every arm's trainer run (``python -m recipe.iib_lpo.main +profile=cpu`` with the
arm's overrides and ``seed``: data order and sampling) and one evaluation call for that seed's new
models (``python -m recipe.iib_lpo.eval run``, the demo's settings, eval seed = base seed for every
model, so two cells see the same prompts and sampling seeds). A cell finished earlier with the same
settings is reused, so the study resumes after an interruption and can be spread over several runs
(``--seeds 0``, later ``--seeds 1 2``; ``--report-only`` rebuilds the results from what is cached).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from recipe.iib_lpo.demo import pipeline as demo
from recipe.iib_lpo.study.arms import Arm, check_equal_budget, study_arms

WARM = "warm_start"


@dataclass(frozen=True)
class StudyPlan:
    """Sizes of the study. ``demo``: the demo plan every cell shares (its seed is the base seed: data, warm start,
    latent stage and evaluation); ``seeds``: the RL seeds of every arm."""

    demo: demo.DemoPlan
    arms: tuple[str, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    expect_cell_s: float = 230.0  # one trainer run of 16 steps on 2 idle cores (measured 2026-12-04: 200-240 s)
    expect_eval_s: float = 25.0   # one model's evaluation, 300 problems x 8 samples
    arm_specs: dict = field(default_factory=dict)

    def arm(self, name: str) -> Arm:
        return self.arm_specs[name]


def study_demo_plan(smoke: bool = False, **kw) -> demo.DemoPlan:
    """The demo plan of the study: the default demo (16 steps, 8 prompts per step, lr 1e-4, the held-out split of
    300 problems x 8 samples) with K = 4 branches (n = 10, so the R = 2 arm has the same n), a vLLM batch that
    holds a whole step (8 x 10), and no verl validation (no choice is made during the study)."""
    base = demo.smoke_plan(steps=1, eval_repeat_warm=False) if smoke else demo.default_plan()
    return replace(base, num_branches=4, max_num_seqs=base.prompts_per_step * 10, test_freq=0, **kw)


def make_plan(arms=None, seeds=(0, 1, 2), smoke: bool = False, **demo_kw) -> StudyPlan:
    plan = study_demo_plan(smoke=smoke, **demo_kw)
    specs = study_arms(plan.max_response_length, plan.num_initial, plan.num_branches)
    names = tuple(arms) if arms else tuple(specs)
    unknown = [a for a in names if a not in specs]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; the study has {list(specs)}")
    if "grpo" not in names:
        raise ValueError("the study compares every arm with GRPO: include the grpo arm")
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"seeds must be distinct and at least one, got {list(seeds)}")
    chosen = {a: specs[a] for a in names}
    if check_equal_budget(chosen.values()) > plan.max_num_seqs // plan.prompts_per_step:
        raise ValueError("max_num_seqs must hold a whole step")
    return StudyPlan(demo=plan, arms=names, seeds=tuple(seeds), arm_specs=chosen)


def cell_name(arm: str, seed: int) -> str:
    return f"{arm}_s{seed}"


def cell_spec(plan: StudyPlan, arm: Arm, seed: int, out: Path, data: dict, warm: dict, cvae: dict | None):
    """The trainer run of one cell: the demo's run with the arm's K, R, latent and overrides, and ``seed``."""
    cell_plan = replace(plan.demo, seed=seed, latent=arm.latent)
    spec = demo.run_spec(cell_plan, arm.algorithm, out, data, warm, cvae, run_dir=out / "cells" / arm.name / f"seed{seed}")
    return cell_plan, replace(spec, num_initial=arm.num_initial, num_branches=arm.num_branches, rounds=arm.rounds,
                              overrides=[*spec.overrides, *arm.overrides])


def run_study(plan: StudyPlan, out: Path, report_only: bool = False, results_dir: Path | None = None,
              name: str = "study_cpu", command: str | None = None) -> dict:
    """Train and evaluate every missing cell (unless ``report_only``), then write the results (``study.report``)."""
    from recipe.iib_lpo.study.report import collect_cells, write_results

    demo._quiet_libraries()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    con = demo.Console(out / "study.log")
    cells = [(seed, a) for seed in plan.seeds for a in plan.arms]
    n = plan.demo.trajectories_per_prompt
    con.line(f"I2B-LPO study -> {out}: arms {', '.join(plan.arms)} x seeds {list(plan.seeds)} = {len(cells)} cells; "
             f"{plan.demo.steps} steps x {plan.demo.prompts_per_step} prompts x {n} trajectories each")
    t0 = time.perf_counter()
    con.line("[data]")
    data = demo.stage_data(plan.demo, out, con)
    con.line("[warm start]")
    warm = demo.stage_warm_start(plan.demo, out, data, con)
    cvae = None
    if any(plan.arm(a).latent for a in plan.arms):
        con.line("[latent stage]")
        cvae = demo.stage_cvae(plan.demo, out, data, warm, con)
    exports: dict[str, Path] = {WARM: Path(warm["dir"])}
    done = 0
    for seed in plan.seeds:
        retrained: set[str] = set()
        for arm_name in plan.arms:
            arm = plan.arm(arm_name)
            cell_plan, spec = cell_spec(plan, arm, seed, out, data, warm, cvae)
            name_ = cell_name(arm_name, seed)
            export = demo.hf_export_dir(Path(spec.out_dir), plan.demo.steps)
            done += 1
            if report_only:
                if (export / "config.json").exists():
                    exports[name_] = export
                continue
            left = len(cells) - done
            con.line("")
            con.line(f"[cell {done}/{len(cells)}] {arm.label} ({arm_name}), seed {seed}  (about "
                     f"{demo._fmt_s(plan.expect_cell_s)}; after it {left} cells, about "
                     f"{demo._fmt_s(left * (plan.expect_cell_s + plan.expect_eval_s))})")
            result = demo.stage_train(cell_plan, arm_name, out, data, warm, cvae, con, spec=spec)
            exports[name_] = result["export"]
            if not result["reused"]:
                retrained.add(name_)
        if report_only:
            continue
        models = {WARM: exports[WARM], **{cell_name(a, seed): exports[cell_name(a, seed)] for a in plan.arms}}
        if not demo._stage_matches(out / "eval" / WARM, {"warm": warm["digest"]}):
            retrained.add(WARM)
        con.line("")
        con.line(f"[evaluation, seed {seed}] {len(models)} models on the held-out split (finished ones are reused)")
        demo.stage_eval(plan.demo, out, data, models, retrained, con)
        demo._mark_stage(out / "eval" / WARM, {"warm": warm["digest"]})
    cells_found = collect_cells(plan, out, exports)
    results = write_results(plan, out, cells_found, results_dir=results_dir, name=name, command=command)
    con.line("")
    for line in results["headline"]:
        con.line(line)
    con.line(f"study: {results['complete_cells']} of {len(cells)} cells complete; {demo._fmt_s(time.perf_counter() - t0)}"
             f"; results {results['json']} and {results['md']}")
    return results


def build_parser():
    import argparse

    names = list(study_arms(64))
    parser = argparse.ArgumentParser(
        prog="python -m recipe.iib_lpo.study",
        description="I2B-LPO vs GRPO and DAPO, with ablations, on the CPU demo task: arms x seeds, cached cell by "
                    "cell (rerun the same command to resume), then results/<name>.md and .json with paired 95 % "
                    "intervals and plots.")
    parser.add_argument("--arms", nargs="+", default=None, choices=names, metavar="ARM",
                        help=f"arms to run (default all: {' '.join(names)}); grpo is required")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="RL seeds (default 0 1 2)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per cell (default 16; --smoke 1)")
    parser.add_argument("--base-seed", type=int, default=0,
                        help="seed of the data, warm start, latent stage and evaluation (default 0)")
    parser.add_argument("--out", default="outputs/study", help="cache of every stage and cell (default outputs/study)")
    parser.add_argument("--results", default="results", help="where <name>.md, <name>.json and plots go (default results)")
    parser.add_argument("--name", default=None, help="results name (default study_cpu; study_cpu_smoke with --smoke)")
    parser.add_argument("--report-only", action="store_true", help="train nothing: rebuild the results from the cache")
    parser.add_argument("--smoke", action="store_true",
                        help="the CI size: the demo smoke's data and warm start, 1 step, a 24-problem evaluation")
    return parser


def main(argv: list[str] | None = None) -> int:
    import shlex
    import sys

    args = build_parser().parse_args(argv)
    kw = {}
    if args.steps is not None:
        if args.steps < 1:
            raise SystemExit("--steps must be >= 1")
        kw["steps"] = args.steps
    try:
        base = study_demo_plan(smoke=args.smoke)
        kw["seed"] = args.base_seed
        kw["warm"] = replace(base.warm, seed=args.base_seed)
        plan = make_plan(args.arms, tuple(args.seeds), smoke=args.smoke, **kw)
    except ValueError as exc:
        raise SystemExit(f"study: {exc}") from None
    name = args.name or ("study_cpu_smoke" if args.smoke else "study_cpu")
    try:
        given = sys.argv[1:] if argv is None else argv  # the command that trains what is missing, then reports
        command = shlex.join(["python", "-m", "recipe.iib_lpo.study", *(a for a in given if a != "--report-only")])
        run_study(plan, Path(args.out), report_only=args.report_only, results_dir=Path(args.results), name=name,
                  command=command)
    except RuntimeError as exc:
        print(f"\nstudy failed: {exc}\n(finished cells are cached: rerun the same command to resume)",
              file=sys.stderr, flush=True)
        return 1
    return 0
