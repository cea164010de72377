"""The study's results: ``<results>/<name>.json``, ``<name>.md`` and ``<name>_plots/*.png``.

JSON layout::

    {"arms": {arm: {"label", "change", "trajectories_per_prompt",
                    "seeds": [{"seed", "p_at_1", "p_at_k", "k", "maj_at_k", "mean_tokens", "distinct4",
                               "self_bleu_diversity", "step_s", "train_wall_s", "generated_trajectories_per_step",
                               "final_train_accuracy"}],
                    "summary": {metric: {"mean", "min", "max", "sd", "n"}}}},
     "warm_start": {"p_at_1", "p_at_k", "distinct4", ...},
     "paired": {"<arm>_minus_grpo": {"diff", "ci", "se", "verdict", "per_seed", "seeds", "problems"},
                "<arm>_minus_warm_start": {...},
                "<ablation>_minus_iib_lpo": {...}},   # the I2B-LPO ablations against the default arm
     "complete": bool, "complete_cells", "missing_cells", "settings", "command", "headline"}

Fractions, not percent. P@1 is the mean correctness of the k samples per problem (= avg@k).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from recipe.iib_lpo.study.stats import accuracy_matrix, crossed_bootstrap, per_seed_paired, spread, verdict

EVAL_BENCH = "heldout"
SEED_METRICS = ("p_at_1", "p_at_k", "maj_at_k", "mean_tokens", "distinct4", "self_bleu_diversity", "step_s",
                "train_wall_s", "generated_trajectories_per_step", "final_train_accuracy")
# the training curves: (panel title, metric key of GRPO-like arms, key of I2B-LPO arms)
CURVES = (("training reward (mean over the trained batch)", "critic/rewards/mean", "critic/rewards/mean"),
          ("sample accuracy (I2B-LPO: initial rollouts; DAPO: after dynamic sampling)", "critic/score/mean",
           "iib_lpo/acc_initial"),
          ("actor entropy (nats per token)", "actor/entropy", "actor/entropy"))
COLORS = {"grpo": "tab:blue", "dapo": "tab:green", "iib_lpo": "tab:red", "iib_lpo_latent": "tab:purple",
          "no_ib_filter": "tab:orange", "no_ib_reward": "tab:brown", "rounds2": "tab:pink"}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _metrics(run_dir: Path) -> list[dict]:
    rows = _read_jsonl(run_dir / "metrics.jsonl")
    return sorted(({"step": r["step"], **r["data"]} for r in rows), key=lambda r: r["step"])


def _eval(out: Path, name: str) -> dict | None:
    folder = out / "eval" / name
    summary = folder / f"{EVAL_BENCH}.summary.json"
    if not summary.exists():
        return None
    return {"metrics": json.loads(summary.read_text())["metrics"], "records": _read_jsonl(folder / f"{EVAL_BENCH}.jsonl")}


def collect_cells(plan, out: Path, exports: dict[str, Path]) -> dict:
    """What the cache holds: the warm start's evaluation and, per finished cell (HF export and evaluation
    present), its arm, seed, training metrics, evaluation and wall time."""
    from recipe.iib_lpo.study.driver import WARM, cell_name

    found = {"warm": _eval(out, WARM), "cells": {}}
    for seed in plan.seeds:
        for arm in plan.arms:
            name = cell_name(arm, seed)
            run_dir = out / "cells" / arm / f"seed{seed}"
            evaluated = _eval(out, name)
            if name not in exports or evaluated is None:
                continue
            stage = json.loads((run_dir / "stage.json").read_text()) if (run_dir / "stage.json").exists() else {}
            found["cells"][name] = {"arm": arm, "seed": seed, "metrics": _metrics(run_dir), "eval": evaluated,
                                    "wall_s": stage.get("wall_s")}
    return found


def _mean_after_first(metrics: list[dict], key: str) -> float | None:
    """Mean of ``key`` over the training steps after step 1 (step 1 carries the engines' warm-up)."""
    values = [m[key] for m in metrics if m["step"] >= 2 and isinstance(m.get(key), (int, float))]
    return sum(values) / len(values) if values else None


def generated_trajectories_per_step(metrics: list[dict], prompts_per_step: int, n: int) -> float | None:
    """Trajectories the engine generated per step: the batch's prompts plus, under DAPO's dynamic sampling, the
    groups it evicted (no signal) or discarded (surplus), each of n trajectories (verl's replay-buffer metrics)."""
    steps = [m for m in metrics if "critic/score/mean" in m]
    if not steps:
        return None
    extra = [m.get("training/filter_groups/evicted_samples", 0) + m.get("training/filter_groups/discarded_surplus_samples", 0)
             for m in steps]
    return n * (prompts_per_step + sum(extra) / len(extra))


def accuracy_key(arm) -> str:
    return CURVES[1][2] if arm.algorithm == "iib_lpo" else CURVES[1][1]


def seed_entry(plan, arm, cell: dict) -> dict:
    m, metrics = cell["eval"]["metrics"], cell["metrics"]
    train = [x for x in metrics if "critic/score/mean" in x]
    final = train[-1].get(accuracy_key(arm)) if train else None
    return {"seed": cell["seed"], "p_at_1": m["p_at_1"], "p_at_k": m["p_at_n"], "k": m["n"], "maj_at_k": m.get("maj_at_n"),
            "mean_tokens": m.get("mean_tokens"), "distinct4": m.get("distinct_4"),
            "self_bleu_diversity": m.get("self_bleu_diversity"), "step_s": _mean_after_first(metrics, "timing_s/step"),
            "train_wall_s": cell["wall_s"],
            "generated_trajectories_per_step": generated_trajectories_per_step(
                metrics, plan.demo.prompts_per_step, arm.trajectories_per_prompt),
            "final_train_accuracy": final}


def paired_entry(records_a: dict[int, list[dict]], records_b: dict[int, list[dict]]) -> dict | None:
    """a - b over the seeds both have (``records_b`` may hold one entry under every seed: the warm start)."""
    seeds = sorted(set(records_a) & set(records_b))
    if not seeds:
        return None
    problems = [r["problem_id"] for r in records_a[seeds[0]]]
    a = accuracy_matrix({s: records_a[s] for s in seeds}, problems)
    b = accuracy_matrix({s: records_b[s] for s in seeds}, problems)
    boot = crossed_bootstrap(a - b)
    return {**boot, "verdict": verdict(boot["ci"]), "per_seed": [{"seed": s, **e} for s, e in zip(seeds, per_seed_paired(a - b))],
            "seed_list": seeds}


def build_results(plan, found: dict, command: str) -> dict:
    from recipe.iib_lpo.study.driver import cell_name

    arms, records = {}, {}
    for name in plan.arms:
        arm = plan.arm(name)
        cells = [found["cells"][cell_name(name, s)] for s in plan.seeds if cell_name(name, s) in found["cells"]]
        seeds = [seed_entry(plan, arm, c) for c in cells]
        arms[name] = {"label": arm.label, "change": arm.change, "trajectories_per_prompt": arm.trajectories_per_prompt,
                      "seeds": seeds, "summary": {k: spread([e[k] for e in seeds]) for k in SEED_METRICS}}
        records[name] = {c["seed"]: c["eval"]["records"] for c in cells}
    paired = {}
    for name in plan.arms:
        if name != "grpo":
            entry = paired_entry(records[name], records["grpo"])
            if entry:
                paired[f"{name}_minus_grpo"] = entry
    # which part does it: every ablation against the default I2B-LPO arm
    if "iib_lpo" in plan.arms:
        for name in plan.arms:
            if name != "iib_lpo" and plan.arm(name).algorithm == "iib_lpo":
                entry = paired_entry(records[name], records["iib_lpo"])
                if entry:
                    paired[f"{name}_minus_iib_lpo"] = entry
    warm = None
    if found["warm"]:
        wm = found["warm"]["metrics"]
        warm = {"p_at_1": wm["p_at_1"], "p_at_k": wm["p_at_n"], "k": wm["n"], "maj_at_k": wm.get("maj_at_n"),
                "mean_tokens": wm.get("mean_tokens"), "distinct4": wm.get("distinct_4"),
                "self_bleu_diversity": wm.get("self_bleu_diversity")}
        for name in plan.arms:
            entry = paired_entry(records[name], {s: found["warm"]["records"] for s in records[name]})
            if entry:
                paired[f"{name}_minus_warm_start"] = entry
    expected = [cell_name(a, s) for s in plan.seeds for a in plan.arms]
    missing = [c for c in expected if c not in found["cells"]]
    d = plan.demo
    settings = {"steps": d.steps, "prompts_per_step": d.prompts_per_step, "trajectories_per_prompt": d.trajectories_per_prompt,
                "num_initial": d.num_initial, "num_branches": d.num_branches, "actor_lr": d.actor_lr,
                "max_response_length": d.max_response_length, "base_seed": d.seed, "seeds": list(plan.seeds),
                "eval_problems": d.eval_problems, "eval_n": d.eval_n, "eval_temperature": d.eval_temperature,
                "eval_top_p": d.eval_top_p, "eval_max_tokens": d.eval_max_tokens}
    results = {"arms": arms, "warm_start": warm, "paired": paired, "complete": not missing,
               "complete_cells": len(expected) - len(missing), "missing_cells": missing, "settings": settings,
               "command": command}
    results["headline"] = headline(results)
    return results


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _pts(entry: dict) -> str:
    lo, hi = entry["ci"]
    return f"{100 * entry['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def headline(results: dict) -> list[str]:
    """One line per arm against GRPO, from the numbers (and a line that says when cells are missing)."""
    lines = []
    if not results["complete"]:
        lines.append(f"PARTIAL: {results['complete_cells']} of {results['complete_cells'] + len(results['missing_cells'])} "
                     f"cells; missing {', '.join(results['missing_cells'])}")
    for ref, ref_label in (("grpo", "GRPO"), ("iib_lpo", "the default I2B-LPO")):
        suffix = f"_minus_{ref}"
        for key, entry in results["paired"].items():
            if not key.endswith(suffix):
                continue
            arm = key[: -len(suffix)]
            word = {"beats": "beats", "loses": "loses to", "ties": "ties"}[entry["verdict"]]
            lines.append(f"{results['arms'][arm]['label']} {word} {ref_label}: held-out P@1 {_pts(entry)} points "
                         f"(95 % interval over {entry['seeds']} seeds x {entry['problems']} problems)")
    return lines


def render_markdown(results: dict, plot_names: list[str], plots_rel: str) -> str:
    s = results["settings"]
    out = ["# The study on the CPU demo task", "",
           f"Regenerate: `{results['command']}` (cached cell by cell under `--out`: rerun to resume; "
           "`--report-only` rebuilds these files from the cache).", ""]
    if not results["complete"]:
        out += [f"**Partial: {results['complete_cells']} of {results['complete_cells'] + len(results['missing_cells'])} "
                f"cells are done** (missing: {', '.join(results['missing_cells'])}); every number below is from the done "
                "cells only.", ""]
    out += [f"Every arm: the same warm start, {s['steps']} steps x {s['prompts_per_step']} prompts x "
             f"{s['trajectories_per_prompt']} trajectories per prompt (M = {s['num_initial']}), lr {s['actor_lr']:g}, "
             f"seeds {s['seeds']} (data order and sampling); held-out evaluation of every model with the same command: "
             f"{s['eval_problems']} problems x {s['eval_n']} samples, T = {s['eval_temperature']}, top-p {s['eval_top_p']}, "
             f"eval seed {s['base_seed']}. Differences are paired over problems within a seed; the 95 % interval "
             "resamples seeds and problems (a crossed bootstrap), so it carries the run-to-run spread.", "",
             "## Headline", ""] + [f"- {x}" for x in results["headline"]] + ["", "## Held-out results (mean over seeds, min-max)", "",
             "| arm | seeds | P@1 % | P@k % | maj@k % | #Tok | Distinct-4 | Self-BLEU div. | P@1 vs GRPO, points [95 %] | "
             "vs warm start | s / step | generated traj. / step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    w = results["warm_start"]
    if w:
        out.append(f"| warm start | - | {_pct(w['p_at_1'])} | {_pct(w['p_at_k'])} | {_pct(w['maj_at_k'])} | "
                   f"{w['mean_tokens']:.1f} | {w['distinct4']:.3f} | {w['self_bleu_diversity']:.3f} | | | | |")

    def rng(st, pct=True, digits=1):
        if st["mean"] is None:
            return "-"
        f = (lambda x: f"{100 * x:.{digits}f}") if pct else (lambda x: f"{x:.{digits}f}")
        return f"{f(st['mean'])} ({f(st['min'])}-{f(st['max'])})" if st["n"] > 1 else f(st["mean"])

    for name, arm in results["arms"].items():
        sm = arm["summary"]
        vs = results["paired"].get(f"{name}_minus_grpo")
        vw = results["paired"].get(f"{name}_minus_warm_start")
        out.append(f"| {arm['label']} | {len(arm['seeds'])} | {rng(sm['p_at_1'])} | {rng(sm['p_at_k'])} | {rng(sm['maj_at_k'])} | "
                   f"{rng(sm['mean_tokens'], pct=False)} | {rng(sm['distinct4'], pct=False, digits=3)} | "
                   f"{rng(sm['self_bleu_diversity'], pct=False, digits=3)} | "
                   f"{(_pts(vs) + ' ' + vs['verdict']) if vs else '(reference)' if name == 'grpo' else '-'} | "
                   f"{_pts(vw) if vw else '-'} | {rng(sm['step_s'], pct=False)} | "
                   f"{rng(sm['generated_trajectories_per_step'], pct=False, digits=0)} |")
    out += ["", "What each arm changes:", ""] + [f"- **{a['label']}** (`{n}`): {a['change']}" for n, a in results["arms"].items()]
    out += ["", "## Per seed (P@1 vs GRPO within the seed, points +- s.e. over problems)", "",
            "| arm | " + " | ".join(f"seed {x}" for x in s["seeds"]) + " |", "|---|" + "---|" * len(s["seeds"])]
    for key, entry in results["paired"].items():
        if key.endswith("_minus_grpo"):
            by_seed = {e["seed"]: e for e in entry["per_seed"]}
            cells = [f"{100 * by_seed[x]['diff']:+.1f} +- {100 * by_seed[x]['se']:.1f}" if x in by_seed else "-" for x in s["seeds"]]
            out.append(f"| {results['arms'][key[:-len('_minus_grpo')]]['label']} | " + " | ".join(cells) + " |")
    if plot_names:
        out += ["", "## Plots", ""] + [f"![{p}]({plots_rel}/{p})" for p in plot_names]
    out += ["", "s / step: mean wall time of training steps 2..N (step 1 carries the engines' warm-up), per seed, then "
            "mean (min-max) over seeds; the cells ran one after another on the same machine. Generated trajectories "
            "per step include DAPO's extra groups (dynamic sampling refills the batch).", ""]
    return "\n".join(out)


def write_plots(plan, found: dict, results: dict, plots_dir: Path) -> list[str]:
    """curves.png (reward, accuracy, entropy per step: mean over seeds, band min-max), heldout.png (P@1 and
    Distinct-4 per arm, one dot per seed), paired.png (P@1 vs GRPO with the 95 % interval), step_time.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from recipe.iib_lpo.study.driver import cell_name

    plots_dir.mkdir(parents=True, exist_ok=True)
    names = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(plots_dir / name, dpi=100)
        plt.close(fig)
        names.append(name)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for arm_name in plan.arms:
        arm = plan.arm(arm_name)
        cells = [found["cells"][cell_name(arm_name, s)] for s in plan.seeds if cell_name(arm_name, s) in found["cells"]]
        for ax, (title, key, iib_key) in zip(axes, CURVES):
            k = iib_key if arm.algorithm == "iib_lpo" else key
            per_seed = [{m["step"]: m[k] for m in c["metrics"] if isinstance(m.get(k), (int, float))} for c in cells]
            steps = sorted(set.intersection(*(set(p) for p in per_seed))) if per_seed else []
            if not steps:
                continue
            v = np.array([[p[x] for x in steps] for p in per_seed])
            ax.plot(steps, v.mean(0), color=COLORS.get(arm_name), label=arm.label)
            if len(per_seed) > 1:
                ax.fill_between(steps, v.min(0), v.max(0), color=COLORS.get(arm_name), alpha=0.15)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("training step")
    axes[0].legend(fontsize=8)
    save(fig, "curves.png")

    arms = [a for a in plan.arms if results["arms"][a]["seeds"]]
    if arms:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        for ax, key, title in ((axes[0], "p_at_1", "held-out P@1"), (axes[1], "distinct4", "held-out Distinct-4")):
            for i, a in enumerate(arms):
                vals = [e[key] for e in results["arms"][a]["seeds"] if e[key] is not None]
                ax.bar(i, np.mean(vals), color=COLORS.get(a), alpha=0.6)
                ax.plot([i] * len(vals), vals, "k.", markersize=6)
            if results["warm_start"]:
                ax.axhline(results["warm_start"][key], color="gray", ls="--", label="warm start")
                ax.legend(fontsize=8)
            ax.set_xticks(range(len(arms)), [results["arms"][a]["label"] for a in arms], rotation=20, fontsize=8)
            ax.set_title(title + " (bar: mean over seeds; dots: seeds)", fontsize=9)
        save(fig, "heldout.png")

        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        vs = [(a, results["paired"][f"{a}_minus_grpo"]) for a in arms if f"{a}_minus_grpo" in results["paired"]]
        for i, (a, e) in enumerate(vs):
            lo, hi = e["ci"]
            axes[0].errorbar(i, 100 * e["diff"], yerr=[[100 * (e["diff"] - lo)], [100 * (hi - e["diff"])]], fmt="o",
                             color=COLORS.get(a), capsize=4)
        axes[0].axhline(0, color="k", lw=0.8)
        axes[0].set_xticks(range(len(vs)), [results["arms"][a]["label"] for a, _ in vs], rotation=20, fontsize=8)
        axes[0].set_title("held-out P@1 minus GRPO, points (95 % interval over seeds x problems)", fontsize=9)
        for i, a in enumerate(arms):
            vals = [e["step_s"] for e in results["arms"][a]["seeds"] if e["step_s"] is not None]
            if vals:
                axes[1].bar(i, np.mean(vals), color=COLORS.get(a), alpha=0.6)
                axes[1].plot([i] * len(vals), vals, "k.", markersize=6)
        axes[1].set_xticks(range(len(arms)), [results["arms"][a]["label"] for a in arms], rotation=20, fontsize=8)
        axes[1].set_title("wall time per training step, s (steps 2..N; dots: seeds)", fontsize=9)
        save(fig, "paired_and_step_time.png")
    return names


def write_results(plan, out: Path, found: dict, results_dir: Path | None = None, name: str = "study_cpu",
                  command: str | None = None) -> dict:
    results_dir = Path(results_dir or "results")
    results_dir.mkdir(parents=True, exist_ok=True)
    command = command or "python -m recipe.iib_lpo.study"
    results = build_results(plan, found, command)
    plots_dir = results_dir / f"{name}_plots"
    plot_names = write_plots(plan, found, results, plots_dir)
    json_path, md_path = results_dir / f"{name}.json", results_dir / f"{name}.md"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    md_path.write_text(render_markdown(results, plot_names, plots_dir.name))
    return {**results, "json": json_path, "md": md_path}
