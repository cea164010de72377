"""Batched latent sampling for the branching rollout (METHOD.md step 3).

Every fork point needs E(question + prefix) from a ~900M-parameter text encoder and K draws from
the CVAE prior. One encoder call costs 61 ms on an H100 for a single sequence but 6 ms per
sequence in a batch of 64, and 7 s on a 2-core CPU (shared/docs/ENVIRONMENT.md). So the agent
loop never calls the sampler itself: it awaits ``LatentServiceClient.sample``, and a
``BatchingLatentService`` collects the requests of many branch points for a short window
(``max_wait_ms``) or until ``max_batch_size`` are queued, and calls
``LatentSampler.sample_latent_embeddings`` once per batch.

Backends (``iib_lpo.latent.service.backend``):
- ``ray_actor`` (training): one named Ray actor per trainer (name derived from the Ray job id,
  so all agent-loop workers of one trainer share it), created by the first worker that needs
  it, holding the encoder + CVAE on a GPU fraction (``num_gpus``). Requests from all workers
  of the step are batched together.
- ``in_process`` (tests, CPU demo): the same batching service inside the agent-loop worker's
  event loop (shared by all sessions of that worker process).

Determinism: each request with a seed gets its own torch.Generator (the sampler draws each
condition's noise from its own generator), so a request's latents depend only on its condition
text and seed, not on which other requests shared its batch (batches form by timing). Requests
without a seed are drawn from the global RNG.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

BACKENDS = ("in_process", "ray_actor")


@dataclass(frozen=True)
class LatentServiceConfig:
    """Knobs of the latent service (``iib_lpo.latent.service``).

    Attributes:
        backend: "ray_actor" (default; one GPU-resident actor per trainer) or "in_process".
        max_batch_size: most fork points per sampler call. Default 64 (ENVIRONMENT.md: 0.39 s
            for 64 sequences of 512 tokens on an H100, 6 ms each).
        max_wait_ms: how long the first request of a batch waits for more. Default 20 ms:
            small next to a rollout's generation time, long enough to gather the fork points
            of the parents that finish together.
        num_gpus: GPU fraction Ray reserves for the actor. Default 0: verl's hybrid engine puts
            every GPU of the node in its placement group, so an actor asking for a fraction
            outside it is never scheduled (measured with Ray 2.60). With 0, Ray leaves
            CUDA_VISIBLE_DEVICES alone and the actor still runs on a GPU (``device`` below); the
            encoder's ~1.8 GB (bf16) plus a few GB of activations for a 64 x 512 batch come out
            of the memory vLLM leaves free (``rollout.gpu_memory_utilization``). Set > 0 only
            on a cluster with GPUs outside the trainer's placement group.
        num_cpus: CPUs reserved by the actor. Default 1.
        detached: give the actor ``lifetime="detached"`` (survives its creating worker). Default
            False: it lives as long as the agent-loop worker that created it (the trainer's).
        checkpoint_path: train_cvae checkpoint (``LatentSampler.from_checkpoint``). Required
            unless a sampler factory is injected (tests).
        encoder_name_or_path: overrides the encoder named in the checkpoint (e.g. a local copy).
        device: where the encoder + CVAE run; default "cuda" if the actor sees a GPU (with
            num_gpus=0 it sees the node's GPUs) else "cpu".
        encoder_dtype: "bfloat16" | "float32" | "float16". Default "bfloat16" on GPU.
        micro_batch_size: encoder micro-batch inside one call. Default 64.
        sibling_coupling: how the K siblings of a fork draw z: "independent" (default) or
            "orthogonal" (mutually orthogonal noise, each z still marginally from the prior;
            latent/cvae.py SIBLING_COUPLINGS; README "The latent" has the measurement).
    """

    backend: str = "ray_actor"
    max_batch_size: int = 64
    max_wait_ms: float = 20.0
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    detached: bool = False
    checkpoint_path: str | None = None
    encoder_name_or_path: str | None = None
    device: str | None = None
    encoder_dtype: str = "bfloat16"
    micro_batch_size: int = 64
    sibling_coupling: str = "independent"

    def __post_init__(self) -> None:
        from recipe.iib_lpo.latent.cvae import SIBLING_COUPLINGS

        if self.sibling_coupling not in SIBLING_COUPLINGS:
            raise ValueError(f"sibling_coupling must be one of {SIBLING_COUPLINGS}, got {self.sibling_coupling!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"latent service backend must be one of {BACKENDS}, got {self.backend!r}")
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {self.max_batch_size!r}")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms!r}")
        if not self.num_gpus >= 0 or not self.num_cpus >= 0:
            raise ValueError("num_gpus and num_cpus must be >= 0")
        if self.encoder_dtype not in ("bfloat16", "float32", "float16"):
            raise ValueError(f"encoder_dtype must be bfloat16, float32 or float16, got {self.encoder_dtype!r}")

    @classmethod
    def from_dict(cls, raw: dict | None) -> LatentServiceConfig:
        raw = dict(raw or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown keys in iib_lpo.latent.service: {unknown}; known: {sorted(known)}")
        return cls(**raw)


@dataclass
class LatentDraw:
    """K latent-token embeddings for one fork point (CPU float32)."""

    embeddings: torch.Tensor  # [K, hidden] = alpha * P(z)
    embedding_norms: torch.Tensor  # [K]
    z_norms: torch.Tensor  # [K]
    alpha: float


@dataclass
class _Pending:
    condition_text: str
    num_samples: int
    alpha: float
    seed: int | None
    future: asyncio.Future


class BatchingLatentService:
    """Collects ``sample`` requests and serves each batch with one sampler call.

    ``sampler_factory`` builds the ``LatentSampler`` (or anything with the same
    ``sample_latent_embeddings(texts, num_samples, alpha, generator=None, coupling=...)``, where
    ``generator`` is None or a list with one generator per text) lazily, on the first batch, inside the executor
    thread. Sampler calls run in a worker thread so the event loop
    keeps collecting requests (and serving generation) meanwhile; calls are serialised.
    """

    def __init__(self, sampler_factory: Callable[[], Any], max_batch_size: int = 64, max_wait_ms: float = 20.0,
                 sibling_coupling: str = "independent"):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self._sampler_factory = sampler_factory
        self._sibling_coupling = sibling_coupling
        self._sampler = None
        self.max_batch_size = int(max_batch_size)
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self._pending: list[_Pending] = []
        self._flush_task: asyncio.Task | None = None
        self._full = asyncio.Event()
        self._call_lock = asyncio.Lock()
        self.num_sampler_calls = 0
        self.batch_sizes: list[int] = []
        self.sampler_seconds = 0.0

    def stats(self) -> dict[str, Any]:
        return {
            "num_sampler_calls": self.num_sampler_calls,
            "batch_sizes": list(self.batch_sizes),
            "sampler_seconds": self.sampler_seconds,
        }

    async def sample(self, condition_text: str, num_samples: int, alpha: float, seed: int | None = None) -> LatentDraw | None:
        """K = num_samples latents for one condition text; None when alpha == 0 (no latent token)."""
        if not isinstance(condition_text, str) or not condition_text:
            raise ValueError("condition_text must be a non-empty str")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        alpha = float(alpha)
        if alpha == 0.0:
            return None
        loop = asyncio.get_running_loop()
        request = _Pending(condition_text, num_samples, alpha, seed, loop.create_future())
        self._pending.append(request)
        if len(self._pending) >= self.max_batch_size:
            self._full.set()
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.create_task(self._flush_loop())
        return await request.future

    async def _flush_loop(self) -> None:
        while self._pending:
            self._full.clear()
            if len(self._pending) < self.max_batch_size:
                try:
                    await asyncio.wait_for(self._full.wait(), timeout=self.max_wait_s)
                except asyncio.TimeoutError:
                    pass
            batch, self._pending = self._pending[: self.max_batch_size], self._pending[self.max_batch_size :]
            await self._serve(batch)

    async def _serve(self, batch: list[_Pending]) -> None:
        # One sampler call per (num_samples, alpha): the sampler takes scalars for both (in a
        # training step they are the same for every fork point).
        groups: dict[tuple[int, float], list[_Pending]] = {}
        for request in batch:
            groups.setdefault((request.num_samples, request.alpha), []).append(request)
        for (num_samples, alpha), requests in groups.items():
            try:
                draws = await self._call_sampler([r.condition_text for r in requests], num_samples, alpha,
                                                 [r.seed for r in requests])
            except BaseException as err:  # noqa: BLE001 - every waiter must be released
                for request in requests:
                    if not request.future.done():
                        request.future.set_exception(err)
                if not isinstance(err, Exception):
                    raise
                continue
            for request, draw in zip(requests, draws, strict=True):
                if not request.future.done():
                    request.future.set_result(draw)

    async def _call_sampler(
        self, texts: list[str], num_samples: int, alpha: float, seeds: list[int | None]
    ) -> list[LatentDraw]:
        async with self._call_lock:
            loop = asyncio.get_running_loop()
            start = time.perf_counter()
            result = await loop.run_in_executor(None, self._sample_blocking, texts, num_samples, alpha, seeds)
            self.sampler_seconds += time.perf_counter() - start
            self.num_sampler_calls += 1
            self.batch_sizes.append(len(texts))
            return result

    def _sample_blocking(
        self, texts: list[str], num_samples: int, alpha: float, seeds: list[int | None]
    ) -> list[LatentDraw]:
        if self._sampler is None:
            self._sampler = self._sampler_factory()
        device = getattr(self._sampler, "device", torch.device("cpu"))
        generator = None
        if any(seed is not None for seed in seeds):
            # One generator per request; an unseeded request in a mixed batch gets a fresh random one.
            generator = []
            for seed in seeds:
                request_generator = torch.Generator(device=device)
                if seed is None:
                    request_generator.seed()
                else:
                    request_generator.manual_seed(int(seed))
                generator.append(request_generator)
        samples = self._sampler.sample_latent_embeddings(texts, num_samples, alpha, generator=generator,
                                                         coupling=self._sibling_coupling)
        if samples is None:
            raise RuntimeError(f"the latent sampler returned no latents for alpha={alpha} > 0")
        embeddings = samples.embeddings.detach().to("cpu", torch.float32)
        if embeddings.shape[:2] != (len(texts), num_samples):
            raise RuntimeError(
                f"latent sampler returned embeddings of shape {tuple(embeddings.shape)}, "
                f"expected ({len(texts)}, {num_samples}, hidden)"
            )
        if not torch.isfinite(embeddings).all():
            raise FloatingPointError("latent embeddings contain NaN or inf")
        embedding_norms = samples.embedding_norms.detach().to("cpu", torch.float32)
        z_norms = samples.z_norms.detach().to("cpu", torch.float32)
        return [
            LatentDraw(embeddings=embeddings[i].clone(), embedding_norms=embedding_norms[i].clone(),
                       z_norms=z_norms[i].clone(), alpha=float(alpha))
            for i in range(len(texts))
        ]


def build_sampler_from_config(config: LatentServiceConfig, expected_policy_hidden_size: int | None = None):
    """``LatentSampler.from_checkpoint`` with the service's device/dtype knobs."""
    from recipe.iib_lpo.latent.sampler import LatentSampler

    if not config.checkpoint_path:
        raise ValueError("iib_lpo.latent.service.checkpoint_path is required for latent.mode=cvae (a train_cvae checkpoint)")
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, config.encoder_dtype) if device != "cpu" else torch.float32
    return LatentSampler.from_checkpoint(
        config.checkpoint_path,
        expected_policy_hidden_size=expected_policy_hidden_size,
        encoder_name_or_path=config.encoder_name_or_path,
        device=device,
        encoder_dtype=dtype,
        micro_batch_size=config.micro_batch_size,
    )


class _LatentServiceActor:
    """Ray actor body: a BatchingLatentService around a GPU-resident LatentSampler."""

    def __init__(self, config: LatentServiceConfig, expected_policy_hidden_size: int | None = None):
        self._service = BatchingLatentService(
            lambda: build_sampler_from_config(config, expected_policy_hidden_size),
            max_batch_size=config.max_batch_size,
            max_wait_ms=config.max_wait_ms,
            sibling_coupling=config.sibling_coupling,
        )

    async def sample(self, condition_text: str, num_samples: int, alpha: float, seed: int | None = None):
        return await self._service.sample(condition_text, num_samples, alpha, seed)

    def stats(self) -> dict[str, Any]:
        return self._service.stats()


class LatentServiceClient:
    """What the agent loop awaits: ``sample(condition_text, num_samples, alpha, seed)``."""

    def __init__(self, service: BatchingLatentService | None = None, actor: Any = None):
        if (service is None) == (actor is None):
            raise ValueError("LatentServiceClient needs exactly one of service= or actor=")
        self._service = service
        self._actor = actor

    async def sample(self, condition_text: str, num_samples: int, alpha: float, seed: int | None = None) -> LatentDraw | None:
        if self._service is not None:
            return await self._service.sample(condition_text, num_samples, alpha, seed)
        return await self._actor.sample.remote(condition_text, num_samples, alpha, seed)

    async def stats(self) -> dict[str, Any]:
        if self._service is not None:
            return self._service.stats()
        return await self._actor.stats.remote()


def latent_service_actor_name() -> str:
    """Per-trainer actor name: all processes of one Ray job (one trainer) share the service."""
    import ray

    return f"iib_lpo_latent_service_{ray.get_runtime_context().get_job_id()}"


# One client per (process, config): every session of an agent-loop worker shares it, so the
# in-process backend batches across the worker's sessions.
_CLIENTS: dict[Any, LatentServiceClient] = {}


def get_latent_service_client(
    config: LatentServiceConfig,
    expected_policy_hidden_size: int | None = None,
    sampler_factory: Callable[[], Any] | None = None,
) -> LatentServiceClient:
    """The process-wide client for ``config`` (created on first use).

    ``sampler_factory`` (in_process backend only) replaces ``LatentSampler.from_checkpoint``,
    e.g. with a fake sampler in tests or a sampler built from an in-memory CVAE in the demo.
    """
    key = (config, expected_policy_hidden_size, sampler_factory, os.getpid())
    client = _CLIENTS.get(key)
    if client is not None:
        return client
    if config.backend == "in_process":
        factory = sampler_factory or (lambda: build_sampler_from_config(config, expected_policy_hidden_size))
        client = LatentServiceClient(service=BatchingLatentService(
            factory, config.max_batch_size, config.max_wait_ms, config.sibling_coupling))
    else:
        if sampler_factory is not None:
            raise ValueError("sampler_factory is only supported by the in_process backend")
        import ray

        actor_cls = ray.remote(_LatentServiceActor)
        actor = actor_cls.options(
            name=latent_service_actor_name(),
            get_if_exists=True,
            lifetime="detached" if config.detached else None,
            num_gpus=config.num_gpus,
            num_cpus=config.num_cpus,
            max_concurrency=4096,
        ).remote(config, expected_policy_hidden_size)
        client = LatentServiceClient(actor=actor)
    _CLIENTS[key] = client
    return client
