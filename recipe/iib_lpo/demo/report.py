"""The CPU demo's report: PNG plots of the training metrics and a markdown summary with the final table.

Inputs are what the stages wrote: verl's per-step ``metrics.jsonl`` of each trainer run, the
weight fingerprints of ``weight_probe.jsonl``, the eval CLI's per-problem records and summaries.
The verdict sentence is computed from the numbers (with a standard error over problems), never
written in advance.
"""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

COLORS = {"iib_lpo": "tab:red", "grpo": "tab:blue", "warm_start": "tab:gray", "warm_start_repeat": "silver"}
LABELS = {"iib_lpo": "I2B-LPO", "grpo": "GRPO", "warm_start": "warm start",
          "warm_start_repeat": "warm start (evaluated again: control)"}
# the compared models, in the order of the paired differences (later minus earlier); the
# warm_start_repeat control is left out of the summary and the pairs
MODEL_ORDER = ("warm_start", "grpo", "iib_lpo")
CONTROL_MODELS = ("warm_start_repeat",)
SMOOTH_WINDOW = 5

# diagnostics.png: (key, fallback key or None, panel title), one panel each
DIAGNOSTIC_PANELS = (
    ("diagnostics/zero_variance_groups", None, "zero-variance groups (share of prompts, all rewards equal)"),
    ("actor/grad_norm", None, "actor/grad_norm"),
    ("actor/pg_clipfrac", None, "actor/pg_clipfrac"),
    ("actor/ppo_kl", None, "actor/ppo_kl"),
    ("training/rollout_probs_diff_mean", "rollout_corr/k3_kl", "vLLM vs FSDP log-prob mismatch"),
    ("actor/entropy", None, "actor/entropy (nats per token)"),
)
# the report's diagnostics table: the panels' keys and two more mismatch measures
DIAGNOSTIC_TABLE_KEYS = (
    "diagnostics/zero_variance_groups", "actor/grad_norm", "actor/pg_clipfrac", "actor/ppo_kl",
    "training/rollout_probs_diff_mean", "actor/entropy", "rollout_corr/k3_kl", "training/rollout_probs_diff_max",
)

# verl 0.9.1 (trainer/ppo/v1/trainer_base.py _val_metrics_update, metric_utils.process_validation_metrics):
# "val-core/<data_source>/<var>/mean@<N>", var = "acc" when the reward function returns an "acc"
# field (this recipe's does), else "reward"; the data source may itself contain "/"
_VAL_CORE_MEAN = re.compile(r"^val-core/(?P<source>.+)/(?P<var>[^/]+)/mean@(?P<n>\d+)$")
_VAL_VARS = ("acc", "reward")  # preference order


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _series(metrics: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over the rows that have a finite value for it."""
    xs, ys = [], []
    for m in metrics:
        if key in m and _finite(m[key]):
            xs.append(m["step"])
            ys.append(float(m[key]))
    return xs, ys


def _training_rows(metrics: list[dict]) -> list[dict]:
    """The rows of training steps: a row with only validation keys (e.g. verl's step-0 row of
    ``val_before_train``) is left out."""
    return [m for m in metrics if any(k != "step" and not k.startswith(("val-core/", "val-aux/")) for k in m)]


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average: ``out[i]`` is the mean of ``values[max(0, i - window + 1) : i + 1]``
    (the first points average over what exists so far; same length as ``values``).
    ``smooth([0, 1, 2, 3], 2) == [0, 0.5, 1.5, 2.5]``. ``window`` must be >= 1."""
    if window < 1:
        raise ValueError(f"smooth: window must be >= 1, got {window}")
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1): i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def _validation_value(row: dict) -> float | None:
    """The validation P@1 of one metrics row (see ``validation_series``), or None if it has none."""
    # per data source: {var: {N: value}}
    found: dict[str, dict[str, dict[int, float]]] = {}
    for key, value in row.items():
        match = _VAL_CORE_MEAN.match(key)
        if match and match["var"] in _VAL_VARS and _finite(value):
            found.setdefault(match["source"], {}).setdefault(match["var"], {})[int(match["n"])] = float(value)
    per_source = []
    for by_var in found.values():
        var = next(v for v in _VAL_VARS if v in by_var)
        per_source.append(by_var[var][max(by_var[var])])  # the largest N's mean@N
    return sum(per_source) / len(per_source) if per_source else None


