"""Randomly initialised CLIP models of real architectures, built offline (tests, benchmarks, smoke runs).

They go through exactly the same library classes as pretrained weights: ``CLIPModel``/``ChineseCLIPModel`` from
a config, ``open_clip.create_model`` with ``pretrained=None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from clipheads.models.hf import HFBackend, SiglipBackend
from clipheads.models.openclip import TINY_OPEN_CLIP, OpenCLIPBackend, register_open_clip_configs

# vision settings of real models (hidden, layers, heads, mlp, patch, image)
VISION_PRESETS = {
    "tiny": (64, 2, 4, 128, 8, 32),
    "small": (128, 6, 8, 512, 8, 64),
    "ViT-B/32": (768, 12, 12, 3072, 32, 224),
    "ViT-B/16": (768, 12, 12, 3072, 16, 224),
    "ViT-L/14": (1024, 24, 16, 4096, 14, 224),
    "SO400M/14-384": (1152, 27, 16, 4304, 14, 384),  # SigLIP so400m-patch14-384's vision tower
}

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


def word_tokenizer(words: Sequence[str], model_max_length: int = 32):
    """A word-level ``PreTrainedTokenizerFast`` (lower-cased, punctuation split) over ``words``.

    It saves and loads with ``save_pretrained``/``AutoTokenizer.from_pretrained`` like any HF tokenizer.
    Ids: ``<pad>`` 0, ``<unk>`` 1, ``<bos>`` 2, ``<eos>`` 3, then the words in the given order.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word.lower(), len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=model_max_length)


DEFAULT_WORDS = ("a", "an", "the", "photo", "of", "picture", "small", "large", "red", "green", "blue", "yellow",
                 "black", "white", "cat", "dog", "car", "tree", "house", "circle", "square", "and", "on", "in",
                 "left", "right", "top", "bottom", "with", "one", "two", "three")


def random_hf_clip(preset: str = "tiny", chinese: bool = False, seed: int = 0, text_layers: int = 2,
                   projection_dim: int | None = None, words: Sequence[str] = DEFAULT_WORDS) -> HFBackend:
    """A random ``CLIPModel`` (or ``ChineseCLIPModel``) with a word-level tokenizer, wrapped in its backend."""
    from transformers import ChineseCLIPConfig, ChineseCLIPModel, CLIPConfig, CLIPModel

    hidden, layers, heads, mlp, patch, image = VISION_PRESETS[preset]
    tokenizer = word_tokenizer(words)
    vision = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp,
                  patch_size=patch, image_size=image)
    text_width = min(hidden, 128) if preset not in ("ViT-B/32", "ViT-B/16", "ViT-L/14") else 512
    text = dict(hidden_size=text_width, num_hidden_layers=text_layers, num_attention_heads=4,
                intermediate_size=2 * text_width, vocab_size=len(tokenizer), max_position_embeddings=32,
                pad_token_id=0, bos_token_id=2, eos_token_id=3)
    proj = projection_dim or min(hidden, 512)
    torch.manual_seed(seed)
    if chinese:
        text.update(type_vocab_size=2)
        text.pop("bos_token_id")
        text.pop("eos_token_id")
        model = ChineseCLIPModel(ChineseCLIPConfig(text_config=text, vision_config=vision, projection_dim=proj))
    else:
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj))
    return HFBackend(model.eval(), f"random-hf-{'chinese-' if chinese else ''}{preset}", tokenizer=tokenizer)


def random_siglip(preset: str = "tiny", seed: int = 0, text_layers: int = 2,
                  words: Sequence[str] = DEFAULT_WORDS) -> SiglipBackend:
    """A random ``SiglipModel`` (attention-pooling head) with a word-level tokenizer, wrapped in its backend."""
    from transformers import SiglipConfig, SiglipModel

    hidden, layers, heads, mlp, patch, image = VISION_PRESETS[preset]
    tokenizer = word_tokenizer(words, model_max_length=16)
    vision = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp,
                  patch_size=patch, image_size=image)
    text = dict(hidden_size=hidden, num_hidden_layers=text_layers, num_attention_heads=heads,
                intermediate_size=mlp, vocab_size=len(tokenizer), max_position_embeddings=16, projection_size=hidden,
                pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(seed)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    return SiglipBackend(model.eval(), f"random-siglip-{preset}", tokenizer=tokenizer)


def _tiny_configs(preset: str, text_layers: int, vocab_size: int, max_length: int = 32) -> tuple[dict, dict]:
    """(vision, text) config keywords of a preset, shared by the CLIP-like families."""
    hidden, layers, heads, mlp, patch, image = VISION_PRESETS[preset]
    vision = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp,
                  patch_size=patch, image_size=image)
    text = dict(hidden_size=hidden, num_hidden_layers=text_layers, num_attention_heads=heads, intermediate_size=mlp,
                vocab_size=vocab_size, max_position_embeddings=max_length, pad_token_id=0, bos_token_id=2,
                eos_token_id=3)
    return vision, text


