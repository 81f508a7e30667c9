"""Direct contributions of every attention head to the image embedding (the decomposition behind TextSpan).

The image embedding reads the class token of the last layer's residual stream, which is a sum of terms:

    x_L = embedding + sum_l (sum_h head_{l,h} + out_proj_bias_l) + sum_l mlp_l

where ``head_{l,h} = z_{l,h}[cls] @ W_O[:, block h].T`` is head ``h``'s output written through its column block of
layer ``l``'s ``out_proj`` (times the block's layer scale, open_clip), and ``mlp_l`` is what layer ``l``'s MLP
adds. The final layer norm is linearised with each image's own statistics, as in Gandelsman et al. (TextSpan):

    LN(x) = gamma * (x - mean(x)) / std(x) + beta  ->  term_i' = gamma * (term_i - mean(term_i)) / std(x)

Centering is linear, so each term is centered by its own mean over the width (its share of ``mean(x)``); every
term is divided by the same per-image ``std(x)`` (``sqrt(var + eps)``). The layer norm's bias ``beta`` is the same
for every image and belongs to no head: it is kept as a term of its own (``ln_bias``), so that head terms are pure
head outputs. Each term is then multiplied by the image projection. The terms sum to ``model.encode_image``.

Two conventions place the layer norm's mean and bias (``convention=``):

* ``textspan`` (default): the published one (Gandelsman et al., clip_text_span ``prs_hook.py``). The final
  residual's mean ``mean(x)`` and the bias ``beta`` are split equally over the ``K = 2L + 1`` residual components
  (embedding, L attention layers, L MLPs); a layer's ``out_proj`` bias and its shares are split equally over its
  ``H`` heads, so that a head's term is ``(gamma * (head + b_O / H - mean(x) / (K H)) / std(x) + beta / (K H)) @ P``;
  every term is divided by the norm of the image embedding. The terms sum to the *normalised* embedding,
  ``ln_bias`` is zero and :meth:`Decomposition.attention_bias` is zero.
* ``centred``: each term is centred on its own mean over the width, biases are kept out (``ln_bias`` and
  :meth:`Decomposition.attention_bias`) and nothing is normalised: head terms are pure head outputs, and the terms
  sum to the unnormalised ``model.encode_image``.

Towers that pool with an attention-pooling head instead of a class token (SigLIP: ``post_layernorm``, then a learned
probe attending over every token, then ``pooled + MLP(LN(pooled))``) are read as TextSpan's own SigLIP code reads them
(clip_text_span ``compute_siglip.py``: the pooling attention's output split over tokens and pooling heads, the pooling
MLP's output a term of its own). The probe's attention pattern and ``post_layernorm``'s per-token statistics are
frozen at each image's own values, so every residual term ``c`` (``[T, W]``, at every token) enters the pooled
vector linearly: ``sum_h' W_O[h'] W_V[h'] sum_t A[h', t] gamma * (c_t - mean(c_t)) / std_t`` (``centred``), or with
the token's mean and ``beta`` and the pool's ``W_O b_V + b_O`` shared out equally (``textspan``, the same shares as
above). The pooling MLP's output depends on the whole pooled vector and belongs to no encoder head: it is the term
``Decomposition.readout``; under ``centred``, ``ln_bias`` holds the pool's constant ``W_O (W_V beta + b_V) + b_O``.
The terms sum to the image embedding (normalised under ``textspan``), tested against a hand-built reference.

The same two readings cover every backend: transformers SigLIP and SigLIP 2 (fixed grid) through
``AttentionPool.from_siglip``, open_clip's timm SigLIP trunks through ``AttentionPool.from_timm`` (the backend's
``attention_pool()``), and timm class-token trunks (EVA01: ``trunk.norm`` at token 0, then the linear head; rotary
embeddings act inside the attention, so the heads stay additive). Refused in one line: EVA02's sub-LN over the
concatenated heads and EVA02-E's post-norm blocks (a norm between the heads and the residual).

open_clip ``VisionTransformer`` towers without a class-token read-out:

* CLIPA (``pool_type='avg'``, ``final_ln_after_pool``): the embedding is ``ln_post(mean_{t>=1} x_t) @ proj``. The
  mean is linear, so every term is its mean over the patch tokens, then read exactly as a class token (``ln_post``
  frozen at the pooled vector's statistics). An average pool *before* ``ln_post`` (no open_clip config) is refused.
* CoCa (``AttentionalPooler``): the contrastive embedding is ``ln_post(attn_pool(x))[:, 0] @ proj``; each of the
  pooler's queries attends on its own, so query 0 (``ln_q(query)[0]``) is a fixed probe over ``ln_k(tokens)``, read
  through ``AttentionPool.from_open_clip`` as above (``ln_k`` in the role of ``post_layernorm``), and then ``ln_post``
  is linearised at the pooled vector's statistics as for a class token, and ``proj`` applied. ``textspan`` shares
  ``ln_post``'s mean and bias out like the others (``readout`` and ``ln_bias`` are zero); under ``centred``,
  ``ln_bias`` is ``ln_post``'s bias through ``proj`` and ``readout`` the pooler's biases through the frozen
  ``ln_post`` (per image: ``std`` is the image's). open_clip's two-pooler layouts (``parallel``/``cascade``) are
  refused in one line.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from clipheads.errors import ClipHeadsError
from clipheads.heads import parse_layers
from clipheads.models import CLIPBackend, as_backend


@dataclass
class Decomposition:
    """Additive terms of the image embeddings of ``N`` images, all in the joint embedding space (``D``).

    Attributes:
        heads: ``[N, S, H, D]`` direct contribution of every head of the ``S`` layers in ``layers``.
        layers: the layers whose heads are in ``heads`` (0-based, sorted).
        attention: ``[N, L, D]`` each layer's whole attention term (all its heads + its ``out_proj`` bias).
        mlp: ``[N, L, D]`` each layer's MLP term.
        embedding: ``[N, D]`` the class token entering layer 0 (patch/class/position embeddings, pre-norm).
        ln_bias: ``[D]`` the final layer norm's bias (and projection bias, if any), the same for every image
            (``centred``; zero under ``textspan``, where the biases are shared out over the other terms).
        convention: ``textspan`` (published: biases and mean shared out, normalised) or ``centred``.
        readout: ``[N, D]`` what an attention-pooling head's MLP adds to the pooled vector (SigLIP; see
            :func:`decompose`), or CoCa's pooler biases through its frozen ``ln_post`` (``centred``; zero under
            ``textspan``), a term of its own that belongs to no encoder head; ``None`` for class-token and CLIPA
            towers.
    """

    heads: torch.Tensor
    layers: list[int]
    attention: torch.Tensor
    mlp: torch.Tensor
    embedding: torch.Tensor
    ln_bias: torch.Tensor
    convention: str = "textspan"
    readout: torch.Tensor | None = None

    @property
    def n_images(self) -> int:
        return int(self.embedding.shape[0])

    def attention_bias(self) -> torch.Tensor:
        """``[N, S, D]``: the ``out_proj`` bias term of each layer in ``layers`` (attention minus its heads)."""
        return self.attention[:, self.layers] - self.heads.sum(dim=2)

    def total(self) -> torch.Tensor:
        """``[N, D]``: the sum of all terms: the model's image embedding (``centred``), divided by its norm
        (``textspan``)."""
        total = self.embedding + self.attention.sum(dim=1) + self.mlp.sum(dim=1) + self.ln_bias
        return total if self.readout is None else total + self.readout

    @classmethod
    def concat(cls, parts: Sequence[Decomposition]) -> Decomposition:
        """Join the decompositions of consecutive image batches."""
        if not parts:
            raise ClipHeadsError("no image batches to decompose")
        return cls(torch.cat([p.heads for p in parts]), parts[0].layers, torch.cat([p.attention for p in parts]),
                   torch.cat([p.mlp for p in parts]), torch.cat([p.embedding for p in parts]), parts[0].ln_bias,
                   parts[0].convention,
                   None if parts[0].readout is None else torch.cat([p.readout for p in parts]))


def _final_stage(backend: CLIPBackend) -> tuple[nn.LayerNorm, torch.Tensor | None, torch.Tensor | None]:
    """The final layer norm and the image projection (``[width, D]`` matrix, optional bias) of the class token (or of
    the patch tokens' mean: CLIPA, see :func:`_average_pooled`)."""
    model = backend.model
    if hasattr(model, "vision_model") and not hasattr(model, "visual_projection"):
        raise ClipHeadsError(f"{backend.name}: the image tower pools with an attention-pooling head (SigLIP), not a "
                             "class token; the head decomposition supports class-token pooling only (for now)")
    if hasattr(model, "vision_model"):  # transformers: post_layernorm(x[:, 0]) -> visual_projection
        projection = model.visual_projection
        return model.vision_model.post_layernorm, projection.weight.T, projection.bias
    visual = model.visual  # open_clip: _pool (ln_post + class token) -> @ proj
    if getattr(visual, "trunk", None) is not None:  # TimmModel (EVA): trunk.norm -> class token -> head(s)
        return _timm_final_stage(backend, visual)
    if visual.attn_pool is None and visual.pool_type == "avg" and visual.final_ln_after_pool:
        return visual.ln_post, visual.proj, None  # CLIPA: ln_post(mean of the patch tokens) @ proj
    if visual.attn_pool is not None or visual.pool_type != "tok":
        raise ClipHeadsError(f"{backend.name}: the image tower pools with {visual.pool_type!r}"
                             f"{' and an attentional pooler' if visual.attn_pool is not None else ''}"
                             f"{'' if visual.final_ln_after_pool else ' after ln_post'}; the head decomposition "
                             "reads a class token, an average pool followed by ln_post (CLIPA) or an attention pool")
    return visual.ln_post, visual.proj, None


def _average_pooled(backend: CLIPBackend) -> bool:
    """Whether the embedding reads the mean of the patch tokens (open_clip ``pool_type='avg'``: CLIPA), not token 0."""
    visual = getattr(backend.model, "visual", None)
    return getattr(visual, "attn_pool", 0) is None and getattr(visual, "pool_type", None) == "avg"


def _timm_final_stage(backend: CLIPBackend, visual: nn.Module
                      ) -> tuple[nn.LayerNorm, torch.Tensor | None, torch.Tensor | None]:
    """The final norm and projection of an open_clip ``TimmModel`` that reads its class token (EVA): ``trunk.norm``
    at token 0, then the trunk's classifier head and the tower's head, each the identity, a dropout or a linear
    (composed into one ``[width, D]`` matrix and bias). Anything else is refused in one line."""
    trunk = visual.trunk
    pooling = "an attention pool" if getattr(trunk, "attn_pool", None) is not None else f"{trunk.global_pool!r}"
    if getattr(trunk, "attn_pool", None) is not None or trunk.global_pool != "token" or trunk.cls_token is None:
        raise ClipHeadsError(f"{backend.name}: the timm trunk pools with {pooling}, not its class token; the head "
                             "decomposition reads a class token or an attention pool (SigLIP)")
    if not isinstance(trunk.norm, nn.LayerNorm) or not isinstance(trunk.fc_norm, nn.Identity):
        raise ClipHeadsError(f"{backend.name}: the timm trunk's final norm is {type(trunk.norm).__name__} (fc_norm "
                             f"{type(trunk.fc_norm).__name__}); the decomposition linearises one LayerNorm")
    matrix, bias = None, None
    for module in (trunk.head, *visual.head.children()):
        if isinstance(module, (nn.Identity, nn.Dropout)):
            continue
        if type(module) is not nn.Linear:
            raise ClipHeadsError(f"{backend.name}: the tower's head holds a {type(module).__name__}, not a linear "
                                 "projection; the head decomposition needs a linear read-out")
        weight = module.weight.float().T  # [in, out]
        bias = (bias @ weight if bias is not None else None)
        if module.bias is not None:
            bias = module.bias.float() if bias is None else bias + module.bias.float()
        matrix = weight if matrix is None else matrix @ weight
    return trunk.norm, matrix, bias


def _layer_scale(backend: CLIPBackend, layer: int) -> nn.Module:
    """What multiplies the attention output before it joins the residual (open_clip's LayerScale ``ls_1``, timm's
    ``ls1``, EVA's ``gamma_1``; else identity). Refuses (one line) a block that normalises the attention output
    before the residual (timm's ``EvaBlockPostNorm``, EVA02-E): a head's share is then not additive."""
    visual = getattr(backend.model, "visual", None)
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:  # open_clip TimmModel
        from clipheads.models.openclip_timm import _head_mixing

        block = trunk.blocks[layer]
        mixing = _head_mixing(block.attn)
        if mixing is not None:
            raise ClipHeadsError(f"{backend.name}: layer {layer} applies {mixing} before its output projection, so "
                                 "the heads' outputs are not additive; the head decomposition is refused for it")
        if type(block).__name__ == "EvaBlockPostNorm":
            raise ClipHeadsError(f"{backend.name}: layer {layer} normalises its attention output before the "
                                 "residual (post-norm EvaBlockPostNorm), so the heads' outputs are not additive; the "
                                 "head decomposition is refused for it")
        if hasattr(block, "ls1"):
            return block.ls1
        gamma = getattr(block, "gamma_1", None)
        return nn.Identity() if gamma is None else _Multiply(gamma)
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    return blocks[layer].ls_1 if blocks is not None else nn.Identity()


class _Multiply(nn.Module):
    """``x * gamma`` (EVA's layer scale, a bare parameter)."""

    def __init__(self, gamma: torch.Tensor) -> None:
        super().__init__()
        self.gamma = gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.float()


@torch.inference_mode()
def _residual_terms(backend: CLIPBackend, pixels: torch.Tensor, average: bool = False):
    """Class-token terms of the last residual stream (with ``average``, terms of the mean of its patch tokens 1..T-1,
    which is linear: CLIPA's pool): embedding ``[B, W]``, heads ``[B, L, H, W]``, attention bias ``[B, L, W]``, MLP
    ``[B, L, W]``, and the final residual ``[B, W]`` (pooled) they sum to."""
    n_layers, n_heads, head_dim = backend.n_layers, backend.n_heads, backend.head_dim
    recorded: dict[int, torch.Tensor] = {}

    def read(tokens: torch.Tensor) -> torch.Tensor:
        """``[B, T, ...]`` -> ``[B, ...]``: what the pool reads (token 0, or the patch tokens' mean)."""
        return tokens[:, 1:].float().mean(dim=1) if average else tokens[:, 0]

    def recorder(layer: int):
        def hook(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            recorded[layer] = read(z)  # [B, H, d]
            return z

        return hook

    x = backend.embed(pixels.to(backend.device, backend.dtype))
    embedding = read(x).float()
    heads, biases, mlps = [], [], []
    try:
        for layer in range(n_layers):
            backend.set_head_hook(layer, recorder(layer))
        for layer in range(n_layers):
            x_next = backend.run_layers(x, layer, layer + 1)
            proj = backend.out_proj(layer)
            scale = _layer_scale(backend, layer)
            weight = proj.weight.float().view(-1, n_heads, head_dim)  # [W, H, d]
            head_out = scale(torch.einsum("bhd,whd->bhw", recorded.pop(layer).float(), weight))
            bias = torch.zeros_like(head_out[:, 0]) if proj.bias is None else scale(proj.bias.float()).expand_as(
                head_out[:, 0])
            mlps.append(read(x_next).float() - read(x).float() - head_out.sum(dim=1) - bias)
            heads.append(head_out)
            biases.append(bias)
            x = x_next
    finally:
        backend.clear_head_hooks()
    return embedding, torch.stack(heads, 1), torch.stack(biases, 1), torch.stack(mlps, 1), read(x).float()


CONVENTIONS = ("textspan", "centred")


def check_convention(convention: str) -> str:
    """``convention`` if it is one of :data:`CONVENTIONS`; else a :class:`ClipHeadsError` in one line."""
    if convention not in CONVENTIONS:
        raise ClipHeadsError(f"unknown decomposition convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")
    return convention


def decompose(model: CLIPBackend | nn.Module, pixels: torch.Tensor, layers: str | Iterable[int] | None = None,
              convention: str = "textspan") -> Decomposition:
    """Decompose the image embeddings of one batch into head, MLP and embedding terms.

    Args:
        model: a backend (or library model) with no ablation applied.
        pixels: ``[N, 3, H, W]`` preprocessed images.
        layers: layers whose heads are kept separately (``"8-11"``, ``[10, 11]``; default: all).
        convention: ``textspan`` (default, as published: the layer norm's mean and bias and each ``out_proj`` bias
            shared out equally, every term divided by the embedding's norm) or ``centred`` (see the module doc).

    Returns:
        A :class:`Decomposition` whose ``total()`` equals ``model.encode_image(pixels)`` (``[N, D]``; divided by
        its norm under ``textspan``).

    Raises:
        ClipHeadsError: an unknown convention, an ablated model, a tower that pools neither its class token, nor
            the mean of its patch tokens before ``ln_post`` (CLIPA), nor with one attention-pooling query (SigLIP,
            CoCa's query 0), or heads whose outputs are not additive (EVA02's sub-LN over the heads, EVA02-E's
            post-norm blocks).
    """
    check_convention(convention)
    backend = as_backend(model)
    backend.require_unablated("the decomposition")
    chosen = list(range(backend.n_layers)) if layers is None else parse_layers(layers, backend.n_layers)
    pool = backend.attention_pool()
    for layer in range(backend.n_layers):  # refuse non-additive heads before any work
        _layer_scale(backend, layer)
    if pool is not None:
        return _pooled_decomposition(backend, pool, pixels, chosen, convention)
    norm, projection, projection_bias = _final_stage(backend)
    embedding, heads, biases, mlps, residual = _residual_terms(backend, pixels, _average_pooled(backend))
    if convention == "textspan":
        return _textspan_terms(norm, projection, projection_bias, chosen, embedding, heads, biases, mlps, residual)

    with torch.inference_mode():
        std = torch.sqrt(residual.var(dim=-1, unbiased=False, keepdim=True) + norm.eps)  # [N, 1]
        gamma = norm.weight.float() if norm.weight is not None else torch.ones_like(residual[0])
        projection = projection.float() if projection is not None else torch.eye(residual.shape[-1],
                                                                                 device=residual.device)

        def linearise(term: torch.Tensor) -> torch.Tensor:
            """``[N, ..., W]`` -> ``[N, ..., D]`` through the layer norm frozen at this image's statistics."""
            centered = term - term.mean(dim=-1, keepdim=True)
            shape = (std.shape[0],) + (1,) * (term.dim() - 2) + (1,)
            return (gamma * centered / std.view(shape)) @ projection

        ln_bias = torch.zeros(projection.shape[-1], device=residual.device)
        if norm.bias is not None:
            ln_bias = ln_bias + norm.bias.float() @ projection
        if projection_bias is not None:
            ln_bias = ln_bias + projection_bias.float()
        head_terms = linearise(heads)  # [N, L, H, D]
        attention = head_terms.sum(dim=2) + linearise(biases)
        return Decomposition(heads=head_terms[:, chosen].cpu(), layers=chosen, attention=attention.cpu(),
                             mlp=linearise(mlps).cpu(), embedding=linearise(embedding).cpu(), ln_bias=ln_bias.cpu(),
                             convention="centred")


@torch.inference_mode()
def _textspan_terms(norm: nn.LayerNorm, projection: torch.Tensor | None, projection_bias: torch.Tensor | None,
                    chosen: list[int], embedding: torch.Tensor, heads: torch.Tensor, biases: torch.Tensor,
                    mlps: torch.Tensor, residual: torch.Tensor) -> Decomposition:
    """The published convention (clip_text_span ``prs_hook.py``): ``mean(x)``, ``beta`` (and a projection bias)
    shared equally over the ``2L + 1`` components and a layer's shares (and ``out_proj`` bias) over its heads;
    every term divided by the image embedding's norm."""
    n_heads = heads.shape[2]
    components = 2 * heads.shape[1] + 1  # embedding, L attention layers, L MLPs
    mean = residual.mean(dim=-1, keepdim=True)  # [N, 1]
    std = torch.sqrt(residual.var(dim=-1, unbiased=False, keepdim=True) + norm.eps)  # [N, 1]
    gamma = norm.weight.float() if norm.weight is not None else torch.ones_like(residual[0])
    beta = norm.bias.float() if norm.bias is not None else torch.zeros_like(residual[0])
    projection = projection.float() if projection is not None else torch.eye(residual.shape[-1],
                                                                             device=residual.device)
    extra = projection_bias.float() if projection_bias is not None else torch.zeros_like(projection[0])
    embedded = (gamma * (residual - mean) / std + beta) @ projection + extra  # the model's image embedding
    scale = embedded.norm(dim=-1, keepdim=True)  # [N, 1]

    def term(values: torch.Tensor, share: int) -> torch.Tensor:
        """``[N, ..., W]`` -> ``[N, ..., D]``: one of ``share`` equal parts of the mean, bias and extra."""
        shape = (values.shape[0],) + (1,) * (values.dim() - 1)
        post = gamma * (values - mean.view(shape) / share) / std.view(shape) + beta / share
        return (post @ projection + extra / share) / scale.view(shape)

    head_terms = term(heads + biases.unsqueeze(2) / n_heads, components * n_heads)  # [N, L, H, D]
    zero = torch.zeros(projection.shape[-1], device=residual.device)
    return Decomposition(heads=head_terms[:, chosen].cpu(), layers=chosen, attention=head_terms.sum(dim=2).cpu(),
                         mlp=term(mlps, components).cpu(), embedding=term(embedding, components).cpu(),
                         ln_bias=zero.cpu(), convention="textspan")


@torch.inference_mode()
def pooled_residual_run(backend: CLIPBackend, pixels: torch.Tensor
                        ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], torch.Tensor]:
    """One forward pass of a tower read by an attention pool, kept token by token: the residual entering layer 0
    ``[B, T, W]``, per layer ``(z [B, T, H, d], x_in, x_out)`` (the heads' outputs before ``out_proj`` and the
    residual around the layer) and the last residual ``[B, T, W]``."""
    recorded: dict[int, torch.Tensor] = {}

    def recorder(layer: int):
        def hook(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            recorded[layer] = z
            return z

        return hook

    x = backend.embed(pixels.to(backend.device, backend.dtype))
    start, layers = x, []
    try:
        for layer in range(backend.n_layers):
            backend.set_head_hook(layer, recorder(layer))
        for layer in range(backend.n_layers):
            x_next = backend.run_layers(x, layer, layer + 1)
            layers.append((recorded.pop(layer), x, x_next))
            x = x_next
    finally:
        backend.clear_head_hooks()
    return start, layers, x


def layer_token_terms(backend: CLIPBackend, layer: int, z: torch.Tensor, x_in: torch.Tensor, x_out: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What ``layer`` adds at every token: heads ``[B, H, T, W]`` (``z`` through each head's ``out_proj`` block,
    times the layer scale), the ``out_proj`` bias ``[B, T, W]`` and the MLP ``[B, T, W]`` (the rest of
    ``x_out - x_in``)."""
    proj = backend.out_proj(layer)
    scale = _layer_scale(backend, layer)
    weight = proj.weight.float().view(-1, backend.n_heads, backend.head_dim)  # [W, H, d]
    heads = scale(torch.einsum("bthd,whd->bhtw", z.float(), weight))
    bias = (torch.zeros_like(heads[:, 0]) if proj.bias is None
            else scale(proj.bias.float()).expand_as(heads[:, 0]))
    mlp = x_out.float() - x_in.float() - heads.sum(dim=1) - bias
    return heads, bias, mlp


class PooledLinearisation:
    """The attention pool frozen at one batch's pattern and per-token norm statistics (see :func:`decompose`):
    per-token terms ``[B, ..., T, W]`` of the last residual -> their terms of the image embedding."""

    def __init__(self, pool, residual: torch.Tensor, convention: str) -> None:
        self.pool, self.convention = pool, convention
        self.mean, self.std = pool.statistics(residual)  # [B, T, 1]
        self.pattern = pool.pattern(residual)  # [B, H', T]
        self.gamma, self.beta = pool.gamma(residual[0, 0].float()), pool.beta(residual[0, 0].float())
        centred = self.gamma * (residual.float() - self.mean) / self.std
        self.pooled = pool.through(centred, self.pattern) + pool.constant()  # [B, D]: the attention's output
        self.embedding = pool.finish(self.pooled).float()  # the model's image embedding
        self.scale = self.embedding.norm(dim=-1) if convention == "textspan" else torch.ones_like(self.pooled[:, 0])
        self.ln_bias = pool.constant()  # centred: the biases' part of the pooled vector, the same for every image
        self.readout = self.embedding - self.pooled  # what the pooling head's MLP adds
        if pool.post_norm is not None:  # CoCa: ln_post(pooled) @ proj, frozen at the pooled vector's statistics
            post = pool.post_norm
            self.post_mean, self.post_std = self.pooled.mean(-1, keepdim=True), torch.sqrt(
                self.pooled.var(-1, unbiased=False, keepdim=True) + post.eps)  # [B, 1]
            self.post_gamma = post.weight.float() if post.weight is not None else torch.ones_like(self.pooled[0])
            self.post_beta = post.bias.float() if post.bias is not None else torch.zeros_like(self.pooled[0])
            self.projection = (pool.projection.float() if pool.projection is not None
                               else torch.eye(self.pooled.shape[-1], device=self.pooled.device))
            self.ln_bias = self.post_beta @ self.projection
            # the pool's biases through the frozen ln_post: per image, a term of no head (shared out under textspan)
            self.readout = (self._post(self.pool.constant().expand_as(self.pooled)) if convention == "centred"
                            else torch.zeros_like(self.embedding))

    def _view(self, stat: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
        return stat.view(stat.shape[0], *(1,) * (term.dim() - 3), stat.shape[1], 1)

    def _post(self, out: torch.Tensor, share: int | None = None) -> torch.Tensor:
        """Pooled-space terms ``[B, ..., D]`` -> the embedding through the frozen post-pool norm and projection
        (identity without one): centred on their own mean (``share`` None), or with one ``share``-th of the pooled
        vector's mean and of the norm's bias (``textspan``)."""
        if self.pool.post_norm is None:
            return out
        shape = (out.shape[0],) + (1,) * (out.dim() - 1)
        std = self.post_std.view(shape)
        if share is None:
            return (self.post_gamma * (out - out.mean(-1, keepdim=True)) / std) @ self.projection
        post = self.post_gamma * (out - self.post_mean.view(shape) / share) / std + self.post_beta / share
        return post @ self.projection

    def __call__(self, term: torch.Tensor, share: int = 1, per_token: bool = False) -> torch.Tensor:
        """``[B, ..., T, W]`` -> ``[B, ..., D]`` (``[B, ..., T, D]`` with ``per_token``). ``centred``: the term
        centred on its own mean, over the token's std; ``textspan``: one of ``share`` equal parts of the token's mean
        and of every bias, over the embedding's norm."""
        mean, std = self._view(self.mean, term), self._view(self.std, term)
        if self.convention == "centred":
            return self._post(self.pool.through(self.gamma * (term - term.mean(-1, keepdim=True)) / std, self.pattern,
                                                per_token))
        post = self.gamma * (term - mean / share) / std + self.beta / share
        bias = self.pool.value_out_bias() / share
        if per_token:
            bias = bias / term.shape[-2]
        out = self._post(self.pool.through(post, self.pattern, per_token) + bias,
                         share * term.shape[-2] if per_token else share)
        scale = self.scale.view(-1, *(1,) * (out.dim() - 1))
        return out / scale


def _pooled_decomposition(backend: CLIPBackend, pool, pixels: torch.Tensor, chosen: list[int], convention: str
                          ) -> Decomposition:
    """:func:`decompose` for a tower read by an attention pool (SigLIP): every residual term is read at every token
    through the frozen pool (see the module doc)."""
    with torch.inference_mode():
        start, layers, residual = pooled_residual_run(backend, pixels)
        n_heads, components = backend.n_heads, 2 * backend.n_layers + 1
        linear = PooledLinearisation(pool, residual, convention)
        heads, attention, mlps = [], [], []
        for layer, (z, x_in, x_out) in enumerate(layers):
            head_out, bias, mlp = layer_token_terms(backend, layer, z, x_in, x_out)
            if convention == "textspan":
                head_terms = linear(head_out + bias[:, None] / n_heads, components * n_heads)  # [B, H, D]
                attention.append(head_terms.sum(dim=1))
            else:
                head_terms = linear(head_out)
                attention.append(head_terms.sum(dim=1) + linear(bias))
            heads.append(head_terms)
            mlps.append(linear(mlp, components))
        embedding = linear(start.float(), components)
        ln_bias = linear.ln_bias if convention == "centred" else torch.zeros_like(linear.embedding[0])
        readout = linear.readout / linear.scale[:, None]
        return Decomposition(heads=torch.stack(heads, 1)[:, chosen].cpu(), layers=chosen,
                             attention=torch.stack(attention, 1).cpu(), mlp=torch.stack(mlps, 1).cpu(),
                             embedding=embedding.cpu(), ln_bias=ln_bias.cpu(), convention=convention,
                             readout=readout.cpu())


def decompose_batches(model: CLIPBackend | nn.Module, batches: Iterable[torch.Tensor],
                      layers: str | Iterable[int] | None = None, convention: str = "textspan") -> Decomposition:
    """:func:`decompose` over an iterable of ``[B, 3, H, W]`` batches, joined along the image axis."""
    check_convention(convention)
    return Decomposition.concat([decompose(model, pixels, layers, convention) for pixels in batches])
