"""The local (sliding-window) layers' own window in the PyTorch twin (Gemma 3, README "Gemma 3").

Mirrors eijax.model exactly: a local layer attends over [its history ; the cache slots], where the
history holds the Hn = sliding_window - 1 tokens just before the cache window at positions
sink - Hn .. sink - 1 (RoPE is relative, so these are the true stream distances), and the sink
slots count only while nothing has been compressed (then they directly precede the window).
`compress` rolls the history forward: the last Hn valid tokens of [history ; sink (until the
first compress) ; window], right-aligned.

Written for export like the rest of the twin: static shapes, no gathers by computed index. The
roll is a one-hot selection matrix times the rows (exact: each output row is one product by 1.0
plus zeros), built from a cumulative count of valid entries.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from eijax.config import MemoryConfig, ModelConfig
from eijax.rope import inverse_frequencies, rope_table

from convert.torch_layers import AttentionView


class LocalHistory(nn.Module):
    """Constant tables of the local layers (their RoPE base, key positions) and the roll at
    compress (a module, so its ops carry this name in the graph)."""

    def __init__(self, config: ModelConfig, memory: MemoryConfig):
        super().__init__()
        s, c, hn = memory.sink, memory.cache_size, config.local_history
        self.sink, self.history, self.sliding_window = s, hn, config.sliding_window
        k_pos = np.concatenate([np.arange(s - hn, s), np.arange(c)]).astype(np.int32)  # history, then cache slots
        start = min(0, s - hn)
        cos, sin = rope_table(config.local_rope, config.head_dim, c - start, start=start)  # eijax's table
        inv = inverse_frequencies(config.local_rope, config.head_dim)
        self.register_buffer("k_pos", torch.from_numpy(k_pos), persistent=False)
        self.register_buffer("k_cos", torch.from_numpy(cos[k_pos - start]), persistent=False)
        self.register_buffer("k_sin", torch.from_numpy(sin[k_pos - start]), persistent=False)
        self.register_buffer("inv_freq", torch.from_numpy(np.concatenate([inv, inv])), persistent=False)

    def forward(self, local_k: list, local_v: list, k: list, v: list, local_valid: torch.Tensor,
                valid: torch.Tensor) -> tuple[list, list, torch.Tensor]:
        """The history after compress: per layer (None stays None: a global layer keeps none) the
        last Hn valid rows of [history ; sink unless detached ; window], and its validity [B, Hn]."""
        s, hn = self.sink, self.history
        detached = local_valid.any(dim=1)
        parts = [local_valid] + ([valid[:, :s] & ~detached[:, None]] if s else []) + [valid[:, s:]]
        all_valid = torch.cat(parts, dim=1)                                    # [B, Hn + C]
        count = torch.cumsum(all_valid.to(torch.int32), dim=1)                 # valid entries so far
        # history row j takes the valid entry numbered total - Hn + 1 + j; rows with no such entry stay 0
        want = count[:, -1:] - hn + 1 + torch.arange(hn, dtype=torch.int32)[None, :]        # [B, Hn]
        pick = ((count[:, None, :] == want[:, :, None]) & all_valid[:, None, :]).float()  # [B, Hn, Hn + C]

        def roll(hist, cache):
            if hist is None:
                return None
            both = torch.cat([hist, cache.to(hist.dtype)], dim=1)
            return torch.matmul(pick, both.reshape(both.shape[0], both.shape[1], -1)).reshape(hist.shape)

        return ([roll(h, c) for h, c in zip(local_k, k)], [roll(h, c) for h, c in zip(local_v, v)], want >= 1)


def local_view(history: LocalHistory, local_valid: torch.Tensor, slot_valid: torch.Tensor,
               q_pos: torch.Tensor) -> AttentionView:
    """Which keys ([history ; cache slots]) each query of a local layer sees: valid ones within
    the sliding window at their true distance, the sink only until the first compress."""
    n_slots = slot_valid.shape[1]
    detached = local_valid.any(dim=1)
    sink_visible = (torch.arange(n_slots) >= history.sink)[None, :] | ~detached[:, None]
    k_valid = torch.cat([local_valid, slot_valid & sink_visible], dim=1)      # [B, Hn + C]
    dist = q_pos[:, None] - history.k_pos[None, :]                           # [T, Hn + C]
    mask = k_valid[:, None, :] & ((dist >= 0) & (dist < history.sliding_window))[None]
    angles = q_pos.float()[:, None] * history.inv_freq[None, :]
    return AttentionView(mask, torch.cos(angles), torch.sin(angles), history.k_cos, history.k_sin)
