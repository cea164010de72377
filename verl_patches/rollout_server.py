"""verl's vLLM rollout server, extended for branching rollouts (selected by ``rollout.name``).

``actor_rollout_ref.rollout.name=iib_lpo_vllm`` selects ``IibLpoVLLMReplica`` (registered with
verl's ``RolloutReplicaRegistry``), whose server actor is ``IibLpoVLLMHttpServer``, a subclass of
verl 0.9.1's ``vLLMHttpServer``. Everything else (weight sync, sleep/wake, abort, routing) is
verl's own. What the subclass adds:

(a) **Top-k log-probs per generated token.** verl rewrites ``sampling_params["logprobs"]`` to
    0/None, so the agent loop could not compute the entropy of the sampling distribution without
    a second forward pass. ``generate(..., num_topk_logprobs=k)`` asks vLLM for the k largest
    log-probs of each step and returns them as ``extra_fields["topk_logprobs"]`` (float32 numpy
    ``[num_generated_tokens, k]``, each row sorted descending). They are vLLM's
    ``processed_logprobs`` (verl's default ``rollout.logprobs_mode``): the distribution actually
    sampled from, after temperature and top-k/top-p masking (masked entries are -inf). Any other
    ``logprobs_mode`` is refused when top-k log-probs are requested: raw log-probs are the
    temperature-1 distribution, not the one sampled. k is capped by vLLM's ``max_logprobs``
    (knob ``max_topk_logprobs`` below, default 20). With ``return_topk_token_ids=True`` as well,
    the token ids of those entries come back as ``extra_fields["topk_token_ids"]`` (int64
    ``[num_generated_tokens, k]``, aligned with the log-probs): the fork row that
    ``iib_lpo.branching.sibling_first_tokens=distinct`` draws the siblings' first tokens from.
(b) **The latent embedding** travels through verl's own request plumbing: the client's
    ``image_data`` becomes ``multi_modal_data["image"]`` in ``vLLMHttpServer.generate`` (stock
    verl); nothing to override.
(c) **Latent engine arguments.** With ``latent_injection: true`` the engine is started with
    ``verl_patches.vllm_latent.latent_engine_kwargs`` (the latent-token architecture of the
    checkpoint's own architecture, embedding inputs on, prefix caching on), with its
    ``hf_overrides`` merged into verl's (quantization) and the user's instead of replacing them,
    and the placeholder token is banned from sampling (as verl bans vision placeholders): the
    rollout distribution is the policy renormalised without that one token.

Knobs live in ``actor_rollout_ref.rollout.custom.iib_lpo`` (verl's extension point for custom
rollout configuration, the only config the server actor receives):

- ``latent_injection`` (bool, default False): start the engine with the latent-token model.
  Needed for ``iib_lpo.latent.mode != none``; without it a latent request fails in vLLM.
- ``latent_placeholder_token_id`` (int, required with ``latent_injection``): the token id whose
  position the latent fills (METHOD.md, "Latent injection").
- ``max_topk_logprobs`` (int, default 20 = vLLM's default): vLLM ``max_logprobs``; the most
  top-k log-probs a request may ask for (METHOD.md step 1 asks for k >= 20).

Why a new ``rollout.name`` instead of replacing verl's "vllm" entry: selection stays explicit in
config and a plain verl run in the same environment is untouched. Cost (verl compares the name
with "vllm" in a few places): per-request ``priority`` is not forwarded by verl's client (it only
does so for "vllm"; the default fcfs scheduling ignores it anyway), verl's LoRA validation in
``verl.utils.config`` and the delta-sharded checkpoint backend treat the name as unknown.
The worker-side weight-sync adapter stays verl's vLLM ``ServerAdapter``: it is registered under
the new name in ``verl.workers.rollout.base._ROLLOUT_REGISTRY`` (a module-level dict with no
register function).

This module is imported on every ``import verl`` (plugin registration), so it must stay light:
the server and replica classes import vLLM and are defined on first attribute access
(PEP 562 module ``__getattr__``) under their module-level names, so Ray pickles them by
reference and every actor process builds them the same way.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any

from verl_patches.vllm_latent.spec import SAMPLING_LOGPROBS_MODE

logger = logging.getLogger(__name__)

ROLLOUT_NAME = "iib_lpo_vllm"
"""``actor_rollout_ref.rollout.name`` that selects this server."""

CUSTOM_CONFIG_KEY = "iib_lpo"
"""Key under ``actor_rollout_ref.rollout.custom`` holding this server's knobs."""

