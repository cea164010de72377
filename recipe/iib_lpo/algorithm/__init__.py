"""The method as pure functions (tensors and lists in, tensors out; METHOD.md steps 1-2, 6-8).

Imports only torch, numpy and the standard library: nothing of verl, vLLM or the rest of the
recipe (tests/test_import_layers.py). entropy (step 1), branching (2), alpha_schedule (the latent
schedule of step 4), ib (6: S_IB estimators, Top-N), advantage (7), ib_step (6-7 over one
training batch), loss_terms (8: the optional IB regulariser's per-token term).
"""
