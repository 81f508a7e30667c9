"""A ClipCap-style captioner: a small causal language model conditioned on the CLIP image embedding.

An MLP maps the image embedding ``[B, D]`` to ``prefix_length`` input embeddings of the decoder ``[B, P, E]``; the
decoder (any ``transformers`` causal LM, by default a small ``GPT2LMHeadModel`` built from a config) reads them,
then a start token and an optional text prefix ("a photo of a"), and continues the text. The image embedding comes
from ``backend.encode_image``, so an active ``clipheads.ablate`` intervention changes the captions.

On disk (``save``/``load``)::

    captioner.json             # CaptionerConfig (format, embed_dim, prefix_length, ...)
    prefix_mlp.safetensors     # the prefix MLP
    decoder/                   # decoder + tokenizer, save_pretrained / from_pretrained
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from clipheads.captions.decoding import (
    groups_by_length,
    join_caption,
    normalize_prefixes,
    prefix_token_ids,
    start_token_id,
    until_eos,
)
from clipheads.errors import ClipHeadsError, ModelLoadError
from clipheads.files import write_json_atomic

logger = logging.getLogger(__name__)

FORMAT = "clipheads-prefix-captioner"
CONFIG_FILE = "captioner.json"
MLP_FILE = "prefix_mlp.safetensors"
DECODER_DIR = "decoder"


@dataclass
class CaptionerConfig:
    """How the image embedding enters the decoder.

    Attributes:
        embed_dim: size ``D`` of the CLIP image embedding the captioner reads.
        prefix_length: number ``P`` of decoder input embeddings made from the image embedding.
        hidden_dim: hidden size of the prefix MLP (ClipCap: halfway between ``D`` and ``P * E``).
        normalize_embedding: read the unit-normalised embedding (its direction), as CLIP scores it.
        clip_model: name of the CLIP model whose embeddings it was trained on (default model for generation).
    """

    embed_dim: int
    prefix_length: int = 10
    hidden_dim: int | None = None
    normalize_embedding: bool = True
    clip_model: str = ""
    format: str = FORMAT
    version: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CaptionerConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class PrefixCaptioner(nn.Module):
    """Prefix MLP + causal LM decoder + the decoder's tokenizer.

    Args:
        config: the prefix settings.
        decoder: a ``transformers`` causal LM (``GPT2LMHeadModel``, ...).
        tokenizer: its tokenizer; it needs an eos token (and a bos token, or GPT-2's eos used as one).
    """

    def __init__(self, config: CaptionerConfig, decoder: nn.Module, tokenizer) -> None:
        super().__init__()
        self.config = config
        self.decoder = decoder
        self.tokenizer = tokenizer
        width = decoder.get_input_embeddings().embedding_dim
        hidden = config.hidden_dim or (config.embed_dim + config.prefix_length * width) // 2
        self.prefix_mlp = nn.Sequential(nn.Linear(config.embed_dim, hidden), nn.Tanh(),
                                        nn.Linear(hidden, config.prefix_length * width))
        self.width = width
        if tokenizer.eos_token_id is None:
            raise ClipHeadsError(f"the captioner's tokenizer ({type(tokenizer).__name__}) has no eos token")
        self.start_id = start_token_id(tokenizer)
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id)

    @property
    def max_positions(self) -> int:
        """Longest sequence the decoder takes: image prefix + start token + text."""
        return int(getattr(self.decoder.config, "max_position_embeddings", None) or 1024)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------ inputs
    def image_prefix(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` CLIP image embeddings -> ``[B, P, E]`` decoder input embeddings."""
        if image_embeddings.shape[-1] != self.config.embed_dim:
            raise ClipHeadsError(f"the captioner reads {self.config.embed_dim}-d image embeddings "
                                 f"({self.config.clip_model or 'its CLIP model'}), got {image_embeddings.shape[-1]}-d; "
                                 "use the CLIP model it was trained with")
        x = image_embeddings.to(self.device, torch.float32)
        if self.config.normalize_embedding:
            x = nn.functional.normalize(x, dim=-1)
        return self.prefix_mlp(x).view(x.shape[0], self.config.prefix_length, self.width)

    def caption_tokens(self, captions: Sequence[str], max_tokens: int | None = None) -> torch.Tensor:
        """Captions -> ``[B, T]`` ids ``start, caption..., eos`` right-padded with ``pad_id`` (``-1`` marks pads)."""
        limit = self.max_positions - self.config.prefix_length - 2
        limit = min(limit, max_tokens) if max_tokens else limit
        encoded = self.tokenizer(list(captions), add_special_tokens=False)["input_ids"]
        rows = [[self.start_id, *ids[:limit], self.eos_id] for ids in encoded]
        length = max(len(r) for r in rows)
        return torch.tensor([r + [-1] * (length - len(r)) for r in rows], dtype=torch.long)

    def forward(self, image_embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced loss of the captions given the images.

        Args:
            image_embeddings: ``[B, D]`` CLIP image embeddings.
            tokens: ``[B, T]`` from :meth:`caption_tokens` (``-1`` = padding).

        Returns:
            The mean next-token cross-entropy over caption tokens and eos (the start token is given, not predicted).
        """
        tokens = tokens.to(self.device)
        padding = tokens < 0
        ids = tokens.masked_fill(padding, self.pad_id)
        embeds = torch.cat([self.image_prefix(image_embeddings), self.decoder.get_input_embeddings()(ids)], dim=1)
        n_prefix = self.config.prefix_length
        labels = torch.full(embeds.shape[:2], -100, dtype=torch.long, device=self.device)
        labels[:, n_prefix + 1:] = ids[:, 1:].masked_fill(padding[:, 1:], -100)
        mask = torch.cat([torch.ones(ids.shape[0], n_prefix, dtype=torch.long, device=self.device),
                          (~padding).long()], dim=1)
        return self.decoder(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss

    # ------------------------------------------------------------ decoding
    @torch.no_grad()
    def generate_from_embeddings(self, image_embeddings: torch.Tensor, prefixes: str | Sequence[str] | None = None,
                                 num_beams: int = 1, max_new_tokens: int = 20) -> list[str]:
        """Captions of ``[B, D]`` image embeddings, each continuing its text prefix (greedy or beam search)."""
        texts = normalize_prefixes(prefixes, image_embeddings.shape[0])
        prefix_ids = prefix_token_ids(self.tokenizer, texts)
        unknown = self.tokenizer.unk_token_id
        if unknown is not None and any(unknown in ids for ids in prefix_ids):
            logger.warning("a text prefix has words outside the captioner's vocabulary; it reads them as %s",
                           self.tokenizer.unk_token)
        longest = self.config.prefix_length + 1 + max((len(p) for p in prefix_ids), default=0) + max_new_tokens
        if longest > self.max_positions:
            raise ClipHeadsError(f"image prefix + text prefix + max_new_tokens = {longest} tokens exceeds the "
                                 f"decoder's {self.max_positions} positions; shorten the prefix or max_new_tokens")
        self.eval()
        image_prefix = self.image_prefix(image_embeddings)
        table = self.decoder.get_input_embeddings()
        captions = [""] * len(texts)
        for group in groups_by_length(prefix_ids):
            ids = torch.tensor([[self.start_id, *prefix_ids[i]] for i in group], device=self.device)
            embeds = torch.cat([image_prefix[group], table(ids)], dim=1)
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
            generated = self.decoder.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False,
                                              num_beams=num_beams, max_new_tokens=max_new_tokens,
                                              eos_token_id=self.eos_id, pad_token_id=self.pad_id)
            # decoder-only generate with inputs_embeds returns only the new tokens
            for row, i in zip(generated, group, strict=True):
                captions[i] = join_caption(self.tokenizer, texts[i], prefix_ids[i], until_eos(row, self.eos_id))
        return captions

    def generate(self, backend, pixels: torch.Tensor, prefixes: str | Sequence[str] | None = None,
                 num_beams: int = 1, max_new_tokens: int = 20) -> list[str]:
        """Captions of ``[B, 3, H, W]`` images encoded by ``backend`` (with any active ablation)."""
        with torch.no_grad():
            embeddings = backend.encode_image(pixels)
        return self.generate_from_embeddings(embeddings, prefixes, num_beams=num_beams, max_new_tokens=max_new_tokens)

    # ------------------------------------------------------------ files
    def save(self, folder: str | Path) -> Path:
        """Write the captioner to ``folder`` (config JSON, prefix MLP safetensors, decoder + tokenizer)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.decoder.save_pretrained(folder / DECODER_DIR)
        self.tokenizer.save_pretrained(folder / DECODER_DIR)
        state = {k: v.detach().cpu().contiguous() for k, v in self.prefix_mlp.state_dict().items()}
        save_file(state, str(folder / MLP_FILE), metadata={"format": FORMAT})
        write_json_atomic(folder / CONFIG_FILE, self.config.to_dict())
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device | None = None) -> PrefixCaptioner:
        """Read a captioner written by :meth:`save`."""
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(folder)
        config_path = folder / CONFIG_FILE
        if not config_path.is_file():
            raise ModelLoadError(f"{str(folder)!r} is not a clipheads captioner folder (no {CONFIG_FILE})")
        try:
            data = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"cannot read {str(config_path)!r}: {exc}") from None
        if data.get("format") != FORMAT:
            raise ModelLoadError(f"{str(config_path)!r} is not a {FORMAT} config (format={data.get('format')!r})")
        try:
            decoder = AutoModelForCausalLM.from_pretrained(folder / DECODER_DIR)
            tokenizer = AutoTokenizer.from_pretrained(folder / DECODER_DIR)
            state = load_file(str(folder / MLP_FILE))
        except Exception as exc:  # noqa: BLE001 - every failure becomes one clear line
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"cannot load the captioner in {str(folder)!r}: {reason}") from None
        captioner = cls(CaptionerConfig.from_dict(data), decoder, tokenizer)
        captioner.prefix_mlp.load_state_dict(state)
        return captioner.to(device or "cpu").eval()


