"""The README's main command: the CPU demo runs end to end and its rollout step has the shape
METHOD.md prescribes (M initial + M*K branches per prompt, Top-N filter, prefix masking)."""

import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(600)]

NUM_PROMPTS, M, K = 2, 2, 3


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
           "TORCH_COMPILE_DISABLE": "1", "VLLM_TARGET_DEVICE": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "recipe.iib_lpo.demo", "--out", str(out), "--num-problems", "16",
         "--rollout-prompts", str(NUM_PROMPTS), "--max-tokens", "40"],
        capture_output=True, text=True, timeout=580, env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_demo_writes_data_and_reward_samples(demo_out):
    assert (demo_out / "data" / "demo_train.parquet").is_file()
    samples = json.loads((demo_out / "reward_samples.json").read_text())
    by_label = {}
    for sample in samples:
        by_label.setdefault(sample["label"], []).append(sample["acc"])
    assert all(by_label["correct"]) and all(by_label["equivalent form"])
    assert not any(by_label["wrong"] + by_label["no answer"] + by_label["hostile"])


def test_demo_rollout_step_has_the_branching_layout(demo_out):
    rows = json.loads((demo_out / "rollout_step.json").read_text())
    initial = [r for r in rows if r["role"] == "initial"]
    branches = [r for r in rows if r["role"] == "branch"]
    assert len(initial) == NUM_PROMPTS * M
    forked = [r for r in initial if r["fork"] is not None]
    assert len(branches) == K * len(forked)
    top_n = math.ceil(K / 2)
    for parent_index, parent in enumerate(initial):
        children = [b for b in branches if b["parent"] == parent_index]
        if parent["fork"] is None:
            assert children == []
            continue
        # every branch forks at its parent's t*; the parent is always kept, plus the Top-N branches
        assert {b["fork"] for b in children} == {parent["fork"]}
        assert parent["kept"] and sum(b["kept"] for b in children) == top_n
        # dropped branches carry no advantage
        assert all(b["advantage"] == 0.0 for b in children if not b["kept"])
        # branches were served from the parent's prefix cache
        assert all(b["cached_prompt_tokens"] > 0 for b in children)