TOPK_LOGPROBS_FIELD = "topk_logprobs"
"""``TokenOutput.extra_fields`` key of the ``[num_generated_tokens, k]`` top-k log-probs."""

TOPK_TOKEN_IDS_FIELD = "topk_token_ids"
"""``TokenOutput.extra_fields`` key of their token ids (with ``return_topk_token_ids=True``)."""

DEFAULT_MAX_TOPK_LOGPROBS = 20

_LAZY_CLASSES = ("IibLpoVLLMHttpServer", "IibLpoVLLMReplica")

# Per-request state handed from IibLpoVLLMHttpServer.generate to the engine proxy below. Ray runs
# each call of an async actor method as its own asyncio task, and a task's context is copied at
# creation, so concurrent requests never see each other's values.
_REQUESTED_TOPK: contextvars.ContextVar[int] = contextvars.ContextVar("iib_lpo_requested_topk", default=0)
_CAPTURED_TOPK: contextvars.ContextVar[list | None] = contextvars.ContextVar("iib_lpo_captured_topk", default=None)


def server_options(rollout_config: Any) -> dict[str, Any]:
    """The validated ``rollout.custom.iib_lpo`` knobs (defaults filled in)."""
    custom = getattr(rollout_config, "custom", None)
    if custom is None and isinstance(rollout_config, dict):
        custom = rollout_config.get("custom")
    raw = dict((custom or {}).get(CUSTOM_CONFIG_KEY) or {})
    known = {"latent_injection", "latent_placeholder_token_id", "max_topk_logprobs"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown keys in rollout.custom.{CUSTOM_CONFIG_KEY}: {unknown}; known: {sorted(known)}")
    options = {
        "latent_injection": bool(raw.get("latent_injection", False)),
        "latent_placeholder_token_id": raw.get("latent_placeholder_token_id"),
        "max_topk_logprobs": int(raw.get("max_topk_logprobs", DEFAULT_MAX_TOPK_LOGPROBS)),
    }
    if options["max_topk_logprobs"] < 1:
        raise ValueError(f"rollout.custom.{CUSTOM_CONFIG_KEY}.max_topk_logprobs must be >= 1")
    if options["latent_injection"]:
        token_id = options["latent_placeholder_token_id"]
        if token_id is None or isinstance(token_id, bool) or int(token_id) != token_id or int(token_id) < 0:
            raise ValueError(
                f"rollout.custom.{CUSTOM_CONFIG_KEY}.latent_injection=True needs a non-negative integer "
                f"latent_placeholder_token_id, got {token_id!r}"
            )
        options["latent_placeholder_token_id"] = int(token_id)
    return options


def validate_topk_request(num_topk_logprobs: Any, max_topk_logprobs: int, logprobs_mode: str | None) -> int:
    """Check a requested number of top-k log-probs; returns it as an int (0 = none requested)."""
    if num_topk_logprobs is None or num_topk_logprobs == 0:
        return 0
    if isinstance(num_topk_logprobs, bool) or int(num_topk_logprobs) != num_topk_logprobs or num_topk_logprobs < 0:
        raise ValueError(f"num_topk_logprobs must be a non-negative int, got {num_topk_logprobs!r}")
    k = int(num_topk_logprobs)
    if k > max_topk_logprobs:
        raise ValueError(
            f"num_topk_logprobs={k} exceeds the engine's max_logprobs={max_topk_logprobs}; raise "
            f"actor_rollout_ref.rollout.custom.{CUSTOM_CONFIG_KEY}.max_topk_logprobs"
        )
    if logprobs_mode != SAMPLING_LOGPROBS_MODE:
        raise ValueError(
            f"top-k log-probs for the sampling entropy need rollout.logprobs_mode={SAMPLING_LOGPROBS_MODE!r} "
            f"(the distribution after temperature/top-p), got {logprobs_mode!r}"
        )
    return k


class _TopkLogprobsEngine:
    """Wraps vLLM's AsyncLLM: asks for k log-probs when the current request wants them, and
    records the final output's top-k rows. Every other attribute is the engine's own."""

    def __init__(self, engine: Any):
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def generate(self, *args: Any, **kwargs: Any):
        k = _REQUESTED_TOPK.get()
        if k:
            sampling_params = kwargs["sampling_params"].clone()
            # vLLM returns the k largest log-probs per step (plus the sampled token when it is not
            # among them); verl reads the sampled token's log-prob from the same dict.
            sampling_params.logprobs = k
            kwargs["sampling_params"] = sampling_params
        final = None
        async for output in self._engine.generate(*args, **kwargs):
            final = output
            yield output
        captured = _CAPTURED_TOPK.get()
        if k and captured is not None and final is not None and final.outputs:
            from verl_patches.vllm_latent import topk_logprobs_and_ids

            logprobs, token_ids = topk_logprobs_and_ids(final.outputs[0].logprobs, k)
            captured.append((logprobs.numpy(), token_ids.numpy()))


def register_rollout_server() -> None:
    """Register ``ROLLOUT_NAME`` with verl's replica registry and worker-side adapter registry."""
    from verl.workers.rollout import base as rollout_base
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_replica_class)
    # The training worker's weight-sync adapter for this server is verl's own vLLM adapter. verl
    # 0.9.1 offers no public register function for it, so the private dict is written; refuse
    # clearly if a verl upgrade changed it rather than failing later inside get_rollout_class.
    adapters = getattr(rollout_base, "_ROLLOUT_REGISTRY", None)
    if not isinstance(adapters, dict) or ("vllm", "async") not in adapters:
        raise RuntimeError(
            "verl.workers.rollout.base._ROLLOUT_REGISTRY is missing or has no ('vllm', 'async') entry: "
            f"this verl ({_verl_version()}) changed how rollout adapters are registered; "
            f"the '{ROLLOUT_NAME}' rollout was written against verl 0.9.1 (verl_patches/README.md)"
        )
    adapters[(ROLLOUT_NAME, "async")] = adapters[("vllm", "async")]


