"""Evaluation: encode features once (with caching) and score them with the pure metrics of :mod:`clipheads.metrics`.

    import clipheads
    from clipheads.data import load_retrieval
    from clipheads.eval import evaluate_retrieval

    model = clipheads.load("bundled")
    data = load_retrieval("dataset_flickr30k.json", split="test")
    before = evaluate_retrieval(model, data)
    after = evaluate_retrieval(model, data, mask=clipheads.HeadMask.from_heads("L3.H7", model), op="identity")
    print(before.metrics["mean_recall"], after.metrics["mean_recall"])   # texts were encoded once

Feature-level functions (for searches that cache their own features) are re-exported here, e.g.
``retrieval_metrics(image_features [N_img, D], text_features [N_txt, D], text_to_image LongTensor [N_txt])``.
"""

from clipheads.eval.features import (
    DEFAULT_CACHE,
    EncodedImages,
    EncodeOptions,
    FeatureCache,
    encode_images,
    encode_text_batches,
    encode_texts,
    model_fingerprint,
    precision_context,
)
from clipheads.eval.tasks import (
    EVALUATORS,
    evaluate,
    evaluate_bias,
    evaluate_caption_selection,
    evaluate_compositional,
    evaluate_retrieval,
    evaluate_zeroshot,
)
from clipheads.metrics import (
    bias_metrics,
    caption_selection_metrics,
    compositional_metrics,
    max_skew,
    retrieval_metrics,
    zeroshot_classifier,
    zeroshot_metrics,
)
from clipheads.precision import PRECISIONS

__all__ = ["DEFAULT_CACHE", "EVALUATORS", "PRECISIONS", "EncodeOptions", "EncodedImages", "FeatureCache",
           "bias_metrics", "caption_selection_metrics", "compositional_metrics", "encode_images", "encode_text_batches",
           "encode_texts", "evaluate", "evaluate_bias", "evaluate_caption_selection", "evaluate_compositional",
           "evaluate_retrieval", "evaluate_zeroshot", "max_skew", "model_fingerprint", "precision_context",
           "retrieval_metrics", "zeroshot_classifier", "zeroshot_metrics"]
