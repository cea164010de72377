"""Training-step breakdown of I2B-LPO and GRPO from the trainer's own timing metrics, on CPU.

    python -m bench.trainer_breakdown --out outputs/bench/trainer [--steps 3] [--timeout-s 1500]
    python -m bench.trainer_breakdown --out outputs/bench/step_ratio --arms grpo iib_lpo iib_lpo_mask \
        --repeats 5 --steps 2                                  # alternating repeats: the step-time ratio
    python -m bench.trainer_breakdown report --out outputs/bench/step_ratio   # tables from runs.jsonl

Arms: ``grpo``, ``iib_lpo`` (the recipe's defaults: dropped rows left out of the actor update) and
``iib_lpo_mask`` (``iib_lpo.advantage.dropped_rows=mask``: they go through it under a zero mask).
With ``--repeats R`` the arms alternate (listed order on even repeats, reversed on odd ones), every
run appends one line to ``runs.jsonl`` (arm, repeat, load before / after, every step's ``timing_s/*``),
and ``report`` gives each arm's ratio to ``grpo`` within a repeat (median over the steps after
the first of ``timing_s/step`` and ``timing_s/update_actor``), as median (min-max) over repeats.

Runs ``python -m recipe.iib_lpo.main +profile=cpu`` once per algorithm (the command
``recipe.iib_lpo.trainer.cpu_run`` builds, same tiny random Qwen2, demo data, M=2 / K=3 = 8 trajectories
per prompt for both, seed 0, the parity reward of tests/test_trainer_cpu.py so rewards vary) and
summarises verl's ``timing_s/*`` (and the recipe's ``timing_s/iib_lpo_ib_filter_adv``) from each
run's ``metrics.jsonl`` into ``breakdown.json``.

Each run is a subprocess in its own session with a hard timeout. Unlike ``cpu_run`` this does not
call ``ray stop --force`` afterwards (that stops every Ray cluster on the machine, other users'
included): the run gets its own Ray temp dir, its process group is killed, and any process still
naming that temp dir is killed by pid.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PARITY_REWARD = REPO_ROOT / "tests" / "helpers" / "parity_reward.py"
ALGORITHMS = ("grpo", "iib_lpo")
# arm -> (algorithm, extra Hydra overrides)
ARMS = {"grpo": ("grpo", []), "iib_lpo": ("iib_lpo", []),
        "iib_lpo_mask": ("iib_lpo", ["iib_lpo.advantage.dropped_rows=mask"])}
RATIO_KEYS = ("timing_s/step", "timing_s/update_actor", "timing_s/gen", "timing_s/old_log_prob")


def prepare_trainer_artifacts(root: Path, seed: int = 0) -> dict:
    """Tiny Qwen2, demo data (48 problems) and a random CVAE (prefix scheme), as tests/test_trainer_cpu.py."""
    import torch

    from recipe.iib_lpo.latent.cvae import CVAEConfig, LatentCVAE, save_cvae_checkpoint
    from recipe.iib_lpo.demo.data import prepare_demo_data
    from recipe.iib_lpo.latent.text_encoder import build_tiny_encoder_dir
    from recipe.iib_lpo.demo.tiny_models import build_tiny_model_dir, latent_placeholder_token_id

    root.mkdir(parents=True, exist_ok=True)
    model_dir = build_tiny_model_dir(root / "model", family="qwen2", seed=seed)
    data_dir = prepare_demo_data(root, num_problems=48, seed=seed)
    encoder_dir = build_tiny_encoder_dir(root / "encoder", hidden_size=32, seed=seed)
    hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
    torch.manual_seed(seed)
    cvae = LatentCVAE(CVAEConfig(embed_dim=32, latent_dim=8, hidden_width=32, policy_hidden_size=hidden,
                                 projector_hidden_width=32, projector_init_std=0.5))
    checkpoint = save_cvae_checkpoint(root / "cvae.pt", cvae, encoder_name=str(encoder_dir), mode="prefix")
    return {"model": model_dir, "train": data_dir / "demo_train.parquet", "val": data_dir / "demo_val.parquet",
            "cvae": Path(checkpoint), "placeholder": latent_placeholder_token_id(model_dir)}


def _kill_tree(pgid: int, ray_temp_dir: Path) -> None:
    """Kill what a run started in its own session ``pgid`` (= its pid): the session's processes
    (vLLM's engine core re-parents to init but keeps the session) and anything naming its Ray temp dir."""
    kill_session(pgid, str(ray_temp_dir))


def kill_session(sid: int, marker: str | None = None) -> None:
    """SIGKILL every process of session ``sid`` and every process whose command line contains ``marker``."""
    for _ in range(3):
        left = _pids_in_session(sid) + (_pids_naming(marker) if marker else [])
        if not left:
            return
        for pid in set(left):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(1.0)


def _pids_in_session(sid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ...
        if fields[0] != "Z" and int(fields[3]) == sid:
            out.append(int(entry.name))
    return out


def _pids_naming(text: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            out.append(int(entry.name))
    return out


def run_trainer(artifacts: dict, algorithm: str, out_dir: Path, steps: int, timeout_s: float,
                extra_overrides: list[str] | None = None) -> dict:
    """One CPU training run; returns {"returncode", "timed_out", "wall_s", "metrics": [per-step dicts]}."""
    from recipe.iib_lpo.trainer.cpu_run import CPU_ENV, CpuRun, CpuRunSpec

    out_dir.mkdir(parents=True, exist_ok=True)
    ray_temp_dir = Path(f"/tmp/rbt_{algorithm}_{os.getpid()}")
    spec = CpuRunSpec(
        model_dir=artifacts["model"], train_file=artifacts["train"], val_file=artifacts["val"], out_dir=out_dir,
        algorithm=algorithm, steps=steps, num_initial=2, num_branches=3,
        cvae_checkpoint=artifacts["cvae"] if algorithm == "iib_lpo" else None,
        placeholder_token_id=artifacts["placeholder"],
        overrides=[f"reward.custom_reward_function.path={PARITY_REWARD}",
                   f"+ray_kwargs.ray_init._temp_dir={ray_temp_dir}", *(extra_overrides or [])],
    )
    # RAY_memory_monitor_refresh_ms=0: Ray's node-level memory monitor would kill this run's workers
    # when OTHER jobs on a shared machine push memory over 95 % (the kernel OOM killer still applies).
    env = {**os.environ, **CPU_ENV, "RAY_memory_monitor_refresh_ms": "0",
           "VERL_FILE_LOGGER_PATH": str(out_dir / "metrics.jsonl"),
           "IIB_LPO_WEIGHT_PROBE_FILE": str(out_dir / "weight_probe.jsonl")}
    metrics_path = out_dir / "metrics.jsonl"
    if metrics_path.exists():
        metrics_path.unlink()
    cmd = [sys.executable, "-m", "recipe.iib_lpo.main", *spec.hydra_overrides()]
    start = time.time()
    timed_out = False
    with open(out_dir / "train.log", "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            returncode, timed_out = -1, True
        finally:
            _kill_tree(proc.pid, ray_temp_dir)
            proc.wait()
    if returncode == 0:  # Ray's session logs are kept only for a failed run
        shutil.rmtree(ray_temp_dir, ignore_errors=True)
    return {"algorithm": algorithm, "returncode": returncode, "timed_out": timed_out, "wall_s": time.time() - start,
            "command": portable_command(cmd), "metrics": CpuRun(returncode, out_dir).metrics()}


TIMING_KEYS = ("timing_s/gen", "timing_s/reward", "timing_s/old_log_prob", "timing_s/ref", "timing_s/adv",
               "timing_s/iib_lpo_ib_filter_adv", "timing_s/update_actor", "timing_s/update_weights",
               "timing_s/save_checkpoint", "timing_s/step")


def summarize(run: dict) -> dict:
    """Per-step timing (all ``timing_s/*`` keys) and, for I2B-LPO, the IB share of the step."""
    steps = []
    for m in run["metrics"]:
        timing = {k: float(v) for k, v in m.items() if k.startswith("timing_s/")}
        row = {"step": m["step"], "timing": timing,
               "response_length_mean": m.get("response_length/mean"),
               "total_num_tokens": m.get("perf/total_num_tokens")}
        if "timing_s/iib_lpo_ib_filter_adv" in timing and timing.get("timing_s/step"):
            row["ib_share_of_step"] = timing["timing_s/iib_lpo_ib_filter_adv"] / timing["timing_s/step"]
        for key in ("iib_lpo/generated_vs_plain", "iib_lpo/prefix_cache_hit", "iib_lpo/generated_tokens_per_prompt"):
            if key in m:
                row[key] = m[key]
        steps.append(row)
    return {k: run[k] for k in ("algorithm", "returncode", "timed_out", "wall_s", "command")} | {"steps": steps}


def arm_order(arms: list[str], repeat: int) -> list[str]:
    """The arms in the order repeat ``repeat`` runs them: as listed on even repeats, reversed on odd ones."""
    return list(arms) if repeat % 2 == 0 else list(reversed(arms))


def step_ratios(runs: list[dict], reference: str = "grpo") -> dict:
    """{arm: {key: {"median", "min", "max", "n"}}} of arm / ``reference`` per repeat, each run's value
    being the median of ``key`` over its steps after the first (step 1 pays start-up costs). Runs that
    failed and repeats without the reference are left out."""
    per_run: dict[tuple[int, str], dict[str, float]] = {}
    for run in runs:
        if run.get("returncode") != 0:
            continue
        later = [row["timing"] for row in run["steps"] if row["step"] > 1]
        per_run[(run["repeat"], run["arm"])] = {
            key: statistics.median([t[key] for t in later]) for key in RATIO_KEYS if later and all(key in t for t in later)}
    out: dict[str, dict] = {}
    for (repeat, arm), values in sorted(per_run.items()):
        ref = per_run.get((repeat, reference))
        if arm == reference or ref is None:
            continue
        for key, value in values.items():
            if ref.get(key):
                out.setdefault(arm, {}).setdefault(key, []).append(value / ref[key])
    return {arm: {key: {"median": statistics.median(r), "min": min(r), "max": max(r), "n": len(r)} for key, r in keys.items()}
            for arm, keys in out.items()}


def load_runs(out: Path) -> list[dict]:
    """The runs of an alternating measurement (``out``/runs.jsonl), [] when there is none."""
    path = out / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def portable_command(cmd: list[str]) -> str:
    """``cmd`` as a line without this machine's paths (the interpreter and the repository root)."""
    line = " ".join(["python" if part == sys.executable else part for part in cmd])
    return line.replace(str(REPO_ROOT) + "/", "")


def _report(out: Path) -> int:
    runs = load_runs(out)
    loads = [x for run in runs for x in (run["load_before"][0], run["load_after"][0])]
    print(f"{len(runs)} runs, load1 {min(loads):.1f}-{max(loads):.1f}")
    print("| arm | " + " | ".join(f"{k.split('/')[-1]} ratio to GRPO" for k in RATIO_KEYS) + " | repeats |")
    print("|---|" + "---|" * (len(RATIO_KEYS) + 1))
    for arm, keys in step_ratios(runs).items():
        cells = [f"{keys[k]['median']:.3f} ({keys[k]['min']:.3f}-{keys[k]['max']:.3f})" if k in keys else "-"
                 for k in RATIO_KEYS]
        print(f"| {arm} | " + " | ".join(cells) + f" | {max(v['n'] for v in keys.values())} |")
    return 0


def _alternate(args) -> int:
    artifacts = prepare_trainer_artifacts(args.out / "artifacts")
    ok = True
    for repeat in range(args.repeats):
        for arm in arm_order(args.arms, repeat):
            algorithm, overrides = ARMS[arm]
            load = os.getloadavg()
            run = run_trainer(artifacts, algorithm, args.out / f"{arm}_{repeat}", args.steps, args.timeout_s,
                              overrides + args.override)
            summary = summarize(run) | {"arm": arm, "repeat": repeat, "load_before": load,
                                        "load_after": os.getloadavg()}
            ok = ok and run["returncode"] == 0
            with open(args.out / "runs.jsonl", "a") as f:
                f.write(json.dumps(summary) + "\n")
            step_s = [row["timing"].get("timing_s/step") for row in summary["steps"]]
            print(f"repeat {repeat + 1}/{args.repeats} {arm}: rc {run['returncode']}, step s {step_s}", flush=True)
    return _report(args.out) if ok else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["report"]:
        parser = argparse.ArgumentParser(description="tables of a finished alternating run")
        parser.add_argument("--out", type=Path, required=True)
        return _report(parser.parse_args(argv[1:]).out)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "outputs" / "bench" / "trainer")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--timeout-s", type=float, default=1500.0, help="hard limit per training run")
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--override", action="append", default=[], help="extra Hydra override (both runs)")
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=None,
                        help="alternate these arms (with --repeats) instead of one run per --algorithms")
    parser.add_argument("--repeats", type=int, default=1, help="alternating repeats of --arms")
    args = parser.parse_args(argv)
    if args.arms:
        if "grpo" not in args.arms:
            parser.error("--arms needs grpo: every ratio is to GRPO's run of the same repeat")
        args.out.mkdir(parents=True, exist_ok=True)
        return _alternate(args)
    artifacts = prepare_trainer_artifacts(args.out / "artifacts")
    results = {"load_before": os.getloadavg(), "steps": args.steps, "overrides": args.override, "runs": {}}
    for algorithm in args.algorithms:
        load = os.getloadavg()
        run = run_trainer(artifacts, algorithm, args.out / algorithm, args.steps, args.timeout_s, args.override)
        summary = summarize(run)
        summary["load_before"], summary["load_after"] = load, os.getloadavg()
        results["runs"][algorithm] = summary
        print(json.dumps({k: v for k, v in summary.items() if k != "steps"}), flush=True)
        for row in summary["steps"]:
            print(json.dumps(row), flush=True)
        (args.out / "breakdown.json").write_text(json.dumps(results, indent=2))
    ok = all(r["returncode"] == 0 for r in results["runs"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
