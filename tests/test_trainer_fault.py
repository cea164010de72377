"""A rollout server that dies mid-run: the trainer stops in bounded time, and the run resumes.

A real CPU run (``python -m recipe.iib_lpo.main``, I2B-LPO, 2 steps, a checkpoint every step) has its
vLLM server actor (``IibLpoVLLMHttpServer``: the engine runs inside it, VLLM_ENABLE_V1_MULTIPROCESSING=0)
killed with SIGKILL as soon as verl has recorded the step-1 checkpoint. The run must exit on its
own well before the hard timeout, with a non-zero code and the recipe's error naming the dead actor,
the step and the checkpoint to resume from (``ppo_trainer.dead_actor_error``);
the step-1 checkpoint must stay what verl's tracker points to, and ``trainer.resume_mode=auto``
must continue from it: step 2 only, with the weights synced into a fresh engine.
"""

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from recipe.iib_lpo.trainer.cpu_run import CpuRunSpec, run_cpu_training, session_pids

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.vllm, pytest.mark.timeout(1500)]

RUN_TIMEOUT_S = 600
# after the kill, the run must be gone within this (measured 6.7 s on 2 cores, 2026-12-04)
STOP_WITHIN_S = 240
PARITY_REWARD = Path(__file__).resolve().parent / "helpers" / "parity_reward.py"
SERVER_ACTOR = "IibLpoVLLMHttpServer"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class _KillServerAfterCheckpoint:
    """Watches the run; once verl's tracker names step 1, SIGKILLs the run's vLLM server actor."""

    def __init__(self, ckpt_dir: Path, deadline_s: float):
        self.tracker = ckpt_dir / "latest_checkpointed_iteration.txt"
        self.deadline_s = deadline_s
        self.killed_pids: list[int] = []
        self.killed_at: float | None = None

    def __call__(self, session_id: int) -> None:
        threading.Thread(target=self._watch, args=(session_id,), daemon=True).start()

    def _watch(self, session_id: int) -> None:
        end = time.monotonic() + self.deadline_s
        while time.monotonic() < end:
            if self.tracker.exists() and self.tracker.read_text().strip() == "1":
                servers = [p for p in session_pids(session_id) if f"ray::{SERVER_ACTOR}" in _cmdline(p)]
                for pid in servers:
                    try:
                        os.kill(pid, signal.SIGKILL)
                        self.killed_pids.append(pid)
                    except ProcessLookupError:
                        pass
                if self.killed_pids:
                    self.killed_at = time.monotonic()
                    return
            time.sleep(0.5)


def _spec(data_dir: Path, model_dir: Path, out_dir: Path, extra: list[str]) -> CpuRunSpec:
    return CpuRunSpec(model_dir=model_dir, train_file=data_dir / "demo_train.parquet",
                      val_file=data_dir / "demo_val.parquet", out_dir=out_dir, algorithm="iib_lpo", steps=2,
                      num_initial=2, num_branches=3, cvae_checkpoint=None,
                      overrides=[f"reward.custom_reward_function.path={PARITY_REWARD}", "trainer.save_freq=1",
                                 *extra])


def test_dead_rollout_server_stops_the_run_and_the_checkpoint_resumes(tmp_path, tiny_qwen2_dir):
    from recipe.iib_lpo.demo.data import prepare_demo_data

    data_dir = prepare_demo_data(tmp_path / "data", num_problems=48, seed=0)
    out = tmp_path / "run"
    killer = _KillServerAfterCheckpoint(out / "ckpt", deadline_s=RUN_TIMEOUT_S)
    run = run_cpu_training(_spec(data_dir, Path(tiny_qwen2_dir), out, []), timeout_s=RUN_TIMEOUT_S,
                           on_start=killer)
    ended_at = time.monotonic()
    log = run.log.read_text()
    assert killer.killed_pids, f"no {SERVER_ACTOR} process was found to kill; tail:\n{log[-3000:]}"
    assert not run.timed_out, f"the run hung after its rollout server died; tail:\n{log[-3000:]}"
    print(f"the run exited {ended_at - killer.killed_at:.1f} s after its rollout server was killed")
    assert ended_at - killer.killed_at < STOP_WITHIN_S, ended_at - killer.killed_at
    assert run.returncode != 0
    # the run's last words: what died, at which step, which checkpoint resumes (ppo_trainer.dead_actor_error)
    stop = re.search(r"a Ray actor died during training step (\d+): ([^\n]*?)\. The trainer stopped; the last "
                     r"complete checkpoint is (\S+): rerun with trainer.resume_mode=auto", log)
    assert stop, log[-3000:]
    # only the killed server is named (the probe asks every actor of the run)
    assert stop.group(1) == "2" and stop.group(2) == "rollout server 0.0 (IibLpoVLLMReplica)", stop.group(0)
    assert Path(stop.group(3)) == out / "ckpt" / "global_step_1"
    assert [m["step"] for m in run.metrics()] == [1]
    assert (out / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "1"

    resumed = run_cpu_training(_spec(data_dir, Path(tiny_qwen2_dir), out, ["trainer.resume_mode=auto"]),
                               timeout_s=RUN_TIMEOUT_S)
    assert not resumed.timed_out and resumed.returncode == 0, resumed.log.read_text()[-3000:]
    assert [m["step"] for m in resumed.metrics()] == [2]  # step 1 is not redone (verl rewrites metrics.jsonl)
    assert (out / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    prints = resumed.weight_fingerprints()
    # killed run: start-up sync + the sync after step 1; resumed run: step-1 weights again, then step 2
    assert len(prints) == 4 and prints[2] == prints[1] and prints[3] != prints[2], prints
