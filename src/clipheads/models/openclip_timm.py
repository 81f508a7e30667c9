"""open_clip image towers on timm trunks (``TimmModel``: SigLIP/SigLIP2, EVA01/EVA02, MobileCLIP-B, ViTamin).

The tower is ``model.visual = TimmModel(trunk, head)``; the trunk is timm's ``VisionTransformer`` (blocks with
``timm.layers.Attention``: packed ``qkv``, optional ``q_norm``/``k_norm``, fused or explicit softmax) or timm's ``Eva``
(blocks with ``timm.models.eva.EvaAttention``: packed or separate ``q/k/v`` projections, rotary embeddings, an
optional sub-LN ``norm`` over the concatenated heads before ``proj``).

A head hook runs on timm's own modules, the library's forward untouched: a forward pre-hook on ``attn.norm`` (an
``nn.Identity`` unless the block normalises the heads' concatenated outputs) receives the per-head outputs ``z``
``[B, T, H*d]`` before anything mixes the heads, and replaces them; the values ``v`` come from the module that
computes them (a forward hook on ``qkv`` or ``v_proj``; EVA's packed ``qkv`` with a ``q_bias``, which timm applies
with ``F.linear`` on ``qkv.weight``, is read the same way). Layers without a hook run timm's code as is, so an
all-ones mask is the library's forward bit for bit.

What is refused, in one line each: trunks other than these two classes (ConvNeXt, FastViT, Swin, rel-pos ViTs),
attention classes other than the two above (e.g. PE-Core's ``AttentionRope``), and folding (``bake``) or decomposing
heads through a sub-LN ``norm`` or a gate (EVA02's ``scale_attn_inner``): there the output projection is not linear
in one head's output; decomposing through post-norm blocks (EVA02-E's ``EvaBlockPostNorm``, which normalises the
attention output before the residual) or an average pool. The decomposition reads SigLIP's ``AttentionPoolLatent``
(:meth:`attention_pool`) and EVA01's class token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from clipheads.errors import ClipHeadsError, ModelLoadError
from clipheads.models.base import (
    Architecture,
    CLIPBackend,
    HeadHook,
    hooked_weights,
    recall_input,
    remember_inputs,
)
from clipheads.models.openclip import OpenCLIPBackend

KIND = "open_clip-timm"


def _timm_classes() -> dict[str, type]:
    from timm.layers import Attention
    from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
    from timm.models.vision_transformer import Block, VisionTransformer

    return {"VisionTransformer": VisionTransformer, "Eva": Eva, "Attention": Attention,
            "EvaAttention": EvaAttention, "Block": Block, "EvaBlock": EvaBlock, "EvaBlockPostNorm": EvaBlockPostNorm}


def is_timm_tower(model: nn.Module) -> bool:
    """Whether ``model`` is an open_clip model whose image tower is a ``TimmModel`` (``model.visual.trunk``)."""
    visual = getattr(model, "visual", None)
    return type(visual).__name__ == "TimmModel" and isinstance(getattr(visual, "trunk", None), nn.Module)


def check_trunk(trunk: nn.Module, name: str) -> None:
    """Refuse (:class:`ModelLoadError`, one line) a timm trunk whose heads clipheads cannot hook exactly."""
    c = _timm_classes()
    if type(trunk) not in (c["VisionTransformer"], c["Eva"]):
        raise ModelLoadError(f"{name}: the timm trunk is {type(trunk).__module__}.{type(trunk).__name__}, not a timm "
                             "VisionTransformer or Eva; clipheads hooks the attention heads of ViT trunks only")
    if getattr(trunk, "rope_mixed", False):
        raise ModelLoadError(f"{name}: a timm Eva trunk with per-layer ('mixed') rotary embeddings is not supported")
    for i, block in enumerate(trunk.blocks):
        attn = getattr(block, "attn", None)
        if type(attn) not in (c["Attention"], c["EvaAttention"]):
            kind = f"{type(attn).__module__}.{type(attn).__name__}"
            raise ModelLoadError(f"{name}: block {i}'s attention is {kind}, not timm's Attention or EvaAttention; "
                                 "clipheads cannot hook it exactly")


def _head_mixing(attn: nn.Module) -> str | None:
    """What mixes the heads' outputs between ``z`` and ``proj`` (``None``: nothing, ``proj`` is linear in each
    head)."""
    if not isinstance(attn.norm, nn.Identity):
        return f"a {type(attn.norm).__name__} over the concatenated heads (attn.norm, sub-LN)"
    if getattr(attn, "gate", None) is not None:
        return "a sigmoid gate on the attention output (attn.gate)"
    return None


def _value_site(attn: nn.Module) -> nn.Module | None:
    """The module whose output holds the values, as timm's forward calls it; ``None`` when timm computes them with
    ``F.linear`` on ``qkv.weight`` (EVA's packed ``qkv`` with ``q_bias``, not ``qkv_bias_separate``)."""
    if getattr(attn, "v_proj", None) is not None:
        return attn.v_proj
    if getattr(attn, "q_bias", None) is not None and not getattr(attn, "qkv_bias_separate", False):
        return None
    return attn.qkv


def _values(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``v [B, T, H, d]`` of ``attn`` on its input ``x [B, T, W]``, from the values its forward stored (see
    :func:`_value_site`) or, for EVA's ``F.linear`` path, from ``qkv.weight`` and ``v_bias`` as timm reads them."""
    batch, tokens = x.shape[:2]
    stored = attn.__dict__.pop("_clipheads_v", None)
    if stored is None:  # EVA: qkv = F.linear(x, qkv.weight, cat(q_bias, k_bias, v_bias))
        width = attn.num_heads * attn.head_dim
        stored = F.linear(x, attn.qkv.weight[2 * width:], attn.v_bias)
    elif stored.shape[-1] == 3 * attn.num_heads * attn.head_dim:  # packed qkv (bias added in place, if separate)
        stored = stored.view(batch, tokens, 3, attn.num_heads, attn.head_dim)[:, :, 2]
    return stored.reshape(batch, tokens, attn.num_heads, attn.head_dim)


def _attn_input(attn: nn.Module, args: tuple) -> None:
    attn.__dict__["_clipheads_x"] = args[0]


def _store_values(attn: nn.Module):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        attn.__dict__["_clipheads_v"] = output

    return hook


def _replace_heads(attn: nn.Module):
    """Forward pre-hook of ``attn.norm``: the per-head outputs ``z [B, T, H*d]`` go through the head hook."""

    def hook(module: nn.Module, args: tuple) -> tuple:
        z = args[0]
        batch, tokens = z.shape[:2]
        x = attn.__dict__.pop("_clipheads_x", None)
        if x is None:
            raise ClipHeadsError("a clipheads-hooked timm attention's norm was called outside the attention's own "
                                 "forward; remove the ablation (clipheads.remove) before calling it directly")
        z = attn._clipheads_hook(z.reshape(batch, tokens, attn.num_heads, attn.head_dim), _values(attn, x))
        return (z.reshape(batch, tokens, -1), *args[1:])

    return hook


def _post_norm(block: nn.Module) -> bool:
    """Whether ``block`` normalises after its attention and MLP (timm's ``EvaBlockPostNorm``) instead of before."""
    return type(block).__name__ == "EvaBlockPostNorm"


def _adapted(attn: nn.Module) -> bool:
    """Whether ``attn`` carries an adapter (a non-``nn.Linear`` projection such as a peft wrapper, or parametrized
    weights): its weights are then not what timm computes with."""
    linears = [m for m in (attn.qkv, getattr(attn, "q_proj", None), getattr(attn, "k_proj", None),
                           getattr(attn, "v_proj", None), attn.proj) if m is not None]
    return any(type(m) is not nn.Linear for m in linears) or any(parametrize.is_parametrized(m)
                                                                   for m in attn.modules())


class OpenCLIPTimmBackend(OpenCLIPBackend):
    """An ``open_clip`` model whose image tower is a ``TimmModel`` on a timm ``VisionTransformer`` or ``Eva`` trunk.

    Inputs, text tower and the library paths are :class:`OpenCLIPBackend`'s; the heads are those of the trunk's
    blocks (``trunk.blocks[l].attn``, ``L{l}.H{h}``). The staged view runs timm's own modules: ``embed`` =
    ``patch_embed`` -> ``_pos_embed`` (-> ``patch_drop``) -> ``norm_pre``; ``run_layers`` = the blocks (EVA: with
    the trunk's rotary embedding); ``pool`` = ``norm`` -> ``forward_head`` (class token, average or the
    ``AttentionPoolLatent`` probe of SigLIP) -> the tower's ``head``. On a trunk without a class token (SigLIP,
    ViTamin) the ``cls`` operator is refused (``has_class_token``), as for transformers' SigLIP.
    """

    kind = KIND

    def __init__(self, model: nn.Module, name: str, preprocess=None, tokenizer=None,
                 model_cfg: dict | None = None) -> None:
        CLIPBackend.__init__(self, model, name)
        if not is_timm_tower(model):
            raise ModelLoadError(f"{name}: the image tower is {type(getattr(model, 'visual', None)).__name__}, not an "
                                 "open_clip TimmModel")
        visual = model.visual
        check_trunk(visual.trunk, name)
        self._visual = visual
        self._trunk = visual.trunk
        self._blocks = visual.trunk.blocks
        self._eva = type(self._trunk).__name__ == "Eva"
        self._rope_cache: dict = {}
        remember_inputs(model, preprocess=preprocess, tokenizer=tokenizer, model_cfg=model_cfg)
        self._preprocess = recall_input(model, "preprocess")
        self._tokenizer = recall_input(model, "tokenizer")

    @property
    def architecture(self) -> Architecture:
        attn = self.attention_module(0)
        return Architecture(len(self._blocks), attn.num_heads, attn.head_dim, self._trunk.embed_dim,
                            name=f"open_clip:TimmModel({type(self._trunk).__name__})")

    # ------------------------------------------------------------ staged image tower
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        trunk = self._trunk
        x = trunk.patch_embed(pixels)
        if self._eva:
            x, rope = trunk._pos_embed(x)
            self._rope_cache[(x.device, x.dtype)] = rope
        else:
            x = trunk.patch_drop(trunk._pos_embed(x))
        return trunk.norm_pre(x)

    def _rope(self, x: torch.Tensor) -> torch.Tensor | None:
        """The trunk's rotary embedding at this image size (EVA; ``None`` for other trunks or without rope)."""
        if not self._eva or self._trunk.rope is None:
            return None
        key = (x.device, x.dtype)
        if key not in self._rope_cache:  # timm's own _pos_embed on one blank image of the model's size
            size = self.image_size
            self.embed(torch.zeros(1, 3, size, size, device=x.device, dtype=x.dtype))
        return self._rope_cache[key]

    def run_layers(self, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        if self._eva:
            rope = self._rope(x)
            for block in self._blocks[start:end]:
                x = block(x, rope=rope)
            return x
        for block in self._blocks[start:end]:
            x = block(x)
        return x

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return self._visual.head(self._trunk.forward_head(self._trunk.norm(x)))

    # ------------------------------------------------------------ one layer in two steps
    @property
    def supports_layer_split(self) -> bool:
        c = _timm_classes()
        blocks = (c["Block"], c["EvaBlock"], c["EvaBlockPostNorm"])
        return all(type(b) in blocks and getattr(b.attn, "gate", None) is None and not _adapted(b.attn)
                   for b in self._blocks)

    @property
    def readout_tokens(self) -> int | None:
        trunk = self._trunk
        token_pool = trunk.attn_pool is None and trunk.global_pool == "token" and trunk.num_prefix_tokens >= 1
        return 1 if token_pool else None

    @property
    def prefix_tokens(self) -> int:
        """Tokens before the patches: the class token and any register tokens (timm's ``num_prefix_tokens``)."""
        return int(self._trunk.num_prefix_tokens)

    @property
    def has_class_token(self) -> bool:
        """Whether the trunk has a class token (timm's ``cls_token``; SigLIP and ViTamin trunks have none)."""
        return getattr(self._trunk, "cls_token", None) is not None

    def attention_pool(self):
        """The trunk's ``AttentionPoolLatent`` (SigLIP) after its final ``norm``, as
        :meth:`clipheads.models.pooling.AttentionPool.from_timm`; ``None`` for trunks without one.

        Raises:
            ClipHeadsError: something after the pool that is not the identity (a projection of the tower's head, an
                ``fc_norm``): the decomposition's read-out term would then not be in the pooled vector's space.
        """
        trunk = self._trunk
        if getattr(trunk, "attn_pool", None) is None:
            return None
        from clipheads.models.pooling import AttentionPool

        after = [m for m in (trunk.fc_norm, trunk.head, *self._visual.head.children())
                 if not isinstance(m, (nn.Identity, nn.Dropout))]
        if after:
            raise ClipHeadsError(f"{self.name}: the attention pool is followed by "
                                 f"{', '.join(type(m).__name__ for m in after)}; the decomposition reads the pool "
                                 "when nothing but the identity follows it (open_clip's timm_proj 'none')")
        return AttentionPool.from_timm(trunk.norm, trunk.attn_pool)

    def layer_attention(self, layer: int, x: torch.Tensor, queries: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = self._qkv(layer, x)
        if queries is not None:
            q = q[:, :, :queries]
        z = F.scaled_dot_product_attention(q, k, v)
        return z.transpose(1, 2), v.transpose(1, 2)

    def attention_weights(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Attention weights ``[B, H, T, T]`` of ``layer`` on the residual ``x [B, T, W]`` entering it, as timm's
        explicit-softmax branch computes them (``softmax(q k^T * attn.scale)`` after ``q_norm``/``k_norm`` and EVA's
        rope; timm returns no weights), with the layer's head hook applied (an ablated head shows its operator)."""
        q, k, _ = self._qkv(layer, x)
        weights = torch.softmax((q * self._blocks[layer].attn.scale) @ k.transpose(-2, -1), dim=-1)
        return hooked_weights(self.head_hook(layer), weights)

    def _qkv(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q, k, v [B, H, T, d]`` of ``layer`` on the residual ``x [B, T, W]``, read off timm's modules as its
        forward does (packed, packed with q/v biases or separate projections; q/k norms; EVA's rope)."""
        block = self._blocks[layer]
        attn = block.attn
        h = x if _post_norm(block) else block.norm1(x)
        batch, tokens = h.shape[:2]
        shape = (batch, tokens, attn.num_heads, attn.head_dim)
        if getattr(attn, "q_proj", None) is not None:  # EVA, separate projections
            q, k, v = (p(h).view(shape).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        else:
            if getattr(attn, "q_bias", None) is not None:  # EVA, packed with q/v biases
                qkv = F.linear(h, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
            else:
                qkv = attn.qkv(h)
            q, k, v = qkv.view(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        rope = self._rope(x)
        if rope is not None:  # as EvaAttention.forward: the prefix tokens are not rotated
            from timm.layers import apply_rot_embed_cat

            npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        return q, k, v

    def layer_finish(self, layer: int, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        block = self._blocks[layer]
        # norm.forward: past the head hook's pre-hook (run_layer_split has applied the hook to z already)
        out = block.attn.proj(block.attn.norm.forward(z.reshape(*z.shape[:2], -1)))
        if _post_norm(block):  # EVA02-E: x + norm1(attn(x)), then x + norm2(mlp(x))
            x = x + block.norm1(out)
            return x + block.norm2(block.mlp(x))
        if self._eva:
            x = x + (out if block.gamma_1 is None else block.gamma_1 * out)
            mlp = block.mlp(block.norm2(x))
            return x + (mlp if block.gamma_2 is None else block.gamma_2 * mlp)
        x = x + block.ls1(out)
        return x + block.ls2(block.mlp(block.norm2(x)))

    # ------------------------------------------------------------ attention sites
    def attention_module(self, layer: int) -> nn.Module:
        """Layer ``layer``'s timm attention module (``Attention`` or ``EvaAttention``)."""
        return self._blocks[layer].attn

    def out_proj(self, layer: int) -> nn.Linear:
        """``attn.proj`` of ``layer`` (``[width, n_heads * head_dim]``, head-major).

        Raises :class:`ClipHeadsError` when something mixes the heads before it (EVA02's sub-LN, a gate: a head's
        share of the output is then not ``proj``'s columns times its ``z``) or when it carries an adapter."""
        attn = self.attention_module(layer)
        mixing = _head_mixing(attn)
        if mixing is not None:
            raise ClipHeadsError(f"{self.name}: layer {layer} applies {mixing} before its output projection, so a "
                                 "head's output is not folded into proj's weights; use clipheads.apply / "
                                 "clipheads.ablate for this model")
        if type(attn.proj) is not nn.Linear or parametrize.is_parametrized(attn.proj):
            raise ClipHeadsError(f"{self.name}: layer {layer}'s proj carries an adapter ({type(attn.proj).__name__}), "
                                 "so its weight is not what the model computes with; merge the adapter into the "
                                 "weights first (peft: model.merge_and_unload())")
        return attn.proj

    def _install(self, layer: int, hook: HeadHook) -> None:
        attn = self.attention_module(layer)
        self._uninstall(layer)
        handles = [attn.register_forward_pre_hook(_attn_input)]
        site = _value_site(attn)
        if site is not None:
            handles.append(site.register_forward_hook(_store_values(attn)))
        handles.append(attn.norm.register_forward_pre_hook(_replace_heads(attn)))
        attn._clipheads_hook = hook
        attn.__dict__["_clipheads_handles"] = handles

    def _uninstall(self, layer: int) -> None:
        attn = self.attention_module(layer)
        for handle in attn.__dict__.pop("_clipheads_handles", []):
            handle.remove()
        for name in ("_clipheads_hook", "_clipheads_x", "_clipheads_v"):
            attn.__dict__.pop(name, None)


__all__ = ["KIND", "OpenCLIPTimmBackend", "check_trunk", "is_timm_tower"]
