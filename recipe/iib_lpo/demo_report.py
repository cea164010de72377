"""The CPU demo's report: PNG plots of the training metrics and a markdown summary with the final table.

Inputs are what the stages wrote: verl's per-step ``metrics.jsonl`` of each trainer run, the
weight fingerprints of ``weight_probe.jsonl``, the eval CLI's per-problem records and summaries.
The verdict sentence is computed from the numbers (with a standard error over problems), never
written in advance.
"""

from __future__ import annotations

import math
from pathlib import Path

COLORS = {"iib_lpo": "tab:red", "grpo": "tab:blue", "warm_start": "tab:gray", "warm_start_repeat": "silver"}
LABELS = {"iib_lpo": "I2B-LPO", "grpo": "GRPO", "warm_start": "warm start",
          "warm_start_repeat": "warm start (evaluated again: control)"}


def _series(metrics: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for m in metrics:
        if key in m and m[key] is not None and not (isinstance(m[key], float) and math.isnan(m[key])):
            xs.append(m["step"])
            ys.append(float(m[key]))
    return xs, ys


def write_plots(runs: dict[str, list[dict]], eval_results: dict[str, dict], plots_dir: Path) -> list[Path]:
    """One PNG per view; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []

    from matplotlib.ticker import MaxNLocator

    def save(fig, name):
        for ax in fig.axes:
            if ax.get_xlabel() == "training step":
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        path = plots_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # reward and accuracy per step
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for algo, metrics in runs.items():
        axes[0].plot(*_series(metrics, "critic/score/mean"), "o-", color=COLORS[algo], label=LABELS[algo])
        if algo == "iib_lpo":
            axes[1].plot(*_series(metrics, "iib_lpo/acc_initial"), "o-", color=COLORS[algo], label="I2B-LPO initial rollouts")
            axes[1].plot(*_series(metrics, "iib_lpo/acc_branch"), "s--", color=COLORS[algo], alpha=0.6, label="I2B-LPO latent branches")
        else:
            axes[1].plot(*_series(metrics, "critic/score/mean"), "o-", color=COLORS[algo], label=f"{LABELS[algo]} samples")
    axes[0].set_title("mean reward r_v of all trajectories (binary)")
    axes[1].set_title("accuracy of the step's samples")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, "reward_accuracy.png")

    for key, title, name in (("actor/entropy", "policy entropy (actor/entropy, nats per token)", "entropy.png"),
                             ("response_length/mean", "mean response length (tokens)", "response_length.png"),
                             ("timing_s/step", "step time (s)", "step_time.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for algo, metrics in runs.items():
            ax.plot(*_series(metrics, key), "o-", color=COLORS[algo], label=LABELS[algo])
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, name)

    if "iib_lpo" in runs:
        metrics = runs["iib_lpo"]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(*_series(metrics, "iib_lpo/fork_rate"), "o-", label="fork rate (initial rollouts forked)")
        ax.plot(*_series(metrics, "iib_lpo/keep_rate"), "s-", label="keep rate (branches kept by the IB filter)")
        ax.plot(*_series(metrics, "iib_lpo/latent_status/injected"), "^--", label="branches with the latent injected")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("I2B-LPO: fork and keep rates")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "fork_keep_rates.png")

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(*_series(metrics, "iib_lpo/ib_score_kept"), "o-", color="tab:green", label="kept")
        ax.plot(*_series(metrics, "iib_lpo/ib_score_dropped"), "x-", color="tab:orange", label="dropped")
        ax.set_title("I2B-LPO: mean IB score S_IB of kept vs dropped trajectories")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "ib_scores.png")

    if eval_results:
        names = list(eval_results)
        n = eval_results[names[0]]["metrics"]["n"]
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            m = eval_results[name]["metrics"]
            values = [m["p_at_1"], m["p_at_n"], m.get("maj_at_n", float("nan"))]
            xs = [j + i * width for j in range(len(values))]
            bars = ax.bar(xs, values, width, color=COLORS.get(name, None), label=LABELS.get(name, name))
            for bar, v in zip(bars, values):
                ax.annotate(f"{v:.0%}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(3)], ["P@1", f"P@{n}", f"maj@{n}"])
        ax.set_ylim(0, 1.05)
        ax.set_title(f"held-out evaluation ({eval_results[names[0]]['metrics']['num_problems']} problems, n={n})")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        save(fig, "final_eval.png")
    return written


def _p1_stderr(records: list[dict]) -> float:
    """Standard error of P@1 over problems (per-problem mean accuracy)."""
    per = [sum(r["correct"]) / len(r["correct"]) for r in records]
    if len(per) < 2:
        return float("nan")
    mean = sum(per) / len(per)
    var = sum((x - mean) ** 2 for x in per) / (len(per) - 1)
    return math.sqrt(var / len(per))


def _paired_diff(a: list[dict], b: list[dict]) -> tuple[float, float]:
    """Mean and standard error of the per-problem P@1 difference a - b (same problems, same seeds)."""
    by_id = {r["problem_id"]: sum(r["correct"]) / len(r["correct"]) for r in b}
    diffs = [sum(r["correct"]) / len(r["correct"]) - by_id[r["problem_id"]] for r in a if r["problem_id"] in by_id]
    if len(diffs) < 2:
        return float("nan"), float("nan")
    mean = sum(diffs) / len(diffs)
    var = sum((x - mean) ** 2 for x in diffs) / (len(diffs) - 1)
    return mean, math.sqrt(var / len(diffs))


def verdict(eval_results: dict[str, dict]) -> str | None:
    """One sentence on I2B-LPO vs GRPO (and each vs the warm start), from the numbers."""
    if not {"iib_lpo", "grpo"} <= set(eval_results):
        return None
    p = {k: v["metrics"]["p_at_1"] for k, v in eval_results.items()}
    diff, se = _paired_diff(eval_results["iib_lpo"]["records"], eval_results["grpo"]["records"])
    if math.isnan(se) or abs(diff) <= 2 * se:
        outcome = (f"I2B-LPO did not beat GRPO beyond noise at this scale: held-out P@1 {p['iib_lpo']:.1%} vs {p['grpo']:.1%} "
                   f"(difference {diff:+.1%} +- {se:.1%} s.e. over problems: within 2 s.e.)")
    elif diff > 0:
        outcome = (f"I2B-LPO beat GRPO on this run: held-out P@1 {p['iib_lpo']:.1%} vs {p['grpo']:.1%} "
                   f"(difference {diff:+.1%} +- {se:.1%} s.e. over problems)")
    else:
        outcome = (f"I2B-LPO did not beat GRPO at this scale; GRPO scored higher: held-out P@1 {p['iib_lpo']:.1%} vs "
                   f"{p['grpo']:.1%} (difference {diff:+.1%} +- {se:.1%} s.e. over problems)")
    if "warm_start" in p:
        outcome += f"; warm start {p['warm_start']:.1%}."
    return outcome


def _fmt(x, pct=False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.1%}" if pct else f"{x:.3f}"


def outputs_changed(a: list[dict], b: list[dict]) -> dict:
    """How many problems' sampled texts differ between two evaluated models (same prompts, same seeds)."""
    by_id = {r["problem_id"]: r["samples"] for r in b}
    common = [r for r in a if r["problem_id"] in by_id]
    differ = sum(1 for r in common if r["samples"] != by_id[r["problem_id"]])
    return {"problems": len(common), "differ": differ}


def write_report(plan, out: Path, ctx: dict, timings: dict) -> dict:
    """``<out>/report.md`` + ``<out>/plots/*.png``; returns their paths and the verdict."""
    from recipe.iib_lpo.cpu_run import CpuRun

    runs = {algo: ctx[algo]["run"].metrics() for algo in plan.algos}
    probes = {algo: CpuRun(0, ctx[algo]["run"].out_dir).weight_fingerprints() for algo in plan.algos}
    eval_results = ctx["eval"]["results"]
    plots = write_plots(runs, eval_results, out / "plots")
    text = verdict(eval_results)
    warm = ctx["warm"]["record"]
    w = warm["config"]
    lines = [
        "# I2B-LPO CPU demo: report",
        "",
        f"Seed {plan.seed}; {plan.steps} training steps per algorithm; {plan.prompts_per_step} prompts per step x "
        f"{plan.trajectories_per_prompt} trajectories per prompt (I2B-LPO: {plan.num_initial} initial rollouts x "
        f"(1 + {plan.num_branches} latent branches), GRPO: {plan.trajectories_per_prompt} plain samples); same prompts, "
        f"seed and warm start for both; actor lr {plan.actor_lr:g}, response length <= {plan.max_response_length} tokens. "
        "Tiny model on CPU: the numbers show the pipeline working, not the paper's effect sizes.",
        "",
    ]
    if text:
        lines += [f"**Outcome.** {text}", ""]
    lines += [
        "## Warm start",
        "",
        f"Qwen2, hidden {w['hidden_size']}, {w['num_layers']} layers, {warm['num_parameters'] / 1e6:.2f} M parameters, "
        f"a {w['vocab_size']}-token BPE tokenizer trained on the demo corpus (digits split); supervised phase: "
        f"{w['steps']} steps x batch {w['batch_size']} on {w['sft_problems']} problems' step-by-step solutions "
        f"(plain transformers loop, AdamW lr {w['lr']:g}), {warm['sft_seconds']:.0f} s. Greedy held-out accuracy "
        f"{warm['heldout_greedy_accuracy']:.1%} ({warm['heldout_problems']} problems). Loss curve: "
        + ", ".join(f"{c['step']}: {c['loss']:.2f}" for c in warm["loss_curve"]) + ".",
        "",
        "## Held-out evaluation (`python -m recipe.iib_lpo.eval run`)",
        "",
    ]
    e0 = next(iter(eval_results.values()))["metrics"]
    n = e0["n"]
    lines += [
        f"{e0['num_problems']} held-out problems, n = {n} samples each, temperature {plan.eval_temperature}, "
        f"top-p {plan.eval_top_p}, at most {plan.eval_max_tokens} tokens, the same per-problem seeds for every model. "
        "Diversity columns are 1 - similarity (higher = more diverse).",
        "",
        f"| model | P@1 | s.e. | P@{n} | maj@{n} | #Tok | Distinct-1 | Distinct-4 | Self-BLEU div. | Rep-4 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in eval_results.items():
        m = r["metrics"]
        lines.append(
            f"| {LABELS.get(name, name)} | {_fmt(m['p_at_1'], True)} | {_fmt(_p1_stderr(r['records']), True)} | "
            f"{_fmt(m['p_at_n'], True)} | {_fmt(m.get('maj_at_n'), True)} | {m['mean_tokens']:.1f} | "
            f"{_fmt(m.get('distinct_1'))} | {_fmt(m.get('distinct_4'))} | {_fmt(m.get('self_bleu_diversity'))} | "
            f"{_fmt(m.get('rep4'))} |")
    lines += ["", f"The eval CLI's own tables and plots: `{ctx['eval']['results_md']}`, `{ctx['eval']['dir'] / 'plots'}`.", ""]
    if "warm_start" in eval_results:
        lines += ["Did the trained weights change what the engine generates? Same prompts, same seeds:", ""]
        for algo in plan.algos:
            c = outputs_changed(eval_results[algo]["records"], eval_results["warm_start"]["records"])
            lines.append(f"- {LABELS[algo]} vs warm start: samples differ on {c['differ']} of {c['problems']} problems.")
        lines.append("")
    lines += ["## Training (verl's trainer, `python -m recipe.iib_lpo.main +profile=cpu`)", ""]
    for algo in plan.algos:
        metrics = runs[algo]
        prints = probes[algo]
        changed = sum(1 for a, b in zip(prints, prints[1:]) if a != b)
        lines += [
            f"### {LABELS[algo]}",
            "",
            f"Weights inside the vLLM worker (fingerprints after each sync): {len(prints)} syncs, the weights changed "
            f"at {changed} of {max(0, len(prints) - 1)} syncs after a training step. Log: `{ctx[algo]['run'].log}`.",
            "",
        ]
        if algo == "iib_lpo":
            lines += ["| step | reward | acc initial | acc branches | fork rate | keep rate | latent injected | S_IB kept | S_IB dropped | entropy | length | step s |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for m in metrics:
                lines.append("| " + " | ".join([str(m["step"]), _fmt(m.get("critic/score/mean")), _fmt(m.get("iib_lpo/acc_initial")),
                             _fmt(m.get("iib_lpo/acc_branch")), _fmt(m.get("iib_lpo/fork_rate")), _fmt(m.get("iib_lpo/keep_rate")),
                             _fmt(m.get("iib_lpo/latent_status/injected")), _fmt(m.get("iib_lpo/ib_score_kept")),
                             _fmt(m.get("iib_lpo/ib_score_dropped")), _fmt(m.get("actor/entropy")),
                             f"{m.get('response_length/mean', float('nan')):.1f}", f"{m.get('timing_s/step', float('nan')):.1f}"]) + " |")
        else:
            lines += ["| step | reward (= accuracy) | entropy | length | pg loss | step s |", "|---|---|---|---|---|---|"]
            for m in metrics:
                lines.append("| " + " | ".join([str(m["step"]), _fmt(m.get("critic/score/mean")), _fmt(m.get("actor/entropy")),
                             f"{m.get('response_length/mean', float('nan')):.1f}", _fmt(m.get("actor/pg_loss")),
                             f"{m.get('timing_s/step', float('nan')):.1f}"]) + " |")
        lines.append("")
    lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    lines += ["## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    lines += ["", "Stages reused from an earlier run with the same settings take ~0 s here (see `stage.json` in each folder)."]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return {"report": report, "plots": plots, "verdict": text}
