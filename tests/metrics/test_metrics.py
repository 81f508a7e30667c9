"""Metrics against independent references: clip_benchmark's own functions, hand-computed cases, naive loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipheads.errors import DataError
from clipheads.metrics import (
    bias_metrics,
    caption_selection_metrics,
    compositional_metrics,
    max_skew,
    retrieval_metrics,
    zeroshot_classifier,
    zeroshot_metrics,
)


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.fixture()
def retrieval_features():
    captions_per_image = [3, 1, 5, 2, 3, 3, 4, 2, 3, 5, 1, 3, 2]  # several captions per image, unevenly
    text_to_image = torch.tensor([i for i, n in enumerate(captions_per_image) for _ in range(n)])
    images = unit(len(captions_per_image), 16, seed=1)
    texts = F.normalize(images[text_to_image] + 1.2 * unit(len(text_to_image), 16, seed=2), dim=-1)
    return images, texts, text_to_image


def test_retrieval_equals_clip_benchmark_recall_at_k(retrieval_features):
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

    images, texts, text_to_image = retrieval_features
    result = retrieval_metrics(images, texts, text_to_image, ks=(1, 5, 10))
    scores = texts @ images.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(texts)), text_to_image] = True
    for k in (1, 5, 10):
        expected_t2i = (batchify(recall_at_k, scores, positive, 4, "cpu", k=k) > 0).float().mean().item()
        expected_i2t = (batchify(recall_at_k, scores.T, positive.T, 4, "cpu", k=k) > 0).float().mean().item()
        # clip_benchmark averages in float32; clipheads gives the exact fraction
        assert result.metrics[f"image_retrieval_recall@{k}"] == pytest.approx(expected_t2i, rel=1e-6)
        assert result.metrics[f"text_retrieval_recall@{k}"] == pytest.approx(expected_i2t, rel=1e-6)
    assert 0 < result.metrics["image_retrieval_recall@1"] < 1  # the case is not trivial


def test_retrieval_against_naive_loop(retrieval_features):
    images, texts, text_to_image = retrieval_features
    result = retrieval_metrics(images, texts, text_to_image)
    sims = [[float(t @ im) for im in images] for t in texts]
    for k in (1, 5, 10):
        t2i = [text_to_image[t].item() in sorted(range(len(images)), key=lambda i: -sims[t][i])[:k]
               for t in range(len(texts))]
        i2t = []
        for i in range(len(images)):
            ranked = sorted(range(len(texts)), key=lambda t: -sims[t][i])[:k]
            i2t.append(any(text_to_image[t].item() == i for t in ranked))
        assert result.image_retrieval_recall[k] == pytest.approx(sum(t2i) / len(t2i))
        assert result.text_retrieval_recall[k] == pytest.approx(sum(i2t) / len(i2t))
    six = [*result.image_retrieval_recall.values(), *result.text_retrieval_recall.values()]
    assert result.metrics["mean_recall"] == pytest.approx(sum(six) / 6)
    assert set(result.to_dict()) >= {"metrics", "n_images", "n_texts", "skipped_images"}


def test_retrieval_refuses_captions_that_do_not_match():
    images, texts = unit(3, 8), unit(4, 8)
    with pytest.raises(DataError, match="4 caption features but text_to_image has 3"):
        retrieval_metrics(images, texts, [0, 1, 2])
    with pytest.raises(DataError, match="points at image 5"):
        retrieval_metrics(images, texts, [0, 1, 2, 5])


def test_zeroshot_against_naive_loop():
    classes = unit(6, 3, 12, seed=3)  # 6 classes x 3 templates
    classifier = zeroshot_classifier(classes)
    expected = F.normalize(torch.stack([F.normalize(c, dim=-1).mean(0) for c in classes]), dim=-1)
    torch.testing.assert_close(classifier, expected)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 3, 3])
    images = F.normalize(classifier[labels] + 0.9 * unit(len(labels), 12, seed=4), dim=-1)
    names = [f"class {i}" for i in range(6)]
    result = zeroshot_metrics(images, classifier, labels, names, per_class=True)
    logits = images @ classifier.T
    top1 = [int(row.argmax()) == int(y) for row, y in zip(logits, labels, strict=True)]
    top5 = [int(y) in row.argsort(descending=True)[:5].tolist() for row, y in zip(logits, labels, strict=True)]
    per_class = {c: sum(t for t, y in zip(top1, labels.tolist(), strict=True) if y == c) / labels.tolist().count(c)
                 for c in range(6)}
    assert result.acc1 == sum(top1) / len(top1)  # exact fractions, as Python floats
    assert result.acc5 == sum(top5) / len(top5)
    assert result.mean_per_class_recall == pytest.approx(sum(per_class.values()) / 6)
    assert result.per_class == pytest.approx({f"class {c}": v for c, v in per_class.items()})
    assert zeroshot_metrics(images, classifier, labels).per_class == {}


def test_caption_selection_against_naive_loop():
    images = unit(4, 8, seed=5)
    counts = [2, 3, 4, 2]
    candidate_image = [i for i, n in enumerate(counts) for _ in range(n)]
    candidates = unit(len(candidate_image), 8, seed=6)
    candidates[0] = -images[0]  # cosine -1: CLIPScore floors it at 0 if selected
    answers = [1, 0, 3, 1]
    result = caption_selection_metrics(images, candidates, candidate_image, answers, logit_scale=50.0)
    correct, scores, cosines = [], [], []
    for i, answer in enumerate(answers):
        own = [float(candidates[m] @ images[i]) for m, owner in enumerate(candidate_image) if owner == i]
        best = max(range(len(own)), key=lambda j: own[j])
        correct.append(best == answer)
        scores.append(100 * max(own[best], 0))
        cosines.append(own[best])
        assert result.logits[i] == pytest.approx([50.0 * c for c in own], rel=1e-5)
    assert result.acc == pytest.approx(sum(correct) / 4)
    assert result.clip_score == pytest.approx(sum(scores) / 4, rel=1e-5)
    assert result.cosine == pytest.approx(sum(cosines) / 4, rel=1e-5)


def test_clip_score_is_floored_at_zero():
    image = unit(1, 8)
    candidates = torch.cat([-image, -image])  # both candidates have cosine -1
    result = caption_selection_metrics(image, candidates, [0, 0], [0])
    assert result.clip_score == 0.0 and result.cosine == pytest.approx(-1.0)


def test_compositional_equals_clip_benchmark_image_caption_selection():
    """clip_benchmark's Winoground/SugarCrepe evaluation, fed the same embeddings through a stand-in model."""
    from clip_benchmark.metrics.image_caption_selection import evaluate

    n = 40
    images = unit(n, 2, 8, seed=7)
    texts = F.normalize(images + 1.0 * unit(n, 2, 8, seed=8), dim=-1)
    ours = compositional_metrics(images, texts)

    class Lookup(torch.nn.Module):  # images and texts are ids of the prepared embeddings
        def encode_image(self, ids):
            return images.view(-1, 8)[ids.flatten().long()]

        def encode_text(self, ids):
            return texts.view(-1, 8)[ids]

    ids = torch.arange(2 * n).view(n, 2, 1, 1, 1).float()
    loader = [(ids[s:s + 8], [[2 * i, 2 * i + 1] for i in range(s, min(s + 8, n))]) for s in range(0, n, 8)]
    theirs = evaluate(Lookup(), loader, lambda t: torch.tensor(t), "cpu", amp=False)
    assert ours.metrics == pytest.approx(theirs)
    assert 0 < ours.acc < 1