def random_hf_family(family: str, preset: str = "tiny", seed: int = 0, text_layers: int = 2,
                     words: Sequence[str] = DEFAULT_WORDS) -> HFBackend:
    """A random transformers dual encoder of ``family`` (``altclip``: ``AltCLIPModel`` with its XLM-R text tower;
    ``metaclip2``: ``MetaClip2Model``; ``siglip2``: ``Siglip2Model`` with NaFlex inputs, ``num_patches`` the preset's
    grid; ``towers``: ``CLIPVisionModelWithProjection`` + ``CLIPTextModelWithProjection`` used apart), built from a
    small config of the real class, with a word-level tokenizer, wrapped in its backend."""
    import transformers as tf

    from clipheads.models.hf import CLIPTowers, HFTowersBackend, Siglip2Backend

    tokenizer = word_tokenizer(words, model_max_length=16 if family == "siglip2" else 32)
    vision, text = _tiny_configs(preset, text_layers, len(tokenizer), tokenizer.model_max_length)
    torch.manual_seed(seed)
    name = f"random-{family}-{preset}"
    if family == "altclip":
        config = tf.AltCLIPConfig(text_config=dict(text, project_dim=vision["hidden_size"]), vision_config=vision,
                                  projection_dim=vision["hidden_size"])
        return HFBackend(tf.AltCLIPModel(config).eval(), name, tokenizer=tokenizer)
    if family == "metaclip2":
        config = tf.MetaClip2Config(text_config=text, vision_config=vision, projection_dim=vision["hidden_size"])
        return HFBackend(tf.MetaClip2Model(config).eval(), name, tokenizer=tokenizer)
    if family == "siglip2":
        side = vision.pop("image_size") // vision["patch_size"]
        config = tf.Siglip2Config(text_config=dict(text, projection_size=text["hidden_size"]),
                                  vision_config=dict(vision, num_patches=side * side))
        return Siglip2Backend(tf.Siglip2Model(config).eval(), name, tokenizer=tokenizer)
    if family == "towers":
        vision_tower = tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(**vision, projection_dim=64))
        text_tower = tf.CLIPTextModelWithProjection(tf.CLIPTextConfig(**text, projection_dim=64))
        return HFTowersBackend(CLIPTowers(vision_tower, text_tower).eval(), name, tokenizer=tokenizer)
    raise ValueError(f"unknown family {family!r}; choose one of {', '.join(HF_FAMILIES)}")


HF_FAMILIES = ("altclip", "metaclip2", "siglip2", "towers")


def random_open_clip(arch: str = "ViT-B-32", seed: int = 0) -> OpenCLIPBackend:
    """A random open_clip model of a built-in architecture, built by ``open_clip.create_model(pretrained=None)``."""
    import open_clip

    register_open_clip_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None)
    return OpenCLIPBackend(model.eval(), f"open_clip:{arch}",
                           tokenizer=open_clip.get_tokenizer(arch), model_cfg=open_clip.get_model_config(arch))


def tiny_open_clip(seed: int = 0) -> OpenCLIPBackend:
    """A 2-layer, 4-head open_clip ViT (32 px) for fast tests (config shipped in clipheads/assets)."""
    return random_open_clip(TINY_OPEN_CLIP, seed=seed)


TINY_KINDS = ("hf", "chinese", "open_clip")


def tiny_model(kind: str = "hf", seed: int = 0):
    """A 2-layer, 4-head, 32 px random model of one backend family: ``hf``, ``chinese``, ``open_clip``, ``siglip`` or
    one of ``HF_FAMILIES`` (``altclip``, ``metaclip2``, ``siglip2``, ``towers``; these are not in ``TINY_KINDS``, the
    families every shared test runs on)."""
    if kind == "open_clip":
        return tiny_open_clip(seed=seed)
    if kind == "siglip":
        return random_siglip("tiny", seed=seed)
    if kind in HF_FAMILIES:
        return random_hf_family(kind, "tiny", seed=seed)
    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {', '.join(TINY_KINDS)}, siglip or "
                         f"{', '.join(HF_FAMILIES)}")
    return random_hf_clip("tiny", chinese=kind == "chinese", seed=seed)


def save_hf(backend: HFBackend, folder: str | Path) -> Path:
    """Save an HF backend (model, tokenizer, image processor) so that ``clipheads.load(folder)`` reads it back."""
    from transformers import CLIPImageProcessor

    folder = Path(folder)
    backend.model.save_pretrained(folder)
    if backend.tokenizer is not None:
        backend.tokenizer.save_pretrained(folder)
    size = backend.image_size
    processor = backend.image_processor or CLIPImageProcessor(size={"shortest_edge": size},
                                                              crop_size={"height": size, "width": size})
    processor.save_pretrained(folder)
    return folder
