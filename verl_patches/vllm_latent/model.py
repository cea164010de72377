"""vLLM-side model classes: Qwen2/Qwen3 causal LMs that accept one latent token per request.

Imported only inside vLLM processes (the plugin registers these classes lazily by their
"module:Class" string, so importing ``verl_patches.vllm_latent`` itself never imports this file).

How the latent reaches the model (VLLM_LATENT.md, "recommended path"): the latent vector
v = alpha * P(z) travels as a precomputed, one-token "image" embedding
(``multi_modal_data={"image": v[1,1,H]}``), passed through untouched by the processor below (no
Hugging Face processor is involved). The last prompt token, the fork token, is the latent's
position and keeps its id; the model adds v to its embedding row, E[fork] + v, so v = 0 is the
plain prompt exactly (recipe/iib_lpo/latent/reference.py). The placeholder id only marks the
latent's position in vLLM's multimodal bookkeeping (and in its profiling runs' dummy prompts,
where v is added to the placeholder's own row). Every other weight, the forward pass and ``load_weights`` are inherited from vLLM's stock
Qwen2/Qwen3 classes.
- vLLM's prefix cache keys the block holding the latent's position (and all later blocks) by the
  content hash of v, so KV computed with one latent is never served to a request with another.
- The placeholder id lies inside the embedding matrix (checked at start), so vLLM never masks a
  latent position's id before embedding it: the fork token keeps its own row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers import BatchFeature

from vllm.config import VllmConfig
from vllm.config.multimodal import BaseDummyOptions
from vllm.inputs import MultiModalDataDict, MultiModalInput
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    ProcessorInputs,
    PromptReplacement,
    PromptUpdate,
    TimingContext,
)
from vllm.multimodal.processing.processor import MultiModalPromptUpdates, PlaceholderFeaturesInfo

from verl_patches.vllm_latent.spec import (
    LATENT_EMBEDS_FIELD,
    LATENT_MODALITY,
    PLACEHOLDER_CONFIG_KEY,
)


def _placeholder_token_id(hf_config) -> int:
    """The latent placeholder id the engine was started with (set through ``hf_overrides``)."""
    token_id = getattr(hf_config, PLACEHOLDER_CONFIG_KEY, None)
    if token_id is None:
        raise ValueError(
            f"the latent-token architecture needs hf_overrides[{PLACEHOLDER_CONFIG_KEY!r}] "
            "(use verl_patches.vllm_latent.latent_engine_kwargs to build the engine args)"
        )
    return int(token_id)


class LatentTokenProcessingInfo(BaseProcessingInfo):
    """At most one latent per request, and a latent always fills exactly one token position."""

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {LATENT_MODALITY: 1}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        # Known exactly, so vLLM never needs to build dummy inputs to measure it.
        return {LATENT_MODALITY: 1}

    def placeholder_token_id(self) -> int:
        return _placeholder_token_id(self.get_hf_config())


class LatentTokenDummyInputsBuilder(BaseDummyInputsBuilder[LatentTokenProcessingInfo]):
    """Dummy inputs for vLLM's profiling runs: placeholder tokens and zero latent embeddings."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        placeholder = self.info.get_tokenizer().decode([self.info.placeholder_token_id()])
        return placeholder * mm_counts.get(LATENT_MODALITY, 0)

    def get_dummy_mm_data(
        self,
        seq_len: int,
        mm_counts: Mapping[str, int],
        mm_options: Mapping[str, BaseDummyOptions],
    ) -> MultiModalDataDict:
        num_latents = mm_counts.get(LATENT_MODALITY, 0)
        hidden_size = self.info.ctx.model_config.get_inputs_embeds_size()
        return {LATENT_MODALITY: torch.zeros(num_latents, 1, hidden_size)}