def validation_series(metrics: list[dict]) -> tuple[list[int], list[float]]:
    """(steps, values) of verl's validation P@1 over the metrics rows that carry validation.

    Per row and data source the key is ``val-core/<data_source>/acc/mean@<N>`` (verl's core
    variable when the reward returns ``acc``), else ``val-core/<data_source>/reward/mean@<N>``;
    of several N the largest; several data sources are averaged (unweighted). Rows without such a
    key are skipped; validation-only rows (the step-0 row of ``val_before_train``) count like any
    other. Steps are in the rows' order."""
    steps, values = [], []
    for m in metrics:
        v = _validation_value(m)
        if v is not None:
            steps.append(m["step"])
            values.append(v)
    return steps, values


def _diagnostic_series(metrics: list[dict], key: str, fallback: str | None) -> tuple[list[int], list[float], str]:
    """``_series`` of key, or of the fallback key where key was never logged; and the key used."""
    xs, ys = _series(metrics, key)
    if not xs and fallback:
        xs, ys = _series(metrics, fallback)
        return xs, ys, fallback
    return xs, ys, key


def diagnostic_stats(metrics: list[dict], keys=DIAGNOSTIC_TABLE_KEYS) -> dict[str, dict]:
    """Per key logged with a finite value in at least one row: ``{"median", "min", "max", "steps"}``
    over the steps (``steps`` = how many rows had it). Keys never logged are left out."""
    out = {}
    for key in keys:
        _, ys = _series(metrics, key)
        if ys:
            out[key] = {"median": statistics.median(ys), "min": min(ys), "max": max(ys), "steps": len(ys)}
    return out


def diagnostic_sentence(label: str, stats: dict[str, dict]) -> str:
    """One sentence on one algorithm's diagnostics, from ``diagnostic_stats``' numbers."""
    parts = []
    if (z := stats.get("diagnostics/zero_variance_groups")) is not None:
        parts.append(f"zero-variance groups: median {z['median']:.2f} of prompts carried no signal "
                     f"(range {z['min']:.2f}-{z['max']:.2f})")
    if (g := stats.get("actor/grad_norm")) is not None:
        parts.append(f"grad norm median {g['median']:.3g} (range {g['min']:.3g}-{g['max']:.3g})")
    if (c := stats.get("actor/pg_clipfrac")) is not None:
        parts.append(f"median clip fraction {c['median']:.3f}")
    if (k := stats.get("actor/ppo_kl")) is not None:
        parts.append(f"median PPO KL {k['median']:.2g}")
    mismatch = stats.get("training/rollout_probs_diff_mean")
    if mismatch is not None:
        text = f"vLLM-FSDP log-prob difference median {mismatch['median']:.2g}"
        if (mx := stats.get("training/rollout_probs_diff_max")) is not None:
            text += f" (largest single-token difference {mx['max']:.2g})"
        parts.append(text)
    elif (k3 := stats.get("rollout_corr/k3_kl")) is not None:
        parts.append(f"vLLM-FSDP k3 KL median {k3['median']:.2g}")
    if (e := stats.get("actor/entropy")) is not None:
        parts.append(f"entropy {e['max']:.3g} at most, {e['min']:.3g} at least (median {e['median']:.3g})")
    if not parts:
        return f"{label}: no diagnostics were logged."
    return f"{label}: " + "; ".join(parts) + "."


