"""Pre-training methods. Importing this package registers their configs.

Each method is an `nn.Module` built as `Method(encoder_cfg, method_cfg)` with `sampler()` (a pure
`(volume, rng) -> sample` function run in DataLoader workers), `forward(batch) -> (loss, logs)`,
optional `after_step(step, total)` and `figure(batch, path)`, and an `encoder` to export.
"""

from glmae.methods.mae3d import MAE3D, MAE3DConfig

PRETRAINING = {"mae3d": MAE3D}

__all__ = ["PRETRAINING", "MAE3D", "MAE3DConfig"]
