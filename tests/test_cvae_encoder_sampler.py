"""Text encoder pooling / batching / truncation and the latent sampler (text_encoder.py, latent_sampler.py)."""

import pytest
import torch

from recipe.iib_lpo.latent.cvae import CVAEConfig, LatentCVAE
from recipe.iib_lpo.latent.reference import latent_token_embedding
from recipe.iib_lpo.latent.sampler import LatentSampler, build_condition_text, prior_condition_text
from recipe.iib_lpo.latent.text_encoder import (
    CONDITION_SEPARATOR,
    TextEncoder,
    build_tiny_encoder_dir,
    mean_pool,
    split_condition_text,
)

TEXTS = [
    "Tom has 3 apples.",
    "First compute the total. Then subtract the cost. So the answer is 12 and the area is 16.",
    "Let x be the number of pencils.",
]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return build_tiny_encoder_dir(tmp_path_factory.mktemp("tiny_encoder"), hidden_size=32, seed=0)


@pytest.fixture(scope="module")
def encoder(encoder_dir):
    return TextEncoder(encoder_dir, max_length=64, micro_batch_size=8)


def test_tiny_encoder_is_the_same_in_every_process(tmp_path):
    """Same seed, same files, also across processes (the tokenizers WordPiece trainer ordered tied
    pieces by hash, so each process got other token ids; mutation: going back to it fails this)."""
    import hashlib
    import subprocess
    import sys

    digests = []
    for i in range(2):
        out = tmp_path / f"enc{i}"
        subprocess.run([sys.executable, "-c", "import sys; from recipe.iib_lpo.latent.text_encoder import "
                        "build_tiny_encoder_dir as b; b(sys.argv[1], hidden_size=16, seed=3)", str(out)],
                       check=True, timeout=120, capture_output=True)
        digests.append({f: hashlib.sha256((out / f).read_bytes()).hexdigest()
                        for f in ("tokenizer.json", "model.safetensors", "config.json")})
    assert digests[0] == digests[1]


def test_mean_pool_known_values():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))
    with pytest.raises(ValueError, match="no unmasked tokens"):
        mean_pool(hidden, torch.zeros(1, 3))


def test_padding_does_not_change_an_embedding(encoder):
    together = encoder.encode(TEXTS)
    assert together.shape == (3, 32) and together.dtype == torch.float32
    for i, text in enumerate(TEXTS):  # alone = no padding at all
        torch.testing.assert_close(encoder.encode([text])[0], together[i], atol=1e-5, rtol=1e-5)
    # and equals a manual mean over the unpadded hidden states
    batch = encoder.tokenizer([TEXTS[0]], return_tensors="pt")
    with torch.no_grad():
        manual = encoder.model(**batch).last_hidden_state[0].mean(0)
    torch.testing.assert_close(together[0], manual, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together[0], together[2])


def test_padding_invariance_for_the_default_encoder_family(tmp_path):
    # deberta-v2 (relative positions) is the default encoder's architecture
    deberta = TextEncoder(build_tiny_encoder_dir(tmp_path, architecture="deberta-v2"), max_length=64)
    assert type(deberta.model).__name__ == "DebertaV2Model"
    together = deberta.encode(TEXTS)
    for i, text in enumerate(TEXTS):
        torch.testing.assert_close(deberta.encode([text])[0], together[i], atol=1e-5, rtol=1e-5)


def test_micro_batching_and_input_checks(encoder_dir, encoder):
    small = TextEncoder(encoder_dir, max_length=64, micro_batch_size=1)
    torch.testing.assert_close(small.encode(TEXTS), encoder.encode(TEXTS), atol=1e-5, rtol=1e-5)
    assert encoder.encode([]).shape == (0, 32)
    with pytest.raises(TypeError, match="not a single string"):
        encoder.encode("one text")
    with pytest.raises(ValueError, match="truncation_side"):
        TextEncoder(encoder_dir, truncation_side="middle")


def test_truncation_side_keeps_the_end_by_default(encoder_dir):
    ending = " then subtract the cost so the answer is 12 . then the total is 16"  # > 10 tokens
    a, b = "tom has 3 apples and" * 10 + ending, "the area of a square" * 10 + ending
    left = TextEncoder(encoder_dir, max_length=12)  # default: keep the end (the fork-point side)
    right = TextEncoder(encoder_dir, max_length=12, truncation_side="right")
    ea, eb = left.encode([a, b])
    torch.testing.assert_close(ea, eb)  # same last 10 tokens -> same embedding
    ra, rb = right.encode([a, b])
    assert (ra - rb).abs().max() > 1e-3