class LatentTokenMultiModalProcessor(BaseMultiModalProcessor[LatentTokenProcessingInfo]):
    """Passes the precomputed latent embedding through; no Hugging Face processor exists for it."""

    def apply(self, inputs: ProcessorInputs, timing_ctx: TimingContext) -> MultiModalInput:
        # limit_mm_per_prompt={"image": 0} (embedding-only mode) makes vLLM skip its own item-count
        # check for embeddings, so the one-latent-per-request rule is enforced here.
        num_latents = inputs.mm_data_items.get_count(LATENT_MODALITY, strict=False)
        if num_latents > 1:
            raise ValueError(f"at most one latent per request, got {num_latents}")
        if num_latents == 1 and not isinstance(inputs.prompt, list):
            raise ValueError("a latent needs a token-id prompt (build it with verl_patches.vllm_latent.build_latent_prompt)")
        if num_latents == 1 and not inputs.prompt:
            raise ValueError("a latent needs a non-empty prompt (it is added to, or follows, the last token)")
        # A caller-given uuid would replace the latent's content hash in the prefix-cache key, and a
        # reused uuid would serve KV computed with another latent.
        uuids = (inputs.mm_uuid_items or {}).get(LATENT_MODALITY)
        if uuids is not None and any(uuid is not None for uuid in uuids):
            raise ValueError("multi_modal_uuids must not be given for latents (prefix-cache safety)")
        return super().apply(inputs, timing_ctx)

    def _call_hf_processor(
        self,
        prompt: str,
        mm_data: Mapping[str, object],
        mm_kwargs: Mapping[str, object],
        tok_kwargs: Mapping[str, object],
    ) -> BatchFeature:
        # vLLM 0.24's base class insists on a transformers ProcessorMixin even for embedding-only
        # inputs. Text is only tokenized here (text prompts and vLLM's dummy-text path); the
        # latent embedding arrives as "passthrough" data and is added back by the base class.
        if mm_data:
            raise ValueError(
                f"the latent token accepts only precomputed embeddings "
                f"(multi_modal_data={{{LATENT_MODALITY!r}: tensor[1, 1, hidden]}}), got raw {sorted(mm_data)}"
            )
        prompt_ids = self.info.get_tokenizer().encode(prompt, add_special_tokens=False)
        return BatchFeature({"input_ids": [prompt_ids]})

    def _maybe_apply_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        prompt_ids: list[int],
        mm_kwargs,
        mm_prompt_updates: MultiModalPromptUpdates,
        is_update_applied: bool,
    ) -> tuple[list[int], Mapping[str, list[PlaceholderFeaturesInfo]]]:
        # Additive latent: a prompt that does not end with the placeholder carries the latent on
        # its last token, the fork token, which keeps its id (the model adds v to its row).
        placeholder = self.info.placeholder_token_id()
        if mm_items.get_count(LATENT_MODALITY, strict=False) == 1 and prompt_ids[-1] != placeholder:
            self._validate_mm_kwargs(mm_kwargs, mm_items.get_all_counts())
            fork = PlaceholderFeaturesInfo(
                modality=LATENT_MODALITY, item_idx=0, start_idx=len(prompt_ids) - 1,
                tokens=[prompt_ids[-1]], is_embed=None,
            )
            return prompt_ids, {LATENT_MODALITY: [fork]}
        return super()._maybe_apply_prompt_updates(
            mm_items, prompt_ids, mm_kwargs, mm_prompt_updates, is_update_applied
        )

    def _get_mm_fields_config(
        self,
        hf_inputs: BatchFeature,
        hf_processor_mm_kwargs: Mapping[str, object],
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {LATENT_EMBEDS_FIELD: MultiModalFieldConfig.batched(LATENT_MODALITY)}

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        # The placeholder stays one token long: it only tells vLLM where the latent goes.
        placeholder = self.info.placeholder_token_id()
        return [PromptReplacement(modality=LATENT_MODALITY, target=[placeholder], replacement=[placeholder])]


class _LatentTokenMethods:
    """Multimodal hooks shared by the Qwen2 and Qwen3 latent-token models.

    A plain class placed before the stock model in the MRO (so its ``embed_input_ids`` wins);
    ``SupportsMultiModal`` itself goes last, after ``nn.Module``, as in vLLM's own VLMs.
    """

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        # Chat-message images are not a latent: the latent path is token-in only.
        return None

    def _init_latent_token(self, vllm_config: VllmConfig) -> None:
        config = vllm_config.model_config.hf_config
        placeholder = _placeholder_token_id(config)
        # Pipeline-parallel ranks after the first have no embedding table (nothing to check).
        embedding_rows = getattr(getattr(self.model, "embed_tokens", None), "org_vocab_size", None)
        if embedding_rows is not None and not 0 <= placeholder < embedding_rows:
            raise ValueError(
                f"latent placeholder id {placeholder} is outside the embedding matrix "
                f"({embedding_rows} rows); pick an unused row, e.g. >= 151665 for Qwen2.5"
            )
        self.configure_mm_token_handling(config.get_text_config().vocab_size, [placeholder])

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        latent_embeds = kwargs.pop(LATENT_EMBEDS_FIELD, None)
        if latent_embeds is None:
            return []
        items = list(latent_embeds.unbind(0)) if isinstance(latent_embeds, torch.Tensor) else list(latent_embeds)
        hidden_size = self.config.hidden_size
        dtype = self.model.embed_tokens.weight.dtype
        out = []
        for item in items:
            item = item.reshape(-1, item.shape[-1]) if item.dim() != 2 else item
            if tuple(item.shape) != (1, hidden_size):
                raise ValueError(f"a latent embedding must have shape [1, {hidden_size}], got {tuple(item.shape)}")
            out.append(item.to(dtype=dtype))
        return out

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: MultiModalEmbeddings | None = None,
        *,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # The stock class's one-argument embed_input_ids precedes SupportsMultiModal's in the
        # MRO, so the merge is written here: the latent position gets E[token] + v, summed in the
        # model dtype as in the reference (recipe/iib_lpo/latent/reference.add_to_fork_token).
        inputs_embeds = self._embed_text_input_ids(
            input_ids, self.get_language_model().embed_input_ids, is_multimodal=is_multimodal
        )
        if multimodal_embeddings is None or len(multimodal_embeddings) == 0:
            return inputs_embeds
        if is_multimodal is None:
            raise ValueError("latent embeddings given without their positions (is_multimodal)")
        latents = torch.cat(list(multimodal_embeddings), dim=0).to(inputs_embeds.dtype)
        positions = is_multimodal.to(device=inputs_embeds.device).nonzero().squeeze(-1)
        if positions.numel() != latents.shape[0]:
            raise ValueError(f"{latents.shape[0]} latent rows for {positions.numel()} latent positions")
        inputs_embeds[positions] = inputs_embeds[positions] + latents
        return inputs_embeds


_register_processor = MULTIMODAL_REGISTRY.register_processor(
    LatentTokenMultiModalProcessor,
    info=LatentTokenProcessingInfo,
    dummy_inputs=LatentTokenDummyInputsBuilder,
)


@_register_processor
class Qwen2LatentForCausalLM(_LatentTokenMethods, Qwen2ForCausalLM, SupportsMultiModal):
    """vLLM's Qwen2ForCausalLM plus one latent token per request (weights are stock Qwen2)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_latent_token(vllm_config)


@_register_processor
class Qwen3LatentForCausalLM(_LatentTokenMethods, Qwen3ForCausalLM, SupportsMultiModal):
    """vLLM's Qwen3ForCausalLM plus one latent token per request (weights are stock Qwen3)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_latent_token(vllm_config)
