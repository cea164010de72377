"""Launch ``python -m recipe.iib_lpo.main +profile=cpu`` as a subprocess (CPU tests, the CPU demo).

One place builds the command line and the environment of a CPU training run, so the tests and
the demo run exactly what a user would type. Every run has a hard timeout: on CPU a failure inside
the vLLM worker during weight sync shows up as a hang, not an error (VERL_CPU_TRAINER.md).

What a run writes under ``out_dir``: ``metrics.jsonl`` (verl's FileLogger: one line per step with
every logged metric), ``weight_probe.jsonl`` (``verl_patches.weight_sync_probe``: a fingerprint of
the vLLM worker's weights after each sync), ``ckpt/`` (verl checkpoints with the recipe's
``iib_lpo_state.json``), ``rollouts/<step>.jsonl`` with ``CpuRunSpec.dump_rollouts`` (verl's
generation dump, ``trainer.rollout_data_dir``, with each row's I2B-LPO step:
``ppo_trainer.STEP_ROW_FIELDS``), and ``train.log`` (all output of the run).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[3]

# Values measured to matter on CPU (ENVIRONMENT.md; run_scripts/cpu_env.sh sets the same).
CPU_ENV = {
    "VERL_PLATFORM": "cpu",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TORCH_COMPILE_DISABLE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
}


@dataclass
class CpuRun:
    """A finished CPU training run: its exit code and the files it wrote."""

    returncode: int
    out_dir: Path
    timed_out: bool = False

    @property
    def log(self) -> Path:
        return self.out_dir / "train.log"

    def metrics(self) -> list[dict]:
        """verl's per-step metric records (FileLogger lines ``{"step", "data"}``) as flat dicts, in step order."""
        path = self.out_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        rows = [json.loads(line) for line in lines if line.strip()]
        return sorted(({"step": r["step"], **r["data"]} for r in rows), key=lambda r: r["step"])

    def weight_fingerprints(self) -> list[str]:
        path = self.out_dir / "weight_probe.jsonl"
        if not path.exists():
            return []
        return [json.loads(line)["sha256"] for line in path.read_text().splitlines() if line.strip()]

    def rollout_rows(self) -> dict[int, list[dict]]:
        """Per step, the rows of verl's generation dump (``CpuRunSpec.dump_rollouts``): verl's ``input``,
        ``output``, ``score``, ``uid`` (the batch key ``{uid}_{session}_{index}``) and, for I2B-LPO, the
        trainer's ``STEP_ROW_FIELDS``."""
        out = {}
        for path in sorted((self.out_dir / "rollouts").glob("*.jsonl")):
            out[int(path.stem)] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return out


@dataclass
class CpuRunSpec:
    """The paths and sizes of one CPU run; ``overrides`` are extra Hydra overrides, applied last."""

    model_dir: Path
    train_file: Path
    val_file: Path
    out_dir: Path
    algorithm: str = "iib_lpo"  # iib_lpo | grpo
    steps: int = 2
    num_initial: int = 2
    num_branches: int = 3
    rounds: int = 1  # iib_lpo.ib.rounds (R): n = M x (1 + K x R)
    cvae_checkpoint: Path | None = None  # None -> latent.mode=none
    placeholder_token_id: int | None = None
    seed: int = 0
    dump_rollouts: bool = False  # trainer.rollout_data_dir=<out_dir>/rollouts (CpuRun.rollout_rows)
    overrides: list[str] = field(default_factory=list)

    def hydra_overrides(self) -> list[str]:
        n = self.num_initial * (1 + self.num_branches * self.rounds)
        out = [
            "+profile=cpu",
            f"actor_rollout_ref.model.path={self.model_dir}",
            f"data.train_files={self.train_file}",
            f"data.val_files={self.val_file}",
            f"actor_rollout_ref.rollout.n={n}",
            f"actor_rollout_ref.rollout.seed={self.seed}",
            f"data.seed={self.seed}",
            f"trainer.total_training_steps={self.steps}",
            f"trainer.default_local_dir={self.out_dir / 'ckpt'}",
            f"trainer.experiment_name={self.algorithm}",
            f"iib_lpo.num_initial_rollouts={self.num_initial}",
            f"iib_lpo.num_branches={self.num_branches}",
            f"iib_lpo.ib.rounds={self.rounds}",
        ]
        if self.dump_rollouts:
            out.append(f"trainer.rollout_data_dir={self.out_dir / 'rollouts'}")
        if self.algorithm == "iib_lpo":
            if self.cvae_checkpoint is not None:
                out += ["iib_lpo.latent.mode=cvae", f"iib_lpo.latent.service.checkpoint_path={self.cvae_checkpoint}",
                        f"iib_lpo.latent.placeholder_token_id={self.placeholder_token_id}",
                        "iib_lpo.latent.service.backend=ray_actor", "iib_lpo.latent.service.num_gpus=0",
                        "iib_lpo.latent.service.device=cpu", "iib_lpo.latent.service.encoder_dtype=float32"]
            else:
                out += ["iib_lpo.latent.mode=none"]
        else:
            # the baseline: verl's stock rollout and advantage, same data, sizes and trajectories per prompt
            out += [f"algorithm.adv_estimator={self.algorithm}", "actor_rollout_ref.rollout.name=vllm",
                    "actor_rollout_ref.rollout.agent.default_agent_loop=single_turn_agent",
                    "actor_rollout_ref.rollout.agent.agent_loop_manager_class=null"]
        return out + list(self.overrides)


def run_cpu_training(spec: CpuRunSpec, timeout_s: float, extra_env: dict[str, str] | None = None,
                     on_start: Callable[[int], None] | None = None) -> CpuRun:
    """Run the trainer in a subprocess under a hard timeout; returns what it wrote.

    On timeout the whole process group (Ray, vLLM, workers) is killed and ``timed_out`` is set.
    ``on_start(session_id)`` is called once the subprocess exists (``session_pids(session_id)`` are
    the processes the run starts: the fault test kills one of them).
    """
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **CPU_ENV,
           "VERL_FILE_LOGGER_PATH": str(out / "metrics.jsonl"),
           "IIB_LPO_WEIGHT_PROBE_FILE": str(out / "weight_probe.jsonl"),
           **(extra_env or {})}
    cmd = [sys.executable, "-m", "recipe.iib_lpo.main", *spec.hydra_overrides()]
    with open(out / "train.log", "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            if on_start is not None:
                on_start(proc.pid)
            return CpuRun(proc.wait(timeout=timeout_s), out)
        except subprocess.TimeoutExpired:
            return CpuRun(-1, out, timed_out=True)
        finally:
            _kill_group(proc)


def session_pids(session_id: int) -> list[int]:
    """Processes of a session (Ray's workers set their own process group but keep the session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session_id:  # stat fields after the name: state, ppid, pgrp, session
            pids.append(int(entry.name))
    return pids


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill everything the run started (its session: Ray daemons, workers, vLLM), nothing else."""
    for pid in [proc.pid, *session_pids(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