def _verl_version() -> str:
    try:
        from importlib.metadata import version

        return version("verl")
    except Exception:  # a source checkout without metadata
        return "unknown version"


def _load_replica_class():
    return __getattr__("IibLpoVLLMReplica")


def _define_classes() -> None:
    import numpy as np
    import ray
    from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMHttpServer, vLLMReplica

    class IibLpoVLLMHttpServer(vLLMHttpServer):
        """verl's vLLM server + top-k log-probs per token + latent-token engine arguments."""

        def _post_init(self, cuda_visible_devices: str) -> None:
            super()._post_init(cuda_visible_devices)
            self.iib_lpo_options = server_options(self.config)
            self._extra_hf_overrides: dict[str, Any] = {}

        def _preprocess_engine_kwargs(self, engine_kwargs: dict) -> None:
            super()._preprocess_engine_kwargs(engine_kwargs)
            options = self.iib_lpo_options
            # verl applies engine_kwargs after its own args, so an hf_overrides there would replace
            # verl's quantization overrides; collect them here and merge in _apply_quantization.
            self._extra_hf_overrides = dict(engine_kwargs.pop("hf_overrides", None) or {})
            engine_kwargs.setdefault("max_logprobs", options["max_topk_logprobs"])
            if not options["latent_injection"]:
                return
            from verl_patches.vllm_latent import latent_engine_kwargs

            if self.config.get("limit_images", None):
                raise ValueError("rollout.limit_images cannot be combined with latent injection (one latent per request)")
            architectures = list(getattr(self.model_config.hf_config, "architectures", None) or [])
            if len(architectures) != 1:
                raise ValueError(f"latent injection needs exactly one HF architecture, the checkpoint has {architectures}")
            latent_kwargs = latent_engine_kwargs(architectures[0], options["latent_placeholder_token_id"])
            self._extra_hf_overrides.update(latent_kwargs.pop("hf_overrides"))
            for key, value in latent_kwargs.items():
                if key in engine_kwargs and engine_kwargs[key] != value:
                    raise ValueError(
                        f"engine_kwargs.vllm.{key}={engine_kwargs[key]!r} conflicts with latent injection, "
                        f"which needs {value!r}"
                    )
                engine_kwargs[key] = value
            logger.info("latent injection on: hf_overrides=%s, engine kwargs=%s", self._extra_hf_overrides, latent_kwargs)

        def _apply_quantization(self):
            quantization, hf_overrides = super()._apply_quantization()
            overlap = set(hf_overrides) & set(self._extra_hf_overrides)
            if overlap:
                raise ValueError(f"hf_overrides keys {sorted(overlap)} are set both by quantization and by the recipe")
            return quantization, {**hf_overrides, **self._extra_hf_overrides}

        async def run_server(self, args):
            await super().run_server(args)
            if self.iib_lpo_options["latent_injection"]:
                from verl.workers.rollout.utils import get_vision_placeholder_token_ids

                # Like verl's vision placeholders, the latent placeholder means nothing without
                # its embedding: the policy must never emit it (a sampled one would also end up
                # inside a later branch's prefix). Out-of-vocabulary placeholders (Qwen2.5's unused
                # rows) are already masked by verl; this covers in-vocabulary ones.
                banned = set(get_vision_placeholder_token_ids(self.model_config.processor) or [])
                banned.add(self.iib_lpo_options["latent_placeholder_token_id"])
                # verl's own worker-extension method (by name: vLLM refuses to ship callables). A
                # second call wraps compute_logits once more with the extended list (the first
                # wrapper masks a subset, so the result is the union); its MoE weight-loader
                # patch only re-assigns the same loaders.
                await self.engine.collective_rpc(
                    method="monkey_patch_model",
                    kwargs={"vocab_size": len(self.model_config.tokenizer), "banned_token_ids": sorted(banned)},
                )
            self.engine = _TopkLogprobsEngine(self.engine)

        async def generate(self, *args: Any, num_topk_logprobs: int = 0, return_topk_token_ids: bool = False,
                           **kwargs: Any):
            k = validate_topk_request(
                num_topk_logprobs, self.iib_lpo_options["max_topk_logprobs"], self.config.logprobs_mode
            )
            if return_topk_token_ids and not k:
                raise ValueError("return_topk_token_ids needs num_topk_logprobs >= 1")
            if not k:
                return await super().generate(*args, **kwargs)
            if self._disaggregation_role != "null":
                raise NotImplementedError("top-k log-probs are not supported with PD disaggregation")
            captured: list = []
            requested_token = _REQUESTED_TOPK.set(k)
            captured_token = _CAPTURED_TOPK.set(captured)
            try:
                output = await super().generate(*args, **kwargs)
            finally:
                _REQUESTED_TOPK.reset(requested_token)
                _CAPTURED_TOPK.reset(captured_token)
            if output.stop_reason == "aborted" and not output.token_ids:
                return output
            if len(captured) != 1:
                raise RuntimeError(f"expected one top-k log-prob capture for the request, got {len(captured)}")
            topk, topk_ids = captured[0]
            if topk.shape != (len(output.token_ids), k):
                raise RuntimeError(
                    f"top-k log-probs have shape {topk.shape}, expected ({len(output.token_ids)}, {k})"
                )
            output.extra_fields[TOPK_LOGPROBS_FIELD] = np.ascontiguousarray(topk, dtype=np.float32)
            if return_topk_token_ids:
                output.extra_fields[TOPK_TOKEN_IDS_FIELD] = np.ascontiguousarray(topk_ids, dtype=np.int64)
            return output

    class IibLpoVLLMReplica(vLLMReplica):
        """verl's vLLM replica whose server actor is IibLpoVLLMHttpServer."""

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            server_options(self.config)  # fail in the driver, not inside a Ray actor
            self.server_class = ray.remote(IibLpoVLLMHttpServer)

        def _get_server_name_prefix(self) -> str:
            return f"{ROLLOUT_NAME}_"

    # Give the classes and their methods module-level names, so cloudpickle (Ray) pickles them by
    # reference (importable as ``verl_patches.rollout_server.<Class>.<method>``) and not by value.
    for cls in (IibLpoVLLMHttpServer, IibLpoVLLMReplica):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
        for attr_name, attr in vars(cls).items():
            if callable(attr) and hasattr(attr, "__qualname__"):
                attr.__qualname__ = f"{cls.__name__}.{attr_name}"
        globals()[cls.__name__] = cls


def __getattr__(name: str) -> Any:
    if name in _LAZY_CLASSES:
        if name not in globals():
            _define_classes()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
