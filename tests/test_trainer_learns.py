"""RL through verl's real trainer learns: GRPO via ``python -m recipe.iib_lpo.main`` on a tiny task.

The task (``tests/helpers/digit_first_reward.py``: 1 when the response starts with a digit) is one a
correct policy gradient learns within a few steps from the tiny random Qwen2, so a run whose reward
does not rise means the path from reward to weights to vLLM's samples is broken (advantages, loss
aggregation, optimizer, weight sync). The assertions are on what the run wrote: verl's training
reward (``critic/score/mean``) of step 1 (sampled before any update) against the last steps, and the
reward of verl's own sampled validation before training and after the last step.

Measured in three runs (2026-12-02, lr 1e-3): validation reward 0.34-0.44 before training, 0.96-1.0
after; training reward 0.31-0.34 at step 1, 0.94-1.0 from step 2 or 3 on. The thresholds (a gain of 0.3) sit far from both: a broken update
leaves the reward at its start (about 0.2-0.35: 32 samples per step, s.e. about 0.08).
"""

import statistics
from pathlib import Path

import pytest

from recipe.iib_lpo.trainer.cpu_run import CpuRunSpec, run_cpu_training

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.vllm, pytest.mark.timeout(1200)]

RUN_TIMEOUT_S = 900
STEPS = 8
LAST = 3
MIN_GAIN = 0.3  # reward gain (absolute, reward in [0, 1]); measured gains 0.52-0.66
REWARD = Path(__file__).resolve().parent / "helpers" / "digit_first_reward.py"


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, tiny_qwen2_dir):
    from recipe.iib_lpo.demo.data import prepare_demo_data

    root = tmp_path_factory.mktemp("learns")
    data_dir = prepare_demo_data(root, num_problems=160, seed=0)
    spec = CpuRunSpec(model_dir=Path(tiny_qwen2_dir), train_file=data_dir / "demo_train.parquet",
                      val_file=data_dir / "demo_val.parquet", out_dir=root / "grpo", algorithm="grpo", steps=STEPS,
                      num_initial=2, num_branches=3, seed=0,
                      overrides=[f"reward.custom_reward_function.path={REWARD}",
                                 "data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
                                 "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=32",
                                 "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=32",
                                 "data.max_response_length=8", "actor_rollout_ref.actor.optim.lr=1e-3",
                                 "actor_rollout_ref.actor.optim.weight_decay=0.0",
                                 f"trainer.test_freq={STEPS}", "trainer.val_before_train=True",
                                 "actor_rollout_ref.rollout.val_kwargs.do_sample=True",
                                 "actor_rollout_ref.rollout.val_kwargs.temperature=1.0",
                                 "actor_rollout_ref.rollout.val_kwargs.n=4"])
    run = run_cpu_training(spec, timeout_s=RUN_TIMEOUT_S)
    assert not run.timed_out, f"run timed out; log: {run.log}"
    assert run.returncode == 0, f"exit code {run.returncode}; log: {run.log}"
    return run


def test_grpo_training_reward_rises(grpo_run):
    rows = [m for m in grpo_run.metrics() if "critic/score/mean" in m]
    assert [m["step"] for m in rows] == list(range(1, STEPS + 1))
    rewards = [m["critic/score/mean"] for m in rows]
    # step 1's samples come from the initial policy: the update follows the rollout
    assert statistics.mean(rewards[-LAST:]) - rewards[0] > MIN_GAIN, rewards


def test_grpo_validation_reward_rises(grpo_run):
    """verl's validation (sampled, 4 per problem) before step 1 and after the last step."""
    from recipe.iib_lpo.demo.report import validation_series

    values = dict(zip(*validation_series(grpo_run.metrics())))
    assert min(values) == 0 and max(values) == STEPS, values
    assert values[STEPS] - values[0] > MIN_GAIN, values