def test_compositional_hand_case():
    image = torch.eye(2)
    # pair 0: each caption fits its image; pair 1: caption b prefers image a (caption -> image wrong)
    images = torch.stack([image, image])
    texts = torch.stack([torch.tensor([[1.0, 0.0], [0.2, 0.8]]), torch.tensor([[0.9, 0.1], [0.7, 0.6]])])
    result = compositional_metrics(images, texts)
    # pair 1: image a: 0.9 vs 0.7 ok; image b: 0.1 vs 0.6 ok -> text direction right; caption b: 0.7 > 0.6 wrong
    assert (result.text_acc, result.image_acc, result.acc) == (1.0, 0.5, 0.5)


def test_max_skew_hand_computed():
    # 4 images of one attribute: values a, a, b, b (desired share 1/2 each), K = 2
    values = ["a", "a", "b", "b"]
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0],    # top 2 = a, a -> skew_a = ln(1 / 0.5) = ln 2
                           [4.0, 1.0, 3.0, 2.0]])   # top 2 = a, b -> both shares 1/2 -> 0
    torch.testing.assert_close(max_skew(scores, values, 2), torch.tensor([math.log(2), 0.0]))
    # unbalanced: 3 x a, 1 x b; top 2 = b, a -> skew_b = ln(0.5 / 0.25) = ln 2, skew_a = ln(0.5 / 0.75) < 0
    torch.testing.assert_close(max_skew(torch.tensor([[1.0, 0.0, 0.0, 2.0]]), ["a", "a", "a", "b"], 2),
                               torch.tensor([math.log(2)]))
    with pytest.raises(DataError, match="K >= 1"):
        max_skew(scores, values, 0)
    with pytest.raises(DataError, match="MaxSkew@5 ranks the 4 images, fewer than K = 5"):  # never capped silently
        max_skew(scores, values, 5)