def test_build_condition_text():
    sep = CONDITION_SEPARATOR
    assert build_condition_text("What is 2+3?", "") == "What is 2+3?" + sep
    assert build_condition_text("What is 2+3?", "First, 2+3") == f"What is 2+3?{sep}First, 2+3"
    assert split_condition_text(build_condition_text("Q\nline 2", "a\nb")) == ("Q\nline 2", "a\nb")
    # a separator inside the inputs cannot move the split point
    assert split_condition_text(build_condition_text(f"Q{sep}x", f"p{sep}y")) == ("Q x", "p y")
    assert split_condition_text("plain text") is None
    with pytest.raises(ValueError, match="empty question"):
        build_condition_text("  ", "x")
    with pytest.raises(TypeError):
        build_condition_text("q", None)


def test_prior_condition_text_per_scheme():
    condition = build_condition_text("Tom has 3 apples.", "First, 3 + 5")
    assert prior_condition_text(condition, "question_prefix") == condition
    assert prior_condition_text(condition, "question") == build_condition_text("Tom has 3 apples.", "")
    assert prior_condition_text("plain", "question") == "plain"
    with pytest.raises(ValueError, match="condition_scheme"):
        prior_condition_text(condition, "prefix")


def _bare(encoder, text):
    return encoder.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_condition_truncation_keeps_the_question_and_the_end_of_the_prefix(encoder_dir):
    question = "tom has 3 apples and buys 5 more"
    steps = " ".join(f"then {i} + {i} = {2 * i} ." for i in range(30))  # ~240 tokens, unique numbers
    encoder = TextEncoder(encoder_dir, max_length=24)
    q_ids, p_ids = _bare(encoder, question), _bare(encoder, steps)
    assert len(q_ids) < 22 < len(q_ids) + len(p_ids)
    (ids,) = encoder.input_ids([build_condition_text(question, steps)])
    cls, sep = encoder.tokenizer.cls_token_id, encoder.tokenizer.sep_token_id
    room = 24 - 2 - len(q_ids)
    assert ids == [cls] + q_ids + p_ids[-room:] + [sep]  # question whole, then the prefix's last tokens
    kept = encoder.tokenizer.decode(ids, skip_special_tokens=True)
    assert kept.startswith(question) and "then 29 + 29" in kept  # the step nearest the fork
    assert "then 0 + 0" not in kept and "then 27 +" not in kept  # the prefix's start is what is cut
    # the question survives: same long prefix, different questions -> different embeddings ...
    other = "the area of a square is 16"
    e1, e2 = encoder.encode([build_condition_text(question, steps), build_condition_text(other, steps)])
    assert (e1 - e2).abs().max() > 1e-3
    # ... whereas cutting the joined text from the left (the old rule) loses it: identical embeddings
    plain1, plain2 = encoder.encode([f"{question}\n{steps}", f"{other}\n{steps}"])
    torch.testing.assert_close(plain1, plain2)
    # what lies beyond the budget at the prefix's start does not matter; its end does
    (e3,) = encoder.encode([build_condition_text(question, "a totally different opening . " + steps)])
    torch.testing.assert_close(e1, e3)
    (e4,) = encoder.encode([build_condition_text(question, steps + " so the answer is 12")])
    assert (e1 - e4).abs().max() > 1e-3


def test_condition_within_the_limit_and_a_question_over_it(encoder_dir):
    encoder = TextEncoder(encoder_dir, max_length=64)
    question, prefix = "let x be the number of pencils", "then 2x + 4 = 10"
    (ids,) = encoder.input_ids([build_condition_text(question, prefix)])
    assert ids == [encoder.tokenizer.cls_token_id] + _bare(encoder, question) + _bare(encoder, prefix) + [
        encoder.tokenizer.sep_token_id
    ]
    # plain texts within the limit: exactly the tokenizer's own encoding
    assert encoder.input_ids(TEXTS) == [encoder.tokenizer(t)["input_ids"] for t in TEXTS]
    # a question longer than the budget keeps its first tokens and leaves no room for the prefix
    small = TextEncoder(encoder_dir, max_length=8)
    long_question = "tom has 3 apples and buys 5 more apples today"
    (ids,) = small.input_ids([build_condition_text(long_question, prefix)])
    assert ids == [small.tokenizer.cls_token_id] + _bare(small, long_question)[:6] + [small.tokenizer.sep_token_id]
    with pytest.raises(ValueError, match="no room"):
        TextEncoder(encoder_dir, max_length=2)


