"""The latent stage (METHOD.md step 3 and "The CVAE stage"): the CVAE and projector P (cvae),
the condition-text encoder (text_encoder), drawing latents from the prior (sampler), the
batched latent service the rollout calls (service), CVAE training (training, run as
``python -m recipe.iib_lpo.train_cvae``), and the transformers reference of the latent token
(reference).
"""
