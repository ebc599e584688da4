"""A small GPT-2-style decoder-only transformer, trained from scratch.

Token + learned position embeddings, pre-LayerNorm blocks (causal self-attention, GELU MLP),
a final LayerNorm and a linear head (untied by default; ``tie_head=True`` shares the token
embedding). Every projection is an ``nn.Linear`` (``attn.qkv``, ``attn.proj``, ``mlp.fc``,
``mlp.proj``, ``head``) so layer-wise gradient hooks see them. No dropout and no buffers:
the causal mask is built on the fly, so ``state_dict`` holds parameters only and outputs are
deterministic. The same class serves the text and the music settings at different sizes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t attends to positions <= t only."""

    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} must be divisible by n_head={n_head}")
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend causally; [B, T, d] -> [B, T, d]."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        h = self.n_head
        q, k, v = (z.reshape(b, t, h, d // h).transpose(1, 2) for z in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // h)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        out = F.softmax(scores, dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class MLPBlock(nn.Module):
    """Position-wise feed-forward layer d -> 4d -> d with GELU."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feed-forward map; [B, T, d] -> [B, T, d]."""
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLPBlock(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual attention then residual MLP."""
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer mapping tokens [B, T] (T <= block_len) to logits [B, T, V]."""

    def __init__(self, vocab_size: int, block_len: int, d_model: int = 128, n_layer: int = 2,
                 n_head: int = 4, tie_head: bool = False) -> None:
        super().__init__()
        if min(vocab_size, block_len, d_model, n_layer, n_head) < 1:
            raise ValueError(
                f"GPT sizes must be positive: vocab_size={vocab_size}, block_len={block_len}, "
                f"d_model={d_model}, n_layer={n_layer}, n_head={n_head}"
            )
        self.block_len = block_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(block_len, d_model)
        self.blocks = nn.ModuleList([Block(d_model, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))
        if tie_head:
            self.head.weight = self.tok_emb.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] for tokens [B, T]."""
        if tokens.dim() != 2:
            raise ValueError(f"GPT expects token ids [B, T], got shape {tuple(tokens.shape)}")
        t = tokens.shape[1]
        if t > self.block_len:
            raise ValueError(f"sequence length {t} exceeds the model's block_len {self.block_len}")
        pos = torch.arange(t, device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
