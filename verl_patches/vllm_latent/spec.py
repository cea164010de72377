"""Names shared by the request side (agent loop) and the engine side (vLLM model/processor).

Kept free of vLLM imports so that building requests never imports the engine.
"""

# The latent rides vLLM's multimodal path as a precomputed one-token "image" embedding: "image"
# is the modality whose embedding inputs vLLM 0.24 parses natively (`image_embeds`), and verl
# 0.9.1's vLLMHttpServer.generate already forwards `image_data` as multi_modal_data["image"].
LATENT_MODALITY = "image"
LATENT_EMBEDS_FIELD = f"{LATENT_MODALITY}_embeds"

# hf_config attribute (set through engine arg `hf_overrides`) naming the placeholder token id.
PLACEHOLDER_CONFIG_KEY = "latent_placeholder_token_id"

# Module holding the vLLM model classes; registered lazily as "module:Class" strings, which vLLM
# inspects in a subprocess, so it must be importable from the installed package.
MODEL_MODULE = "verl_patches.vllm_latent.model"

# Stock Hugging Face architecture -> latent-token architecture (same checkpoint, same weights).
LATENT_ARCHITECTURES: dict[str, str] = {
    "Qwen2ForCausalLM": "Qwen2LatentForCausalLM",
    "Qwen3ForCausalLM": "Qwen3LatentForCausalLM",
}

# vLLM returns the log-probs of the distribution it samples from (after temperature, and after
# top-k/top-p masking when those are set) only in this mode; the default "raw_logprobs" is the
# temperature-1 distribution. verl 0.9.1's rollout config defaults to the same value.
SAMPLING_LOGPROBS_MODE = "processed_logprobs"
