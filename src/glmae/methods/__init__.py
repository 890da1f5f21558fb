"""Pre-training and fine-tuning methods. Importing this package registers their configs.

Each method is an `nn.Module` built as `Method(encoder_cfg, method_cfg)` with `sampler()` (a pure
`(volume, rng) -> sample` function run in DataLoader workers), `forward(batch) -> (loss, logs)`,
optional `after_step(step, total, applied)` (see `glmae.engine.trainer`) and `figure(batch, path)`,
and an `export_encoder` whose weights become `encoder.safetensors`.
"""

from glmae.methods.classification import Classifier, ClassifierConfig
from glmae.methods.glmae import GLMAE, GLMAEConfig
from glmae.methods.gmim import GMIM, GMIMConfig
from glmae.methods.mae3d import MAE3D, MAE3DConfig
from glmae.methods.segmentation import Segmenter

PRETRAINING = {"mae3d": MAE3D, "glmae": GLMAE, "gmim": GMIM}
# Fine-tuning: method name -> training module (its network is chosen by segmentation.NETWORKS)
SEGMENTATION = {"unetr": Segmenter, "swin_unetr": Segmenter}
CLASSIFICATION = {"classifier": Classifier}  # multi-label findings of radiographs
FINETUNING = {**SEGMENTATION, **CLASSIFICATION}

__all__ = ["CLASSIFICATION", "FINETUNING", "PRETRAINING", "SEGMENTATION", "Classifier", "ClassifierConfig", "GLMAE",
           "GLMAEConfig", "GMIM", "GMIMConfig", "MAE3D", "MAE3DConfig"]
