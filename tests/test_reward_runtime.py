"""The reward in the contexts it really runs in: worker threads, scripts without a main guard,
verl 0.9.1's reward manager (config kwargs -> compute_score in an executor thread), Ray actors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from recipe.iib_lpo.reward import answer_checking as ac
from recipe.iib_lpo.reward import verifier_pool as vp
from recipe.iib_lpo.reward.score import compute_score

REWARD_FILE = Path(ac.__file__).with_name("score.py")

# (response, gold, expected acc); the symbolic rows need the verifier process.
MIXED_BATCH = [
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", True),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt2", True),
    ("\\boxed{(1,2]}", "\\left(1,2\\right]", True),
    ("\\boxed{\\{3,1\\}}", "\\{1,3\\}", True),
    ("\\boxed{x^2-1}", "(x-1)(x+1)", True),
    ("#### 1,234", "1234", True),
    ("Answer: 50\\%", "0.5", True),
    ("\\boxed{\\sqrt{3}}", "3", False),
    ("\\boxed{(2,1)}", "(1,2)", False),
    ("\\boxed{\\frac{\\pi}{4}}", "\\frac{\\pi}{2}", False),
    ("no answer at all", "7", False),
    ("\\boxed{__import__('os').getcwd()}", "7", False),
]


def test_math_verify_default_timeout_fails_off_the_main_thread():
    """Why the time limit is ours: math-verify's signal.alarm timeout refuses worker threads."""
    from math_verify import parse

    errors = []

    def run():
        try:
            parse("$\\frac{1}{2}$", parsing_timeout=5, raise_on_error=True)
        except ValueError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert errors and "threaded environment" in errors[0]


def test_compute_score_in_a_non_main_thread():
    results = {}

    def run():
        results["ok"] = compute_score("math", "\\boxed{\\frac{\\sqrt{3}}{3}}", "\\frac{1}{\\sqrt{3}}")
        results["tower"] = compute_score("math", "\\boxed{9^{9^{9}}}", "1", timeout_s=1.0)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(120)
    assert not thread.is_alive()
    assert results["ok"]["acc"] is True and results["ok"]["reason"] == "correct"
    # the time limit holds in a worker thread too
    assert results["tower"]["score"] == 0.0 and results["tower"]["reason"] == "timeout"


def test_concurrent_threads_match_expected():
    """verl runs compute_score for a whole batch concurrently in its executor threads."""
    batch = MIXED_BATCH * 3
    with ThreadPoolExecutor(max_workers=8) as pool:
        outs = list(pool.map(lambda row: compute_score("math", row[0], row[1]), batch))
    assert [o["acc"] for o in outs] == [row[2] for row in batch]
    assert len(vp._pool()._all) <= vp._pool().max_procs


def test_script_without_main_guard(tmp_path):
    """A plain script (no ``if __name__ == "__main__":``) scores correctly and leaves no process."""
    script = tmp_path / "score_it.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json
            from recipe.iib_lpo.reward import verifier_pool
            from recipe.iib_lpo.reward.score import compute_score
            rows = {[(r, g) for r, g, _ in MIXED_BATCH]!r}
            scores = [compute_score("math", r, g)["score"] for r, g in rows]
            pids = [p.proc.pid for p in verifier_pool._pool()._all]
            print(json.dumps({{"scores": scores, "verifier_pids": pids}}))
            """
        )
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["scores"] == [1.0 if acc else 0.0 for *_, acc in MIXED_BATCH]
    assert result["verifier_pids"], "the symbolic rows should have used a verifier process"
    for pid in result["verifier_pids"]:  # killed at exit (atexit), not left behind
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_forked_child_gets_its_own_verifier(tmp_path):
    """After fork the child must not talk to the parent's verifier pipes: it starts its own."""
    script = tmp_path / "fork_it.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, multiprocessing
            from recipe.iib_lpo.reward import verifier_pool
            from recipe.iib_lpo.reward.score import compute_score

            def child(q):
                r = compute_score("m", "\\\\boxed{\\\\sqrt{12}}", "2\\\\sqrt3")
                q.put((r["acc"], [p.proc.pid for p in verifier_pool._pool()._all]))

            parent_first = compute_score("m", "\\\\boxed{\\\\sqrt{8}}", "2\\\\sqrt2")["acc"]
            parent_pids = [p.proc.pid for p in verifier_pool._pool()._all]
            ctx = multiprocessing.get_context("fork")
            q = ctx.Queue()
            proc = ctx.Process(target=child, args=(q,))
            proc.start()
            child_acc, child_pids = q.get(timeout=120)
            proc.join(60)
            parent_after = compute_score("m", "\\\\boxed{\\\\sqrt{18}}", "3\\\\sqrt2")["acc"]
            print(json.dumps([parent_first, child_acc, parent_after, parent_pids, child_pids]))
            """
        )
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    parent_first, child_acc, parent_after, parent_pids, child_pids = json.loads(out.stdout.strip().splitlines()[-1])
    assert parent_first and child_acc and parent_after
    assert child_pids and not set(child_pids) & set(parent_pids)


class _CharTokenizer:
    """Token id = code point; enough for verl's reward manager, which only calls decode()."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i)) for i in ids)


