"""Fusion encoder: text tokens read the image patches through cross-attention.

Each layer is BERT-shaped (post-norm, so a text model's layer weights initialise it):

    x = LN(x + SelfAttn(x))            # words look at each other
    x = LN(x + CrossAttn(x, image))    # words look at image tokens -> the attention we explain
    x = LN(x + FFN(x))

Written here on purpose instead of forking a text model: ~150 lines, and the cross-attention
weights come back as return values (for Grad-CAM) instead of being fished out of module state.
Heads on top: ITM (2-way match / no match on the fusion [CLS]) and an optional MLM head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from envlf.model.config import EnVLFConfig


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections (BERT's layout).

    Returns the attention probabilities when asked; they stay in the autograd graph, so
    their gradient (for Grad-CAM) is one `torch.autograd.grad` call away."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        kv_dim = kv_dim or dim
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim, dim)
        self.v = nn.Linear(kv_dim, dim)
        self.o = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, H, N, D/H)
        B, N, _ = x.shape
        return x.view(B, N, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None,
                need_weights: bool = False, parts: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, D) queries; context (B, S, kv_dim); key_mask (B, S) 1 = attend, 0 = pad.
        parts: with need_weights, a dict that receives the heads' q, k, v (B, H, N, D/H) and
        their output ctx = attn @ v (B, H, T, D/H), in the autograd graph (envlf.explain.gradcam)."""
        q, k, v = self._split(self.q(x)), self._split(self.k(context)), self._split(self.v(context))
        bias = None
        if key_mask is not None:  # (B, 1, 1, S) additive mask
            bias = (1.0 - key_mask[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, H, T, S)
            if bias is not None:
                scores = scores + bias
            attn = scores.softmax(dim=-1)
            out = attn @ v
            if parts is not None:
                parts.update(q=q, k=k, v=v, ctx=out)
        else:
            attn = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        B, H, T, Dh = out.shape
        return self.o(out.transpose(1, 2).reshape(B, T, H * Dh)), attn


class FusionLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ff_dim: int, image_dim: int, dropout: float, eps: float):
        super().__init__()
        self.self_attn = MultiHeadAttention(dim, heads)
        self.self_norm = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = MultiHeadAttention(dim, heads, kv_dim=image_dim)
        self.cross_norm = nn.LayerNorm(dim, eps=eps)
        self.ff_in = nn.Linear(dim, ff_dim)
        self.ff_out = nn.Linear(ff_dim, dim)
        self.ff_norm = nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, text_mask, image, image_mask=None, need_weights=False, parts=None):
        h, _ = self.self_attn(x, x, text_mask)
        x = self.self_norm(x + self.drop(h))
        h, attn = self.cross_attn(x, image, image_mask, need_weights=need_weights, parts=parts)
        x = self.cross_norm(x + self.drop(h))
        h = self.ff_out(self.drop(F.gelu(self.ff_in(x))))
        x = self.ff_norm(x + self.drop(h))
        return x, attn

    def load_bert_layer(self, sd: dict[str, torch.Tensor]) -> None:
        """Initialise self-attention and feed-forward from a Hugging Face BertLayer state dict.
        The cross-attention has no counterpart in a text model and keeps its random init."""
        mapping = {
            "self_attn.q": "attention.self.query", "self_attn.k": "attention.self.key",
            "self_attn.v": "attention.self.value", "self_attn.o": "attention.output.dense",
            "self_norm": "attention.output.LayerNorm", "ff_in": "intermediate.dense",
            "ff_out": "output.dense", "ff_norm": "output.LayerNorm",
        }
        own = {}
        for mine, theirs in mapping.items():
            for p in ("weight", "bias"):
                own[f"{mine}.{p}"] = sd[f"{theirs}.{p}"]
        missing, unexpected = self.load_state_dict(own, strict=False)
        assert not unexpected and all(k.startswith("cross_") for k in missing), (missing, unexpected)


@dataclass
class FusionOutput:
    hidden: torch.Tensor  # (B, T, D) last layer's text states
    cross_attentions: list[torch.Tensor] | None  # per layer (B, H, T, 1 + P), when asked
    cross_parts: list[dict] | None = None  # per layer the cross-attention's q, k, v, ctx, when asked


class FusionEncoder(nn.Module):
    def __init__(self, cfg: EnVLFConfig, text_hidden: int, text_heads: int, ff_dim: int, eps: float,
                 vocab_size: int):
        super().__init__()
        f = cfg.fusion
        self.layers = nn.ModuleList(
            FusionLayer(text_hidden, text_heads, ff_dim, cfg.vision.width, f.dropout, eps) for _ in range(f.layers)
        )
        self.itm_head = nn.Linear(text_hidden, 2)
        self.mlm_transform = None
        if f.mlm_head:  # BERT's prediction head; the decoder reuses the word embeddings (tied)
            self.mlm_transform = nn.Sequential(nn.Linear(text_hidden, text_hidden), nn.GELU(),
                                               nn.LayerNorm(text_hidden, eps=eps))
            self.mlm_bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, text_hidden, text_mask, image_tokens, image_mask=None,
                output_attentions: bool = False) -> FusionOutput:
        """text_hidden (B, T, D) from the text encoder; image_tokens (B, 1 + P, Dv)."""
        x, attns, parts = text_hidden, [], []
        for layer in self.layers:
            parts.append({} if output_attentions else None)
            x, a = layer(x, text_mask, image_tokens, image_mask, need_weights=output_attentions, parts=parts[-1])
            attns.append(a)
        return FusionOutput(x, attns if output_attentions else None, parts if output_attentions else None)

    def itm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, D) fusion states -> (B, 2) logits [no match, match] from the [CLS] position."""
        return self.itm_head(hidden[:, 0])

    def mlm_logits(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, vocab), decoder tied to the text model's word embeddings."""
        if self.mlm_transform is None:
            raise RuntimeError("this model was built without an MLM head (fusion.mlm_head=false)")
        return F.linear(self.mlm_transform(hidden), word_embeddings, self.mlm_bias)
