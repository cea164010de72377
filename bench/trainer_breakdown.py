"""Training-step breakdown of I2B-LPO and GRPO from the trainer's own timing metrics, on CPU.

    python -m bench.trainer_breakdown --out outputs/bench/trainer [--steps 3] [--timeout-s 1500]

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
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PARITY_REWARD = REPO_ROOT / "tests" / "helpers" / "parity_reward.py"
ALGORITHMS = ("grpo", "iib_lpo")


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
            "command": " ".join(cmd), "metrics": CpuRun(returncode, out_dir).metrics()}


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "outputs" / "bench" / "trainer")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--timeout-s", type=float, default=1500.0, help="hard limit per training run")
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--override", action="append", default=[], help="extra Hydra override (both runs)")
    args = parser.parse_args(argv)
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
