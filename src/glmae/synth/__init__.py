"""Built-in synthetic data (`glmae synth --kind KIND`): phantoms with labels, deterministic by seed.

Each kind is a module with `write_dataset(out_dir, cases, seed, shape, preview) -> Path`, listed in
`KINDS`. `abdomen` (the default): abdominal CT with the 13 BTCV organs; its names are re-exported
here. `brain`: 4-channel brain MRI (FLAIR, T1, T1ce, T2) with tumours, labelled as MSD Task01
(`glmae.synth.brain`). `cxr`: chest radiographs with 5 findings, labelled as ChestX-ray14
(`glmae.synth.cxr`).
"""

from glmae.synth import abdomen, brain, cxr
from glmae.synth.abdomen import DEFAULT_SHAPE, FOV_MM, ID, LABELS, generate_case, save_preview, write_dataset
from glmae.synth.common import case_seed

KINDS = {"abdomen": abdomen.write_dataset, "brain": brain.write_dataset, "cxr": cxr.write_dataset}

__all__ = ["DEFAULT_SHAPE", "FOV_MM", "ID", "KINDS", "LABELS", "case_seed", "generate_case", "save_preview",
           "write_dataset"]
