"""The model configuration, the names of heads, encoders and padding modes, and the progress record training
reports: importable without torch, so the command line can check its options before loading it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

HEADS = ("mrnn", "mean", "attn", "last")
RNNS = ("gru", "lstm", "conv")
SKIP_PADDING = ("truncate", "pack", "none")


@dataclass(frozen=True)
class ModelConfig:
    n_features: int  # F, per-frame values fed to the encoder
    n_targets: int  # outputs per video
    t: int  # padded length; the mrnn head's first FC has hidden·t inputs
    head: str = "mean"  # one of HEADS
    mask: bool = True  # False: no Mask (and so no routing), encoder runs over the padding
    rnn: str = "gru"  # encoder: gru | lstm | conv
    layers: int = 1  # stacked recurrent layers (gru, lstm)
    conv_blocks: int = 4  # conv: residual blocks, kernel 3, dilations 1, 2, 4, …
    hidden: int = 128  # d', recurrent units
    fc: int = 32  # d'', units of the first fully connected layer
    dropout: float = 0.0  # dropout before each FC (0 = none, as in the paper)
    skip_padding: str = "truncate"  # how the encoder avoids padding: truncate to the batch's longest l, pack, none

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"head {self.head!r}: use one of {HEADS}")
        if self.rnn not in RNNS:
            raise ValueError(f"rnn {self.rnn!r}: use one of {RNNS}")
        if self.skip_padding not in SKIP_PADDING:
            raise ValueError(f"skip_padding {self.skip_padding!r}: use one of {SKIP_PADDING}")
        if self.head == "last" and not self.mask:
            raise ValueError("head 'last' reads the state at position l; it needs the mask")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Progress:
    """What `train` reports to its `progress` callback: after every step, and once more when an epoch ends."""

    epoch: int  # 1-based
    epochs: int  # upper bound (early stopping may end sooner)
    step: int  # steps done in this epoch
    steps: int  # steps in this epoch
    seconds: float  # since the epoch started
    train_loss: float  # mean training loss over the steps done
    val_mean_pearson: float | None = None  # set when the epoch ended (validation done)
    best_epoch: int = 0  # best epoch so far (the one on disk), 0 before the first validation
    member: int = 0  # ensemble member being trained (1-based; 0 = a single run)
    members: int = 1  # ensemble size
