"""The attention-pooling read-out of towers without a class token (SigLIP's MAP head), as linear pieces.

A tower that pools with a learned probe computes, from the last residual stream ``x [B, T, W]``:

    u = norm(x)                                            (per token: transformers ``post_layernorm``)
    A = softmax(q_probe . k(u)^T * scale)                  [B, H', T], one row per pooling head h'
    pooled = sum_h' W_O[:, h'] sum_t A[h', t] (W_V[h'] u_t + b_V[h']) + b_O                 [B, D]
    embedding = pooled + MLP(LN(pooled))                   (the pooling head's MLP with its residual)

With the pattern ``A`` and the per-token statistics of ``norm`` frozen at the image's own values, ``pooled`` is
linear in the residual stream: that is how TextSpan's SigLIP code (Gandelsman et al., clip_text_span
``compute_siglip.py``/``compute_siglip2.py``) reads it: the pooling attention's output split per token and pooling
head (``pooling_head.attention.out.post``), the MLP's output (``pooling_head.mlp_output``) a term of its own.

:class:`AttentionPool` holds those pieces, taken from the library's own modules (no copy of the weights' values):
:meth:`AttentionPool.from_siglip` for transformers' ``SiglipMultiheadAttentionPoolingHead`` (``nn.MultiheadAttention``
with packed ``in_proj``); :meth:`AttentionPool.from_timm` for timm's ``AttentionPoolLatent`` (open_clip's SigLIP
towers on timm trunks: ``q(latent)``, packed ``kv``, optional ``q_norm``/``k_norm``, ``proj``, ``norm`` + ``mlp``), so
that a backend for those trunks gets the decomposition by returning it from ``attention_pool()``;
:meth:`AttentionPool.from_open_clip` for open_clip's ``AttentionalPooler`` (CoCa) at its query 0, with ``ln_k`` as the
norm and the embedding ``ln_post(pooled) @ proj`` (``post_norm``, ``projection``: linearised, not a term of its own).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from clipheads.errors import ClipHeadsError


@dataclass
class AttentionPool:
    """A probe-attention read-out, as the linear pieces the decompositions need (see the module doc).

    Attributes:
        norm: the layer norm applied to every token before the pool (``post_layernorm``; ``eps``, ``weight``,
            ``bias`` are read from it).
        query: ``[H', d']`` the probe's query per pooling head, already projected (one probe query).
        key: ``[B, T, W] -> [B, H', T, d']`` keys of the normed tokens (with any key norm).
        value_weight: ``[H', d', W]``; value_bias: ``[H', d']``.
        out_weight: ``[D, H', d']``; out_bias: ``[D]``.
        scale: the softmax scale (``d'^-1/2``).
        finish: ``pooled [B, D] -> embedding [B, D]``: what follows the attention (``pooled + MLP(LN(pooled))``).
        post_norm: a layer norm on the pooled vector, then ``projection`` (``[D, D']``, ``None``: the identity):
            the embedding is ``post_norm(pooled) @ projection`` (open_clip's CoCa: ``ln_post``, ``proj``), which the
            decompositions linearise at each image's pooled statistics; ``None`` where ``finish`` adds a term of its
            own (SigLIP's MLP).
    """

    norm: nn.LayerNorm
    query: torch.Tensor
    key: Callable[[torch.Tensor], torch.Tensor]
    value_weight: torch.Tensor
    value_bias: torch.Tensor
    out_weight: torch.Tensor
    out_bias: torch.Tensor
    scale: float
    finish: Callable[[torch.Tensor], torch.Tensor]
    post_norm: nn.LayerNorm | None = None
    projection: torch.Tensor | None = None

    @classmethod
    def from_siglip(cls, norm: nn.LayerNorm, head: nn.Module) -> AttentionPool:
        """The pieces of transformers' ``SiglipMultiheadAttentionPoolingHead`` (``probe``, ``attention`` an
        ``nn.MultiheadAttention``, ``layernorm``, ``mlp``) after the tower's ``post_layernorm`` ``norm``.

        Raises:
            ClipHeadsError: a pooling attention that is not a plain ``nn.MultiheadAttention`` (an adapter on it,
                separate key/value widths) or a probe of more than one query.
        """
        attn = head.attention
        if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim or attn.in_proj_weight is None:
            raise ClipHeadsError(f"the pooling head's attention is a {type(attn).__name__} without one packed "
                                 "in_proj (an adapter on it?); merge adapters into the weights first")
        if head.probe.shape[1] != 1:
            raise ClipHeadsError(f"the pooling head has {head.probe.shape[1]} probe queries; one is supported")
        n_heads, width = attn.num_heads, attn.embed_dim
        d = width // n_heads
        w_q, w_k, w_v = attn.in_proj_weight.float().chunk(3)
        bias = attn.in_proj_bias.float() if attn.in_proj_bias is not None else torch.zeros(3 * width,
                                                                                            device=w_q.device)
        b_q, b_k, b_v = bias.chunk(3)
        query = (head.probe[0, 0].float() @ w_q.T + b_q).view(n_heads, d)

        def key(u: torch.Tensor) -> torch.Tensor:
            return (u.float() @ w_k.T + b_k).view(*u.shape[:2], n_heads, d).transpose(1, 2)

        out = attn.out_proj
        out_bias = out.bias.float() if out.bias is not None else torch.zeros(out.weight.shape[0], device=w_q.device)

        def finish(pooled: torch.Tensor) -> torch.Tensor:
            pooled = pooled.to(head.probe.dtype)
            return pooled + head.mlp(head.layernorm(pooled))

        return cls(norm, query, key, w_v.view(n_heads, d, width), b_v.view(n_heads, d),
                   out.weight.float().view(-1, n_heads, d), out_bias, d ** -0.5, finish)

    @classmethod
    def from_timm(cls, norm: nn.Module, pool: nn.Module) -> AttentionPool:
        """The pieces of timm's ``AttentionPoolLatent`` (``latent``, ``q``, packed ``kv``, ``q_norm``/``k_norm``,
        ``proj``, ``norm`` + ``mlp``; open_clip's SigLIP towers on timm trunks) after the trunk's final ``norm``.

        Raises:
            ClipHeadsError: a learned position embedding in the pool, more than one latent query, or another pool
                type than ``token``.
        """
        if getattr(pool, "pos_embed", None) is not None or pool.latent_len != 1 or pool.pool != "token":
            raise ClipHeadsError("timm AttentionPoolLatent with a position embedding, several latents or "
                                 f"pool_type {pool.pool!r} is not supported (one latent, 'token' pooling is)")
        n_heads, d = pool.num_heads, pool.head_dim
        width = n_heads * d
        query = pool.q_norm(pool.q(pool.latent.float()).view(1, 1, n_heads, d).transpose(1, 2))[0, :, 0]  # [H', d']
        w_kv = pool.kv.weight.float()
        b_kv = pool.kv.bias.float() if pool.kv.bias is not None else torch.zeros(2 * width, device=w_kv.device)

        def key(u: torch.Tensor) -> torch.Tensor:
            k = (u.float() @ w_kv[:width].T + b_kv[:width]).view(*u.shape[:2], n_heads, d).transpose(1, 2)
            return pool.k_norm(k)

        proj = pool.proj
        out_weight = proj.weight.float().view(-1, n_heads, d)
        out_bias = proj.bias.float() if proj.bias is not None else torch.zeros(out_weight.shape[0],
                                                                                device=w_kv.device)

        def finish(pooled: torch.Tensor) -> torch.Tensor:
            pooled = pooled.to(pool.latent.dtype)
            return pooled if pool.mlp is None else pooled + pool.mlp(pool.norm(pooled))

        return cls(norm, query, key, w_kv[width:].view(n_heads, d, -1), b_kv[width:].view(n_heads, d), out_weight,
                   out_bias, float(pool.scale), finish)

    @classmethod
    def from_open_clip(cls, pooler: nn.Module, ln_post: nn.LayerNorm, proj: torch.Tensor | None, query: int = 0
                       ) -> AttentionPool:
        """The pieces of open_clip's ``AttentionalPooler`` (CoCa) read at one of its learned queries: the query
        ``ln_q(pooler.query)[query]`` attends over ``ln_k(tokens)`` through ``pooler.attn`` (an
        ``nn.MultiheadAttention`` whose keys and values may be narrower than its width, ``kdim``/``vdim``), and the
        embedding is ``ln_post(pooled) @ proj`` (open_clip ``VisionTransformer._pool`` with ``pool_type='tok'``:
        query 0 is the contrastive embedding, the others feed CoCa's text decoder). Each query attends on its own, so
        that query is a fixed probe like SigLIP's.

        Raises:
            ClipHeadsError: a pooling attention that is not a plain ``nn.MultiheadAttention`` (an adapter on it).
        """
        attn = pooler.attn
        if type(attn) is not nn.MultiheadAttention or type(attn.out_proj.weight) is not nn.Parameter:
            raise ClipHeadsError(f"the attentional pooler's attention is a {type(attn).__name__} with an adapter or "
                                 "a wrapper; merge adapters into the weights first")
        n_heads, width = attn.num_heads, attn.embed_dim
        d = width // n_heads
        if attn._qkv_same_embed_dim:
            w_q, w_k, w_v = attn.in_proj_weight.float().chunk(3)
        else:  # kdim/vdim != embed_dim (CoCa: the tower's width != the embedding's)
            w_q, w_k, w_v = (attn.q_proj_weight.float(), attn.k_proj_weight.float(), attn.v_proj_weight.float())
        bias = attn.in_proj_bias.float() if attn.in_proj_bias is not None else torch.zeros(3 * width,
                                                                                            device=w_q.device)
        b_q, b_k, b_v = bias.chunk(3)
        probe = pooler.ln_q(pooler.query)[query].float()
        projected = (probe @ w_q.T + b_q).view(n_heads, d)

        def key(u: torch.Tensor) -> torch.Tensor:
            return (u.float() @ w_k.T + b_k).view(*u.shape[:2], n_heads, d).transpose(1, 2)

        out = attn.out_proj
        out_bias = out.bias.float() if out.bias is not None else torch.zeros(out.weight.shape[0], device=w_q.device)

        def finish(pooled: torch.Tensor) -> torch.Tensor:
            pooled = ln_post(pooled.to(pooler.query.dtype))
            return pooled @ proj if proj is not None else pooled

        return cls(pooler.ln_k, projected, key, w_v.view(n_heads, d, -1), b_v.view(n_heads, d),
                   out.weight.float().view(-1, n_heads, d), out_bias, d ** -0.5, finish, post_norm=ln_post,
                   projection=proj)

    @property
    def n_heads(self) -> int:
        return int(self.query.shape[0])

    def normed(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, W]`` residual -> the normed tokens the pool reads (float32)."""
        return self.norm(x).float()

    def statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token ``mean`` and ``std = sqrt(var + eps)`` of ``norm`` on ``x [B, T, W]`` (``[B, T, 1]`` each)."""
        x = x.float()
        return x.mean(-1, keepdim=True), torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + self.norm.eps)

    def pattern(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H', T]``: the probe's attention over the tokens of the residual ``x [B, T, W]``."""
        k = self.key(self.normed(x))  # [B, H', T, d']
        return torch.softmax(torch.einsum("hd,bhtd->bht", self.query, k) * self.scale, dim=-1)

    def gamma(self, like: torch.Tensor) -> torch.Tensor:
        return self.norm.weight.float() if self.norm.weight is not None else torch.ones_like(like)

    def beta(self, like: torch.Tensor) -> torch.Tensor:
        return self.norm.bias.float() if self.norm.bias is not None else torch.zeros_like(like)

    def through(self, normed_terms: torch.Tensor, pattern: torch.Tensor, per_token: bool = False) -> torch.Tensor:
        """Normed per-token terms ``[B, ..., T, W]`` -> their share of the pooled vector ``[B, ..., D]``:
        ``sum_h' W_O[:, h'] W_V[h'] sum_t A[h', t] term_t`` (no biases: linear); with ``per_token``, each token's
        share ``[B, ..., T, D]`` (not summed over ``t``)."""
        batch, rest, tokens = normed_terms.shape[0], normed_terms.shape[1:-2], normed_terms.shape[-2]
        flat = normed_terms.reshape(batch, -1, *normed_terms.shape[-2:])  # [B, K, T, W]
        if per_token:
            values = torch.einsum("bktw,gdw->bktgd", flat, self.value_weight) * pattern.transpose(1, 2)[:, None, :, :,
                                                                                                      None]
            return torch.einsum("bktgd,egd->bkte", values, self.out_weight).reshape(batch, *rest, tokens, -1)
        weighted = torch.einsum("bgt,bktw->bkgw", pattern, flat)  # [B, K, H', W]
        values = torch.einsum("bkgw,gdw->bkgd", weighted, self.value_weight)
        return torch.einsum("bkgd,egd->bke", values, self.out_weight).reshape(batch, *rest, -1)

    def value_out_bias(self) -> torch.Tensor:
        """``[D]``: ``W_O b_V + b_O``, the part of :meth:`constant` that is not the norm's bias."""
        return torch.einsum("egd,gd->e", self.out_weight, self.value_bias) + self.out_bias

    def constant(self) -> torch.Tensor:
        """``[D]``: what every image's pooled vector gets from the biases alone: ``W_O (W_V beta + b_V) + b_O``
        (the pattern's rows sum to 1)."""
        beta = self.beta(self.value_weight[0, 0])
        values = torch.einsum("gdw,w->gd", self.value_weight, beta) + self.value_bias
        return torch.einsum("egd,gd->e", self.out_weight, values) + self.out_bias


def siglip_pool(vision: nn.Module) -> AttentionPool:
    """The :class:`AttentionPool` of a transformers SigLIP vision transformer (``post_layernorm`` + ``head``)."""
    head = getattr(vision, "head", None)
    if head is None or not getattr(vision, "use_head", True):
        raise ClipHeadsError("this SigLIP vision tower has no attention-pooling head (use_head=False)")
    return AttentionPool.from_siglip(vision.post_layernorm, head)