def caption_vocabulary(captions: Sequence[str]) -> list[str]:
    """The words of ``captions`` as clipheads' word-level tokenizer splits them, most frequent first."""
    from clipheads.models.random_init import word_tokenizer

    backend_tokenizer = word_tokenizer([]).backend_tokenizer
    counts: Counter[str] = Counter()
    for caption in captions:
        text = backend_tokenizer.normalizer.normalize_str(caption)
        counts.update(word for word, _ in backend_tokenizer.pre_tokenizer.pre_tokenize_str(text))
    return sorted(counts, key=lambda w: (-counts[w], w))


def build_captioner(captions: Sequence[str], embed_dim: int, *, prefix_length: int = 10, width: int = 256,
                    n_layers: int = 4, n_heads: int = 4, max_positions: int = 64, dropout: float = 0.1,
                    tokenizer=None, clip_model: str = "", seed: int = 0) -> PrefixCaptioner:
    """A new, randomly initialised captioner: a small ``GPT2LMHeadModel`` built from a ``GPT2Config``.

    Args:
        captions: training captions; their words make the word-level vocabulary unless ``tokenizer`` is given.
        embed_dim: size ``D`` of the CLIP image embeddings (``backend.encode_image(...).shape[-1]``).
        prefix_length: number of decoder input embeddings made from the image embedding.
        width, n_layers, n_heads, max_positions, dropout: the decoder's size (``n_embd``, ``n_layer``, ``n_head``,
            ``n_positions``) and dropout.
        tokenizer: a Hugging Face tokenizer to use instead of the word-level one.
        clip_model: name of the CLIP model the embeddings come from (recorded in the config).
        seed: initialisation seed.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    from clipheads.models.random_init import word_tokenizer

    if not captions and tokenizer is None:
        raise ClipHeadsError("cannot build a captioner vocabulary from no captions")
    if tokenizer is None:
        tokenizer = word_tokenizer(caption_vocabulary(captions), model_max_length=max_positions)
    start, eos = start_token_id(tokenizer), tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=max_positions, n_embd=width, n_layer=n_layers,
                        n_head=n_heads, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        bos_token_id=start, eos_token_id=eos, pad_token_id=pad)
    torch.manual_seed(seed)
    decoder = GPT2LMHeadModel(config)
    return PrefixCaptioner(CaptionerConfig(embed_dim=embed_dim, prefix_length=prefix_length, clip_model=clip_model),
                           decoder, tokenizer)