class _CountingEncoder:
    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.embed_dim = inner.embed_dim

    def encode(self, texts):
        self.calls.append(list(texts))
        return self.inner.encode(texts)


def _sampler(encoder, condition_scheme="question_prefix"):
    torch.manual_seed(0)
    cvae = LatentCVAE(CVAEConfig(embed_dim=32, latent_dim=6, hidden_width=16, policy_hidden_size=64,
                                 projector_hidden_width=16))
    counting = _CountingEncoder(encoder)
    return LatentSampler(counting, cvae, device="cpu", condition_scheme=condition_scheme), counting, cvae


def test_sampler_one_encoder_call_shapes_and_definition(encoder):
    sampler, counting, cvae = _sampler(encoder)
    conditions = [build_condition_text(q, p) for q, p in [("Tom has 3 apples.", "First"), ("Let x be 2.", "")]]
    out = sampler.sample_latent_embeddings(conditions, num_samples=3, alpha=0.5,
                                           generator=torch.Generator().manual_seed(1))
    assert counting.calls == [conditions]  # one batched encoder call for all conditions
    assert out.embeddings.shape == (2, 3, 64) and out.z.shape == (2, 3, 6) and out.z_norms.shape == (2, 3)
    torch.testing.assert_close(out.embeddings, latent_token_embedding(cvae.projector, out.z, 0.5))
    torch.testing.assert_close(out.embeddings, 0.5 * cvae.projector(out.z))
    torch.testing.assert_close(out.z_norms, out.z.norm(dim=-1))
    # z are draws from the prior of each condition's embedding, with the same generator stream
    e_x = encoder.encode(conditions)
    expected_z = cvae.sample_prior(e_x, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out.z, expected_z, atol=1e-5, rtol=1e-5)
    # alpha scales the embedding linearly for the same draws
    out2 = sampler.sample_latent_embeddings(conditions, 3, alpha=1.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out2.embeddings, 2 * out.embeddings, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out.embeddings[0, 0], out.embeddings[0, 1])


def test_lars_scheme_sampler_queries_the_prior_with_the_question_alone(encoder):
    """A lars prior was trained on the question only: the rollout's prefix is dropped before encoding."""
    sampler, counting, cvae = _sampler(encoder, condition_scheme="question")
    conditions = [build_condition_text("Tom has 3 apples.", p) for p in ("First", "First, 3 + 5 = 8.", "")]
    out = sampler.sample_latent_embeddings(conditions, 2, alpha=1.0,
                                           generator=[torch.Generator().manual_seed(5) for _ in conditions])
    assert counting.calls == [[build_condition_text("Tom has 3 apples.", "")] * 3]
    torch.testing.assert_close(out.z[0], out.z[1])  # same question, same seed: prefix ignored
    torch.testing.assert_close(out.z[0], out.z[2])
    prefix_sampler, prefix_counting, _ = _sampler(encoder)  # same weights (seeded), question + prefix scheme
    out_p = prefix_sampler.sample_latent_embeddings(conditions, 2, alpha=1.0,
                                                    generator=[torch.Generator().manual_seed(5) for _ in conditions])
    assert prefix_counting.calls == [conditions]
    assert not torch.allclose(out_p.z[0], out_p.z[1])
    with pytest.raises(ValueError, match="condition_scheme"):
        LatentSampler(encoder, cvae, condition_scheme="lars")


def test_sampler_alpha_zero_means_no_latent_and_no_encoder_call(encoder):
    sampler, counting, _ = _sampler(encoder)
    assert sampler.sample_latent_embeddings(["q"], num_samples=4, alpha=0.0) is None
    assert counting.calls == []
    with pytest.raises(ValueError, match="alpha"):
        sampler.sample_latent_embeddings(["q"], 2, alpha=-0.1)
    with pytest.raises(ValueError, match="num_samples"):
        sampler.sample_latent_embeddings(["q"], 0, alpha=1.0)
    empty = sampler.sample_latent_embeddings([], 2, alpha=1.0)
    assert empty.embeddings.shape == (0, 2, 64) and counting.calls == []


def test_sampler_rejects_mismatched_encoder(encoder):
    cvae = LatentCVAE(CVAEConfig(embed_dim=1536, latent_dim=4, hidden_width=8, policy_hidden_size=8,
                                 projector_hidden_width=8))
    with pytest.raises(ValueError, match="embed_dim=32 but the CVAE expects embed_dim=1536"):
        LatentSampler(encoder, cvae)
