"""The batched latent service: N concurrent requests -> one LatentSampler call (no Ray, no GPU)."""

import asyncio

import pytest
import torch

from recipe.iib_lpo.latent.sampler import LatentSamples
from recipe.iib_lpo.latent.service import (
    BatchingLatentService,
    LatentServiceClient,
    LatentServiceConfig,
    get_latent_service_client,
)

pytestmark = pytest.mark.timeout(60)


class CountingSampler:
    """embedding[n, k, :] = alpha * (code(text_n) + k / 10); records every call."""

    device = torch.device("cpu")

    def __init__(self, fail: bool = False, delay: float = 0.0):
        self.calls = []
        self.fail = fail
        self.delay = delay

    def sample_latent_embeddings(self, texts, num_samples, alpha, generator=None, coupling="independent"):
        import time

        self.couplings = getattr(self, "couplings", []) + [coupling]
        time.sleep(self.delay)
        self.calls.append((list(texts), num_samples, alpha, generator is not None))
        if self.fail:
            raise RuntimeError("encoder out of memory")
        codes = torch.tensor([float(t.split()[-1]) for t in texts])
        emb = alpha * (codes[:, None, None] + torch.arange(num_samples)[None, :, None] / 10).expand(-1, -1, 6).clone()
        z = torch.zeros(len(texts), num_samples, 2)
        return LatentSamples(embeddings=emb, z=z, z_norms=z.norm(dim=-1), embedding_norms=emb.norm(dim=-1), alpha=alpha)


def test_concurrent_requests_share_one_sampler_call():
    sampler = CountingSampler()
    service = BatchingLatentService(lambda: sampler, max_batch_size=64, max_wait_ms=50)

    async def go():
        return await asyncio.gather(*[service.sample(f"question {i}", 3, 0.5, seed=i) for i in range(10)])

    draws = asyncio.run(go())
    assert len(sampler.calls) == 1 and len(sampler.calls[0][0]) == 10 and sampler.calls[0][1:] == (3, 0.5, True)
    for i, draw in enumerate(draws):
        expected = 0.5 * (i + torch.arange(3) / 10)
        assert torch.allclose(draw.embeddings[:, 0], expected) and draw.embeddings.shape == (3, 6)
        assert torch.allclose(draw.embedding_norms, draw.embeddings.norm(dim=-1))
    assert service.stats()["batch_sizes"] == [10]


def test_sibling_coupling_travels_through_the_service():
    """The config's sibling_coupling reaches the sampler."""
    from recipe.iib_lpo.latent.service import LatentServiceConfig, get_latent_service_client

    sampler = CountingSampler()
    config = LatentServiceConfig(backend="in_process", sibling_coupling="orthogonal")
    client = get_latent_service_client(config, sampler_factory=lambda: sampler)
    draw = asyncio.run(client.sample("question 3", 2, 1.0, seed=0))
    assert sampler.couplings == ["orthogonal"] and draw.embeddings.shape[0] == 2
    with pytest.raises(ValueError, match="sibling_coupling must be one of"):
        LatentServiceConfig(sibling_coupling="antithetic")


def test_max_batch_size_splits_and_alpha_zero_skips_the_sampler():
    sampler = CountingSampler()
    service = BatchingLatentService(lambda: sampler, max_batch_size=4, max_wait_ms=1000)

    async def go():
        zero = await service.sample("question 1", 2, 0.0)
        draws = await asyncio.gather(*[service.sample(f"question {i}", 2, 1.0) for i in range(10)])
        return zero, draws

    zero, draws = asyncio.run(go())
    assert zero is None
    # batches fill up to 4 without waiting the full second; 10 requests -> 4 + 4 + 2
    assert sorted(len(c[0]) for c in sampler.calls) == [2, 4, 4]
    assert all(not c[3] for c in sampler.calls)  # no seeds given -> no generator
    assert [float(d.embeddings[0, 0]) for d in draws] == [float(i) for i in range(10)]


def test_sampler_failure_reaches_every_waiter_and_service_recovers():
    failing = CountingSampler(fail=True)
    service = BatchingLatentService(lambda: failing, max_batch_size=8, max_wait_ms=10)

    async def go():
        results = await asyncio.gather(*[service.sample(f"q {i}", 2, 1.0) for i in range(3)], return_exceptions=True)
        failing.fail = False
        again = await service.sample("q 7", 2, 1.0)
        return results, again

    results, again = asyncio.run(go())
    assert all(isinstance(r, RuntimeError) and "out of memory" in str(r) for r in results)
    assert float(again.embeddings[0, 0]) == 7.0


def test_each_request_gets_its_own_seeded_generator_whatever_the_batch():
    """A request's generator depends on its own seed only: batch composition and order (which
    depend on timing) cannot change its draws."""
    seen = []

    class SeedSampler(CountingSampler):
        def sample_latent_embeddings(self, texts, num_samples, alpha, generator=None, coupling="independent"):
            seen.append({t: g.initial_seed() for t, g in zip(texts, generator)})
            return super().sample_latent_embeddings(texts, num_samples, alpha)

    async def go(order, max_batch_size):
        service = BatchingLatentService(lambda: SeedSampler(), max_wait_ms=20, max_batch_size=max_batch_size)
        return await asyncio.gather(*[service.sample(f"q {i}", 1, 1.0, seed=100 + i) for i in order])

    first = asyncio.run(go([0, 1, 2], max_batch_size=8))
    second = asyncio.run(go([2, 0, 1], max_batch_size=1))
    assert seen[0] == {"q 0": 100, "q 1": 101, "q 2": 102}
    assert {t: s for call in seen[1:] for t, s in call.items()} == seen[0]
    assert [len(call) for call in seen[1:]] == [1, 1, 1]
    assert [float(d.embeddings[0, 0]) for d in first] == [0.0, 1.0, 2.0]
    assert [float(d.embeddings[0, 0]) for d in second] == [2.0, 0.0, 1.0]


def test_config_and_client_validation():
    with pytest.raises(ValueError, match="backend must be one of"):
        LatentServiceConfig(backend="gpu")
    with pytest.raises(ValueError, match="unknown keys in iib_lpo.latent.service: \\['max_batch'\\]"):
        LatentServiceConfig.from_dict({"max_batch": 3})
    with pytest.raises(ValueError, match="exactly one of"):
        LatentServiceClient()
    sampler = CountingSampler()
    cfg = LatentServiceConfig(backend="in_process", max_wait_ms=5)
    factory = lambda: sampler  # noqa: E731
    client = get_latent_service_client(cfg, sampler_factory=factory)
    assert get_latent_service_client(cfg, sampler_factory=factory) is client  # one per process and config
    draw = asyncio.run(client.sample("q 3", 2, 2.0))
    assert torch.allclose(draw.embeddings[:, 0], torch.tensor([6.0, 6.2]))
    with pytest.raises(ValueError, match="checkpoint_path is required"):
        from recipe.iib_lpo.latent.service import build_sampler_from_config

        build_sampler_from_config(LatentServiceConfig(backend="in_process"))
