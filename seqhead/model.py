"""Sequence heads on per-frame features: the paper's MRNN (concatenate → Mask → FC → FC) and pooling heads.

All heads share one encoder and end in FC(fc) → ReLU → FC(n targets). The encoder is recurrent (GRU or LSTM,
sequential in time) or convolutional (`conv`: dilated 1-D convolutions, parallel in time, many times faster on a
CPU; its receptive field is 1 + 2·(2^blocks − 1) frames, 31 with the default 4 blocks).
- `mrnn`: the paper's §3.2 head. The d'·t outputs are concatenated, positions ≥ l are zeroed by the Mask, then
  FC(fc). Its first FC has d'·t inputs per unit; `routed_columns` tells the optimiser which of them a batch uses.
- `mean`: masked mean of the valid outputs (positions < l).
- `attn`: masked attention pooling (softmax of a learned score over positions < l).
- `last`: the last valid hidden state (the MuSe 2022 baseline style, packed sequences).
With mask=False (the paper's "w/o Mask & Routing") the encoder runs over the zero padding and nothing is masked.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .config import HEADS, RNNS, SKIP_PADDING, ModelConfig  # noqa: F401 (re-exported)


def valid_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T) bool, True at positions < l."""
    return torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]


class ConvEncoder(nn.Module):
    """Residual blocks of dilated 1-D convolutions (kernel 3, 'same' zero padding, ReLU) over time.

    With `lengths`, every block's output is zeroed at positions ≥ l, so what a video's valid positions see beyond
    its end is zeros, exactly as the convolution's own padding: outputs do not depend on how far the batch pads.
    """

    def __init__(self, n_in: int, hidden: int, blocks: int):
        super().__init__()
        self.inp = nn.Conv1d(n_in, hidden, 1)
        self.convs = nn.ModuleList(nn.Conv1d(hidden, hidden, 3, padding=2 ** i, dilation=2 ** i)
                                   for i in range(blocks))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, F) → (B, T, hidden)."""
        m = None if lengths is None else valid_mask(lengths, x.shape[1])[:, None, :].to(x.dtype)  # (B, 1, T)
        h = self.inp(x.transpose(1, 2))  # (B, hidden, T)
        for conv in self.convs:
            h = h + torch.relu(conv(h if m is None else h * m))
        return (h if m is None else h * m).transpose(1, 2)


class SeqHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.rnn == "conv":
            self.rnn = ConvEncoder(cfg.n_features, cfg.hidden, cfg.conv_blocks)
        else:
            rnn = nn.GRU if cfg.rnn == "gru" else nn.LSTM
            self.rnn = rnn(cfg.n_features, cfg.hidden, num_layers=cfg.layers, batch_first=True)
        fc_in = cfg.hidden * cfg.t if cfg.head == "mrnn" else cfg.hidden
        if cfg.head == "attn":
            self.score = nn.Sequential(nn.Linear(cfg.hidden, cfg.hidden), nn.Tanh(), nn.Linear(cfg.hidden, 1))
        self.fc1 = nn.Linear(fc_in, cfg.fc)
        self.fc2 = nn.Linear(cfg.fc, cfg.n_targets)
        self.drop = nn.Dropout(cfg.dropout)

    def encode(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x (B, T, F), lengths (B,) → outputs (B, T', d') with T' ≤ T; positions ≥ l are zero unless mask=False.

        With the mask, outputs at positions < l do not depend on anything at positions ≥ l (the recurrence is
        causal), so the encoder may stop at the batch's longest l (truncate) or skip each video's padding (pack).
        """
        cfg = self.cfg
        if cfg.rnn == "conv":
            if not cfg.mask:
                return self.rnn(x)
            if cfg.skip_padding != "none":  # packing has no meaning for a convolution: truncate instead
                x = x[:, : int(lengths.max())]
            return self.rnn(x, lengths)
        if not cfg.mask:
            return self.rnn(x)[0]
        if cfg.skip_padding == "pack":
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, _ = self.rnn(packed)
            return pad_packed_sequence(out, batch_first=True)[0]
        if cfg.skip_padding == "truncate":
            x = x[:, : int(lengths.max())]
        out = self.rnn(x)[0]
        return out * valid_mask(lengths, out.shape[1])[..., None]

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x (B, T, F) zero-padded, lengths (B,) true lengths → (B, n_targets)."""
        cfg = self.cfg
        lengths = lengths.clamp(1, x.shape[1])
        out = self.encode(x, lengths)  # (B, T', d')
        B, T = out.shape[:2]
        if cfg.head == "mrnn":
            # z'' (B, T'·d'): the Mask already zeroed positions ≥ l; columns past T'·d' would multiply zeros, so
            # the first FC only uses its first T'·d' columns (same result, less work).
            z = out.reshape(B, T * cfg.hidden)
            h = nn.functional.linear(self.drop(z), self.fc1.weight[:, : T * cfg.hidden], self.fc1.bias)
        else:
            if cfg.head == "last":
                pooled = out[torch.arange(B, device=out.device), lengths - 1]
            elif cfg.mask:
                m = valid_mask(lengths, T)  # (B, T)
                if cfg.head == "mean":
                    pooled = out.sum(1) / lengths[:, None].to(out.dtype)
                else:
                    s = self.score(out).squeeze(-1).masked_fill(~m, float("-inf"))  # (B, T)
                    pooled = (torch.softmax(s, dim=1)[..., None] * out).sum(1)
            else:
                if cfg.head == "mean":
                    pooled = out.mean(1)
                else:
                    pooled = (torch.softmax(self.score(out).squeeze(-1), dim=1)[..., None] * out).sum(1)
            h = self.fc1(self.drop(pooled))
        return self.fc2(self.drop(torch.relu(h)))

    def routed_columns(self, lengths: torch.Tensor) -> int | None:
        """Columns of fc1.weight the batch routes: positions < max l, i.e. the first max(l)·d' (mrnn + mask only).

        Positions ≥ max(l) are masked for every video of the batch; their weights must not move in this step.
        """
        if self.cfg.head != "mrnn" or not self.cfg.mask:
            return None
        return int(lengths.clamp(1, self.cfg.t).max()) * self.cfg.hidden
