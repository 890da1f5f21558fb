"""`glmae import`: a published encoder's weights as an `encoder.safetensors` (+ `encoder.json`) that
`glmae finetune --init` loads like one of ours.

Formats (`glmae.models.foreign` has each layout and what is adapted): `glmae-paper` (GL-MAE's
ViT-B/16 release), `selfmedmae` (SelfMedMAE's MAE3D checkpoints), `monai-swinvit` (MONAI's Swin-UNETR
self-supervised `model_swinvit.pt`), `monai-vit` (`monai.networks.nets.ViT`, `UNETR.vit`, the
tutorial's `ViTAutoEnc`; also what `glmae export --format monai-vit` writes).

The file is unpickled with `weights_only=True`, allowing besides tensors and plain values only an
argparse Namespace and numpy scalars, which published training scripts store beside the weights; a
file holding anything else is refused and never executed. What cannot be read from the weights
comes from options: `--heads` (a ViT's attention heads), `--img-size` (the input size the weights
were trained at, when the tokens are not a cube or a perceptron hides the patch size), `--roi` (a
fine-tuning ROI whose token grid a learned position table is resampled to; by default it keeps its
own grid, and inputs of other grids are resampled as they come). For `monai-vit`, the
constructor arguments that `glmae export` writes beside its file (FILE minus suffix + .json) give
`num_heads` and `img_size` when the options do not.

The report (stdout) lists the loaded, adapted, dropped, missing and unexpected keys and the
`glmae finetune` options that fit the encoder. `--strict`: any missing or unexpected key is an error
(exit 2) and nothing is written.
"""

from __future__ import annotations

import json
from pathlib import Path

from glmae import config as cfglib
from glmae.engine import checkpoint
from glmae.engine.run import architecture_differences
from glmae.errors import InputError
from glmae.models import foreign

FORMATS = foreign.FORMATS


def _sidecar(path: Path) -> dict:
    """The MONAI constructor arguments written beside a monai-vit file, if there are any."""
    args = path.with_suffix(".json")
    if args == path or not args.is_file():
        return {}
    try:
        data = json.loads(args.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"unreadable constructor arguments ({err})", args) from None
    return data if isinstance(data, dict) else {}


def _value(v) -> str:
    """A config value as `--set` reads it."""
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    return "null" if v is None else str(v)


def finetune_hint(encoder) -> str:
    """`--config NAME [--set encoder.k=v ...]`: the packaged fine-tuning config whose encoder is
    nearest, with the overrides that make it this one. Configs for as many input channels come
    first: their data settings (modality, normalisation) are for the images the encoder saw."""
    ours, best = cfglib.to_dict(encoder), None
    for name in cfglib.available():
        cfg = cfglib.load_config(name)
        if cfg.task == "finetune" and cfg.encoder.arch == encoder.arch:
            fields = architecture_differences(cfglib.to_dict(cfg.encoder), ours)
            rank = ("in_channels" in fields, len(fields))
            if best is None or rank < best[0]:
                best = rank, name, fields
    return " ".join([f"--config {best[1]}", *(f"--set encoder.{k}={_value(ours[k])}" for k in best[2])])


def import_weights(format: str, source: Path, out: Path, heads: int | None = None, img_size=None, roi=None,
                   strict: bool = False) -> Path:
    """Convert `source` (a file in `format`) into our encoder at `out` (.safetensors, + .json)."""
    if format not in FORMATS:
        raise InputError(f"--format: expected one of {', '.join(FORMATS)}, got {format!r}")
    source, out = Path(source), Path(out)
    if out.suffix != ".safetensors":
        raise InputError("--out: expected a .safetensors file (its encoder.json is written beside it)", out)
    contents = checkpoint.read(source, checkpoint.foreign_safe_globals())
    if format == "monai-vit":
        args = _sidecar(source)
        heads = heads if heads is not None else args.get("num_heads")
        img_size = img_size if img_size is not None else args.get("img_size")
    if isinstance(img_size, int):
        img_size = (img_size,) * 3
    try:
        state, where = foreign.state_dict_of(contents)
        imported = foreign.convert(format, state, heads=heads, img_size=img_size, roi=roi)
    except foreign.NotConvertible as err:
        raise InputError(f"--format {format}: {err}", source) from None

    enc, report = imported.encoder, imported.report
    arch = ", ".join(f"{k} {v}" for k, v in cfglib.to_dict(enc).items() if k not in ("arch", "drop_path"))
    print(f"import {format}: {source} ({len(state)} tensors in {where})")
    print(f"  encoder: {enc.arch}, {arch}")
    for note in imported.notes:
        print(f"  {note}")
    print("\n".join(foreign.summary(report)))
    if strict and (report.missing or report.unexpected):
        raise InputError(f"--strict: {len(report.missing)} missing and {len(report.unexpected)} unexpected keys "
                         f"({', '.join((report.missing + report.unexpected)[:3])}); nothing written", source)
    if not imported.weights:
        raise InputError(f"--format {format}: none of its tensors belongs to the encoder", source)

    meta = {"format": checkpoint.ENCODER_FORMAT, "encoder": cfglib.to_dict(enc), "method": f"{format} (imported)",
            "steps": None, "imported": {"format": format, "file": str(source.resolve()), "from": where}}
    checkpoint.save_encoder(imported.weights, meta, out)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    print(f"fine-tune: glmae finetune {finetune_hint(enc)} --init {out} --data DATA --out RUN")
    return out