def write_plots(runs: dict[str, list[dict]], eval_results: dict[str, dict], plots_dir: Path,
                solution_kinds: dict[str, dict] | None = None) -> list[Path]:
    """One PNG per view under ``plots_dir``; returns the paths written.

    ``runs``: algorithm -> verl's per-step metric rows (flat dicts with "step"; a validation-only
    row is allowed); ``eval_results``: model -> {"metrics", "records"} of the eval CLI (may be
    empty). Always written: reward_accuracy.png, diagnostics.png, entropy.png,
    response_length.png, step_time.png; with an ``iib_lpo`` run fork_keep_rates.png and
    ib_scores.png; with eval results final_eval.png; with ``solution_kinds`` (model ->
    ``solution_kind_shares``) solution_kinds.png. Metrics that were not logged are skipped."""
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

    # left: training reward (raw per step, faint; trailing mean, solid); right: verl's validation P@1
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    lowest = 0.0
    for algo, metrics in runs.items():
        color, label = COLORS.get(algo), LABELS.get(algo, algo)
        xs, ys = _series(metrics, "critic/score/mean")
        if xs:
            lowest = min(lowest, min(ys))
            axes[0].plot(xs, ys, "o", color=color, alpha=0.25, markersize=4)
            axes[0].plot(xs, smooth(ys, SMOOTH_WINDOW), "-", color=color, label=f"{label} reward")
        if algo == "iib_lpo":
            for key, marker, what in (("iib_lpo/acc_initial", "--", "initial-rollout acc."),
                                      ("iib_lpo/acc_branch", ":", "branch acc.")):
                xs, ys = _series(metrics, key)
                if xs:
                    axes[0].plot(xs, smooth(ys, SMOOTH_WINDOW), marker, color=color, alpha=0.8, label=f"{label} {what}")
        xs, ys = validation_series(metrics)
        if xs:
            axes[1].plot(xs, ys, "o-", color=color, label=label)
    axes[0].set_title(f"training reward (points: per step; lines: trailing mean of {SMOOTH_WINDOW})", fontsize=10)
    axes[1].set_title("validation P@1 (verl's validation, trainer.test_freq)", fontsize=10)
    if not axes[1].lines:
        axes[1].text(0.5, 0.5, "no validation metrics logged\n(trainer.test_freq <= 0)", ha="center", va="center",
                     transform=axes[1].transAxes, color="gray")
    for ax, low in zip(axes, (lowest, 0.0)):
        ax.set_xlabel("training step")
        ax.set_ylim(min(-0.02, low - 0.02), 1.02)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    save(fig, "reward_accuracy.png")

    # diagnostics: one panel per metric, one line per algorithm; a metric never logged is skipped
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for ax, (key, fallback, title) in zip(axes.flat, DIAGNOSTIC_PANELS):
        used = set()
        for algo, metrics in runs.items():
            xs, ys, used_key = _diagnostic_series(_training_rows(metrics), key, fallback)
            if xs:
                used.add(used_key)
                label = LABELS.get(algo, algo) + (f" ({used_key})" if used_key != key else "")
                ax.plot(xs, ys, "o-", color=COLORS.get(algo), markersize=3, label=label)
        ax.set_title(f"{title}\n({', '.join(sorted(used)) or key + ': not logged'})", fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    save(fig, "diagnostics.png")

    for key, title, name in (("actor/entropy", "policy entropy (actor/entropy, nats per token)", "entropy.png"),
                             ("response_length/mean", "mean response length (tokens)", "response_length.png"),
                             ("timing_s/step", "step time (s)", "step_time.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for algo, metrics in runs.items():
            ax.plot(*_series(metrics, key), "o-", color=COLORS.get(algo), label=LABELS.get(algo, algo))
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

    if solution_kinds:
        from data_prep.demo import SOLUTION_KINDS

        kind_colors = {"right": "tab:green", "misread": "tab:orange", "arithmetic_slip": "tab:red", "other": "tab:gray"}
        names = list(solution_kinds)
        fig, ax = plt.subplots(figsize=(8, 0.6 * len(names) + 1.6))
        left = [0.0] * len(names)
        for kind in SOLUTION_KINDS:
            shares = [solution_kinds[name][kind] for name in names]
            bars = ax.barh([LABELS.get(n, n) for n in names], shares, left=left, color=kind_colors[kind],
                           label=kind.replace("_", " "))
            for bar, share in zip(bars, shares):
                if share >= 0.06:
                    ax.annotate(f"{share:.0%}", (bar.get_x() + bar.get_width() / 2, bar.get_y() + bar.get_height() / 2),
                                ha="center", va="center", fontsize=8, color="white")
            left = [a + b for a, b in zip(left, shares)]
        ax.set_xlim(0, 1)
        ax.invert_yaxis()
        ax.set_title("held-out samples: right, last step misread, arithmetic slip, other")
        ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.12))
        save(fig, "solution_kinds.png")
    return written


def _p1_stderr(records: list[dict]) -> float:
    """Standard error of P@1 over problems (per-problem mean accuracy)."""
    return mean_and_stderr([sum(r["correct"]) / len(r["correct"]) for r in records])[1]


def _paired_diff(a: list[dict], b: list[dict]) -> tuple[float, float]:
    """Mean and standard error of the per-problem P@1 difference a - b (same problems, same seeds)."""
    by_id = {r["problem_id"]: sum(r["correct"]) / len(r["correct"]) for r in b}
    diffs = [sum(r["correct"]) / len(r["correct"]) - by_id[r["problem_id"]] for r in a if r["problem_id"] in by_id]
    return mean_and_stderr(diffs)


def heldout_problem_steps(parquet_path: Path) -> dict[str, tuple[int, list]]:
    """problem id (the eval records' ``problem_id``: ``extra_info.index``) -> (start, ops) of every row of
    a demo parquet, recovered from its reference solution (``data_prep.demo.solution_steps``)."""
    import pyarrow.parquet as pq

    from data_prep.demo import solution_steps

    rows = pq.read_table(parquet_path, columns=["extra_info"]).column("extra_info").to_pylist()
    return {str(r["index"]): solution_steps(r["solution"]) for r in rows}


def solution_kind_shares(records: list[dict], problems: dict[str, tuple[int, list]]) -> dict:
    """Share of every ``data_prep.demo.SOLUTION_KINDS`` among all samples of the eval ``records``
    (``classify_solution`` against the problem's (start, ops) in ``problems``), plus "samples": their
    number. A record whose problem is not in ``problems`` is an error (another split was evaluated)."""
    from data_prep.demo import SOLUTION_KINDS, classify_solution

    counts = dict.fromkeys(SOLUTION_KINDS, 0)
    for record in records:
        if record["problem_id"] not in problems:
            raise ValueError(f"eval record of problem {record['problem_id']!r} has no demo solution to compare with")
        start, ops = problems[record["problem_id"]]
        for text in record["samples"]:
            counts[classify_solution(text, start, ops)] += 1
    total = sum(counts.values())
    if total == 0:
        raise ValueError("no samples to classify")
    return {**{k: v / total for k, v in counts.items()}, "samples": total}


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (sample variance / n) of per-problem values; (nan, nan) below 2 values."""
    if len(values) < 2:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    var = sum((x - mean) ** 2 for x in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


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


def _undefined_to_none(x: float) -> float | None:
    return None if isinstance(x, float) and math.isnan(x) else x


def _common_problems(a: list[dict], b: list[dict]) -> int:
    ids = {r["problem_id"] for r in b}
    return sum(1 for r in a if r["problem_id"] in ids)


def compared_pairs(names) -> list[tuple[str, str]]:
    """(a, b) for every a later than b in ``MODEL_ORDER``, both in ``names``: the differences a - b
    (grpo - warm_start, iib_lpo - warm_start, iib_lpo - grpo)."""
    present = [m for m in MODEL_ORDER if m in names]
    return [(a, b) for i, b in enumerate(present) for a in present[i + 1:]]


REQUIRED_SETTINGS = ("steps", "prompts_per_step", "trajectories_per_prompt", "actor_lr", "seed",
                     "max_response_length", "eval_problems", "eval_n", "eval_temperature", "eval_top_p")
OPTIONAL_SETTINGS = ("lr_warmup_steps", "rollout_temperature", "test_freq", "validation_size", "heldout_size")


def build_summary(plan, eval_results: dict[str, dict], model_paths: dict[str, str],
                  validation: dict | None = None, solution_kinds: dict | None = None) -> dict:
    """The demo's machine-readable result (fractions, not percent), without the control
    ``warm_start_repeat``::

        {"heldout": {model: {"p_at_1", "p_at_k", "k", "se", "num_problems"}},
         "paired": {"<a>_minus_<b>": {"diff", "se", "num_problems"}},
         "models": {model: {"path"}},
         "settings": {...},
         "validation": validation,
         "solution_kinds": solution_kinds}

    ``heldout`` per evaluated model: P@1 and P@k (k = the eval's n) of the eval summary, the
    standard error of P@1 over problems, the number of problems. ``paired``: for every pair of
    ``compared_pairs`` the mean per-problem P@1 difference a - b over the problems both have, its
    standard error and that number of problems. A standard error (or a difference) that is
    undefined (fewer than 2 problems) is None. ``models``: ``model_paths`` as strings.
    ``settings``: ``REQUIRED_SETTINGS`` read from ``plan`` (None where it lacks one) and those of
    ``OPTIONAL_SETTINGS`` it has. ``validation`` and ``solution_kinds`` (model -> ``solution_kind_shares``)
    are passed through unchanged (may be None)."""
    heldout = {}
    for name, result in eval_results.items():
        if name in CONTROL_MODELS:
            continue
        m = result["metrics"]
        heldout[name] = {"p_at_1": float(m["p_at_1"]), "p_at_k": float(m["p_at_n"]), "k": int(m["n"]),
                         "se": _undefined_to_none(_p1_stderr(result["records"])),
                         "num_problems": int(m["num_problems"])}
    paired = {}
    for a, b in compared_pairs(eval_results):
        ra, rb = eval_results[a]["records"], eval_results[b]["records"]
        diff, se = _paired_diff(ra, rb)
        paired[f"{a}_minus_{b}"] = {"diff": _undefined_to_none(diff), "se": _undefined_to_none(se),
                                    "num_problems": _common_problems(ra, rb)}
    settings = {name: getattr(plan, name, None) for name in REQUIRED_SETTINGS}
    settings.update({name: getattr(plan, name) for name in OPTIONAL_SETTINGS if hasattr(plan, name)})
    return {
        "heldout": heldout,
        "paired": paired,
        "models": {name: {"path": str(path)} for name, path in model_paths.items() if name not in CONTROL_MODELS},
        "settings": settings,
        "validation": validation,
        "solution_kinds": solution_kinds,
    }


def _range(st: dict) -> str:
    return f"{st['min']:.3g} - {st['max']:.3g}"


def write_report(plan, out: Path, ctx: dict, timings: dict) -> dict:
    """``<out>/report.md`` + ``<out>/plots/*.png``; returns {"report": path, "plots": paths,
    "verdict": sentence or None, "summary": ``build_summary``'s dict} (model paths from
    ``ctx["eval_models"]`` when present; validation: per algorithm with validation metrics
    {"steps", "p_at_1"} of ``validation_series``, None when no run has any)."""
    from recipe.iib_lpo.trainer.cpu_run import CpuRun

    all_rows = {algo: ctx[algo]["run"].metrics() for algo in plan.algos}
    runs = {algo: _training_rows(rows) for algo, rows in all_rows.items()}
    probes = {algo: CpuRun(0, ctx[algo]["run"].out_dir).weight_fingerprints() for algo in plan.algos}
    eval_results = ctx["eval"]["results"]
    kinds = None
    if ctx.get("data", {}).get("heldout") is not None:
        problems = heldout_problem_steps(ctx["data"]["heldout"])
        kinds = {name: solution_kind_shares(r["records"], problems) for name, r in eval_results.items()
                 if name not in CONTROL_MODELS}
    plots = write_plots(all_rows, eval_results, out / "plots", kinds)
    val = {algo: validation_series(rows) for algo, rows in all_rows.items()}
    validation = {algo: {"steps": xs, "p_at_1": ys} for algo, (xs, ys) in val.items() if xs} or None
    summary = build_summary(plan, eval_results, dict(ctx.get("eval_models") or {}), validation, kinds)
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
        f"(plain transformers loop, AdamW lr {w['lr']:g}), {warm['sft_seconds']:.0f} s; "
        f"{w.get('misread_share', 0):.0%} of the supervised solutions misread their last step (README, \"Does it "
        f"learn?\"). Greedy accuracy {warm['validation_greedy_accuracy']:.1%} on {warm['validation_problems']} "
        "validation problems. Loss curve: "
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
    pairs = compared_pairs(eval_results)
    if pairs:
        lines += ["", "## Paired differences (held-out P@1)", "",
                  "Per-problem P@1 difference over the problems both models were evaluated on (same prompts, same "
                  "seeds); s.e. = standard error over problems.", "",
                  "| difference | diff | s.e. | problems |", "|---|---|---|---|"]
        for a, b in pairs:
            d = summary["paired"][f"{a}_minus_{b}"]
            diff = "-" if d["diff"] is None else f"{d['diff']:+.1%}"
            lines.append(f"| {LABELS.get(a, a)} - {LABELS.get(b, b)} | {diff} | {_fmt(d['se'], True)} | "
                         f"{d['num_problems']} |")
    if kinds:
        lines += ["", "## What the held-out samples did", "",
                  "Every sample against its problem's steps (`data_prep.demo.classify_solution`): right; the last "
                  "step's operator misread (the warm start's taught mistake, which RL should remove); an arithmetic "
                  "slip in some step; anything else.", "",
                  "| model | right | misread | arithmetic slip | other | samples |", "|---|---|---|---|---|---|"]
        for name, k in kinds.items():
            lines.append(f"| {LABELS.get(name, name)} | {k['right']:.1%} | {k['misread']:.1%} | "
                         f"{k['arithmetic_slip']:.1%} | {k['other']:.1%} | {k['samples']} |")
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
        xs, ys = val[algo]
        if xs:
            lines += ["", f"Validation P@1 (verl's validation): "
                      + ", ".join(f"step {x}: {y:.1%}" for x, y in zip(xs, ys)) + "."]
        lines.append("")
    lines += ["## Diagnostics", "",
              "Per training step, over the steps: median and min - max. Zero-variance groups: share of prompt "
              "groups whose rewards were all equal (no gradient signal); rollout_probs_diff / k3_kl: mismatch "
              "of the vLLM rollout log-probs and the FSDP actor's. Plot: `plots/diagnostics.png`.", ""]
    for algo in plan.algos:
        stats = diagnostic_stats(runs[algo])
        lines += [f"### {LABELS.get(algo, algo)}", "", "| metric | median | min - max | steps |", "|---|---|---|---|"]
        for key in DIAGNOSTIC_TABLE_KEYS:
            st = stats.get(key)
            lines.append(f"| `{key}` | {st['median']:.3g} | {_range(st)} | {st['steps']} |" if st
                         else f"| `{key}` | - | - | 0 |")
        lines += ["", diagnostic_sentence(LABELS.get(algo, algo), stats), ""]
    lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    lines += ["## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    lines += ["", "Stages reused from an earlier run with the same settings take ~0 s here (see `stage.json` in each folder)."]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return {"report": report, "plots": plots, "verdict": text, "summary": summary}
