"""Would grammatical "an orange" change what the bundled model reads? Tokens, changed captions, mean-R per split.

The world's captions write "a orange circle" when a caption names no size. The bundled model's word-level
tokenizer has no "an"; this script shows how it tokenizes both forms and, on a world folder (e.g. the one
``clipheads demo --quick`` writes), how many captions "an" would change and the mean-R (both captions of every
image) with each form.

    python benchmarks/article_an.py clipheads-demo/world
"""

from __future__ import annotations

import argparse
import re

import torch

import clipheads
from clipheads.demo.data import load_retrieval_set
from clipheads.metrics.retrieval import retrieval_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("world", help="a world folder (with retrieval.json)")
    args = parser.parse_args()
    clipheads.set_threads(1)
    model = clipheads.load("bundled")
    tokenizer = model.tokenizer
    print(f"token ids: 'a orange circle' {tokenizer('a orange circle')['input_ids']}, "
          f"'an orange circle' {tokenizer('an orange circle')['input_ids']} (<unk> = {tokenizer.unk_token_id})")
    for split in ("val_ood", "test_ood", "test_iid", "test_anti"):
        data = load_retrieval_set(model, f"{args.world}/retrieval.json", split, captions_per_image=2)
        fixed = [re.sub(r"\ba (?=[aeiou])", "an ", caption) for caption in data.captions]
        with torch.inference_mode():
            images = model.encode_image(data.pixels, normalize=True).float()
            texts = torch.cat([model.encode_text(fixed[i:i + 512], normalize=True).float()
                               for i in range(0, len(fixed), 512)])
        before = retrieval_metrics(images, data.text_features, data.text_to_image).mean_recall
        after = retrieval_metrics(images, texts, data.text_to_image).mean_recall
        changed = sum(a != b for a, b in zip(data.captions, fixed, strict=True))
        print(f"{split}: {changed} of {len(fixed)} captions change; mean-R 'a' {100 * before:.2f}, "
              f"'an' {100 * after:.2f}")


if __name__ == "__main__":
    main()
