"""Built-in synthetic data (`glmae synth`): phantoms with labels, deterministic by seed.

`abdomen` (the default): abdominal CT with the 13 BTCV organs. Its names are re-exported here.
"""

from glmae.synth.abdomen import DEFAULT_SHAPE, FOV_MM, ID, LABELS, generate_case, save_preview, write_dataset
from glmae.synth.common import case_seed

__all__ = ["DEFAULT_SHAPE", "FOV_MM", "ID", "LABELS", "case_seed", "generate_case", "save_preview", "write_dataset"]