def _verl_batch(responses, golds):
    import numpy as np
    import torch
    from verl import DataProto

    width = max(len(r) for r in responses)
    resp = torch.zeros(len(responses), width, dtype=torch.long)
    mask = torch.zeros(len(responses), 1 + width, dtype=torch.long)
    for i, r in enumerate(responses):
        resp[i, : len(r)] = torch.tensor([ord(c) for c in r])
        mask[i, : 1 + len(r)] = 1
    return DataProto.from_dict(
        tensors={
            "responses": resp,
            "attention_mask": mask,
            "prompts": torch.zeros(len(responses), 1, dtype=torch.long),
        },
        non_tensors={
            "data_source": np.array(["math"] * len(responses), dtype=object),
            "reward_model": np.array([{"style": "rule", "ground_truth": g} for g in golds], dtype=object),
            "extra_info": np.array([{"index": i} for i in range(len(responses))], dtype=object),
        },
    )


@pytest.mark.slow
@pytest.mark.parametrize("path_form", ["pkg", "file"])
def test_verl_reward_manager_passes_reward_kwargs(path_form):
    """Through verl 0.9.1 itself: the documented override reaches compute_score as a kwarg, and
    NaiveRewardManager.run_single calls it in its executor thread."""
    import asyncio

    from hydra import compose, initialize_config_module
    from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager
    from verl.trainer.ppo.reward import get_custom_reward_fn

    path = "pkg://recipe.iib_lpo.reward" if path_form == "pkg" else str(REWARD_FILE)
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        config = compose(
            config_name="ppo_trainer",
            overrides=[
                f"reward.custom_reward_function.path={path}",
                "+reward.custom_reward_function.reward_kwargs.reward_style=signed",
            ],
        )
    fn = get_custom_reward_fn(config)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        manager = NaiveRewardManager(config, _CharTokenizer(), fn)
        rows = [
            ("so \\boxed{\\frac{\\sqrt2}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0),
            ("\\boxed{3}", "4", -1.0),
            ("", "4", -1.0),
        ]
        data = _verl_batch([r for r, _, _ in rows], [g for _, g, _ in rows])
        outs = [loop.run_until_complete(manager.run_single(data[i : i + 1])) for i in range(len(rows))]
    finally:
        loop.close()
        asyncio.set_event_loop(None)
    assert [o["reward_score"] for o in outs] == [s for *_, s in rows]
    assert [o["reward_extra_info"]["reason"] for o in outs] == ["correct", "wrong", "no_answer"]
    assert outs[0]["reward_extra_info"]["pred"] == "\\frac{\\sqrt2}{2}"


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(240)
def test_compute_score_inside_a_ray_actor():
    ray = pytest.importorskip("ray")

    @ray.remote(num_cpus=0)
    class Scorer:
        async def score(self, rows):
            import asyncio

            from recipe.iib_lpo.reward.score import compute_score as score_fn

            loop = asyncio.get_running_loop()  # like verl: the sync function runs in an executor thread
            return [
                await loop.run_in_executor(None, lambda r=r: score_fn("math", r[0], r[1])["acc"]) for r in rows
            ]

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        scorer = Scorer.remote()
        accs = ray.get(scorer.score.remote([(r, g) for r, g, _ in MIXED_BATCH]), timeout=180)
        ray.kill(scorer)
    finally:
        if started_here:
            ray.shutdown()
    assert accs == [acc for *_, acc in MIXED_BATCH]
