"""DMN-AOA's memory layers (Liang et al., ICCV 2021) on hmmn_ops's reads.

DMN-AOA works on object-level features: a detector (out of scope here) crops every object
into a small fixed grid (ROI features) in the memory frames and in the query frame. Two
memory layers then run on those crops:

- the *template decoder* reads the memory templates densely: every query position attends,
  by a softmax of scaled dot products, over all positions of all memory crops of the
  object (``kernel_guided_read`` without a Gaussian), and decodes the object's mask in the
  query crop from the readout and the query's own value;
- *adaptive object alignment* translates a memory crop's content (its mask, or features)
  into the query crop: a softmax of ``alpha * cosine(memory, query)``, the cosine
  similarity sharpened by ``alpha`` (``kernel_guided_read`` on L2-normalised keys with
  ``scale=alpha``).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

import hmmn_ops

__all__ = ["TemplateDecoder", "AdaptiveObjectAlignment"]


def _check_pair(query, memory):
    if query.dim() != 4 or memory.dim() != 5 or query.shape[0] != memory.shape[0] \
            or query.shape[1] != memory.shape[1] or query.shape[2:] != memory.shape[3:]:
        raise ValueError(f"query (B, C, S, S) and memory (B, C, T, S, S) must agree on B, C and the crop size, "
                         f"got {tuple(query.shape)} and {tuple(memory.shape)}")


class TemplateDecoder(nn.Module):
    """Dense memory read on object crops, then a small mask head.

    in_dim: channels of the ROI features; key_dim / value_dim: the read's; hidden: the head's.
    ``forward(query (B, C, S, S), memory (B, C, T, S, S))`` -> mask logits (B, 1, S, S). The
    memory crops are features that already carry the object's mask (the caller's encoder).
    """

    def __init__(self, in_dim, key_dim=64, value_dim=128, hidden=64):
        super().__init__()
        self.memory_key = nn.Conv2d(in_dim, key_dim, 3, padding=1)
        self.memory_value = nn.Conv2d(in_dim, value_dim, 3, padding=1)
        self.query_key = nn.Conv2d(in_dim, key_dim, 3, padding=1)
        self.query_value = nn.Conv2d(in_dim, value_dim, 3, padding=1)
        self.head = nn.Sequential(nn.Conv2d(2 * value_dim, hidden, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(hidden, 1, 3, padding=1))

    def read(self, query, memory):
        """The template read alone: (B, value_dim, S, S)."""
        _check_pair(query, memory)
        B, C, T, S1, S2 = memory.shape
        frames = memory.transpose(1, 2).reshape(B * T, C, S1, S2)  # per-frame convs

        def per_frame(conv):
            y = conv(frames)
            return y.view(B, T, *y.shape[1:]).transpose(1, 2)

        return hmmn_ops.kernel_guided_read(self.query_key(query), per_frame(self.memory_key), per_frame(self.memory_value))

    def forward(self, query, memory):
        return self.head(torch.cat([self.read(query, memory), self.query_value(query)], 1))


class AdaptiveObjectAlignment(nn.Module):
    """Region translation: ``out[:, q] = sum_p softmax_p(alpha * cos(key[p], query[q])) value[:, p]``.

    alpha: the sharpening of the cosine similarity (> 0); ``learn_alpha`` makes it a
    parameter (kept positive through its log).
    ``forward(query (B, C, S, S), memory_key (B, C, T, S, S), memory_value (B, Cv, T, S, S))``
    -> (B, Cv, S, S): the memory's content (e.g. its masks, Cv = 1) aligned to the query crop.
    """

    def __init__(self, alpha=10.0, learn_alpha=False):
        super().__init__()
        if not alpha > 0:
            raise ValueError(f"alpha: expected > 0, got {alpha!r}")
        log_alpha = torch.tensor(math.log(alpha))
        if learn_alpha:
            self.log_alpha = nn.Parameter(log_alpha)
        else:
            self.register_buffer("log_alpha", log_alpha)

    @property
    def alpha(self):
        return float(self.log_alpha.detach().exp())

    def forward(self, query, memory_key, memory_value):
        _check_pair(query, memory_key)
        # alpha multiplies the query rather than going in as the op's float scale: same logits,
        # and a learnt alpha gets its gradient.
        q = F.normalize(query, dim=1) * self.log_alpha.exp().to(query.dtype)
        k = F.normalize(memory_key, dim=1)
        return hmmn_ops.kernel_guided_read(q, k, memory_value, scale=1.0)