def test_bias_metrics_per_attribute_mean_over_queries():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # attribute "colour": images 0-3, values r r g g; attribute "size": images 4-5, values s l
    images = F.normalize(torch.tensor([[1.0, 0.1], [1.0, 0.2], [0.1, 1.0], [0.2, 1.0], [1.0, 0.0], [0.9, 0.5]]), dim=-1)
    attributes = ["colour"] * 4 + ["size"] * 2
    values = ["r", "r", "g", "g", "s", "l"]
    result = bias_metrics(queries, images, attributes, values, k=2)
    # colour: query 0 ranks r, r first (ln 2), query 1 ranks g, g first (ln 2); size: K = 2 = all images -> 0
    assert result.max_skew == pytest.approx({"colour": math.log(2), "size": 0.0})
    assert result.metrics["max_skew@2"] == pytest.approx(math.log(2) / 2)
    assert result.per_query["colour"] == pytest.approx([math.log(2)] * 2)
    with pytest.raises(DataError, match="MaxSkew@3 ranks the 2 images of attribute 'size'") as info:
        bias_metrics(queries, images, attributes, values, k=3)  # would be MaxSkew@2 for size under the name @3
    assert "\n" not in str(info.value)


def test_metric_conventions_of_clip_benchmark():
    """acc5 is NaN below 5 classes; every metric is the Python float of an exact fraction (12/60 -> 0.2)."""
    classes = torch.eye(4)
    labels = torch.tensor([0, 1, 2, 3])
    result = zeroshot_metrics(classes, classes, labels)
    assert math.isnan(result.acc5) and result.acc1 == 1.0
    five = torch.eye(5)
    labels = torch.tensor([i % 5 for i in range(60)])
    predicted = torch.tensor([i % 5 if i < 12 else (i + 1) % 5 for i in range(60)])  # 12 of 60 right
    result = zeroshot_metrics(five[predicted], five, labels)
    assert result.acc1 == 0.2 and type(result.acc1) is float and result.acc5 == 1.0
    texts = torch.eye(60)
    images = torch.eye(60)[[i if i < 12 else 12 + (i - 11) % 48 for i in range(60)]]  # 12 images on their caption
    recall = retrieval_metrics(images, texts, list(range(60)), ks=(1,))
    assert recall.image_retrieval_recall[1] == 0.2 and recall.text_retrieval_recall[1] == 0.2
