"""What every fine-tuning method shares (segmentation, classification): `glmae finetune`'s options
in the config, and a training module around a network with a pretrained `encoder`.

The network exposes `encoder` (the part `--init` loads, frozen in linear mode), `num_layers` and
`layer_of(name)` (layer-wise learning-rate decay: 0 the patch embedding, i + 1 block i,
`num_layers` everything above the blocks).

`freeze_encoder_steps` N (end to end): a frozen warm-up, the encoder kept as initialised for the
first N steps while the rest of the network trains, then everything trained together (LP-FT,
Kumar et al. 2022: a randomly initialised head trained against the encoder from the first step
distorts pre-trained features). The encoder's parameter groups get lr 0 until step N
(`glmae.engine.optim.set_lr`): no host sync, and under DDP every parameter still gets its gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from glmae.config import MethodConfig, OptimConfig
from glmae.engine.optim import param_groups

MODES = ("linear", "e2e")


@dataclass
class FinetuneConfig(MethodConfig):
    # `glmae finetune`'s options, which override them when given, so that the run describes itself:
    mode: str = "e2e"  # --mode: linear (encoder frozen) | e2e
    init: str = "none"  # --init
    # --init-channels: how an --init encoder of other in_channels is adapted (glmae.models.patches.adapt_in_channels)
    init_channels: str = "average"
    label_fraction: float = 1.0  # --label-fraction
    split_seed: int = 0  # --split-seed
    freeze_encoder_steps: int = 0  # e2e: the encoder stays as initialised for this many first steps


class FineTuner(nn.Module):
    """`net` + a loss. In linear mode the encoder is frozen: no gradients, no optimiser state, and
    kept in eval mode (no drop-path) even when the engine calls `train()`."""

    def __init__(self, net: nn.Module, cfg: FinetuneConfig):
        super().__init__()
        if cfg.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
        self.cfg = cfg
        self.net = net
        self.frozen = cfg.mode == "linear"
        if self.frozen:
            self.net.encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> FineTuner:
        super().train(mode)
        if self.frozen:
            self.net.encoder.eval()
        return self

    def param_groups(self, optim: OptimConfig) -> list[dict]:
        """Trainable parameters with weight decay, layer-wise lr decay (`optim.layer_decay`) and the
        encoder's frozen warm-up (`freeze_encoder_steps`)."""
        encoder = {id(p) for p in self.net.encoder.parameters()}
        frozen = {name for name, p in self.named_parameters() if id(p) in encoder}
        return param_groups(
            self, optim.weight_decay, optim.layer_decay,
            lambda name: self.net.layer_of(name.removeprefix("net.")), self.net.num_layers,
            lambda name: self.cfg.freeze_encoder_steps if name in frozen else 0,
        )
