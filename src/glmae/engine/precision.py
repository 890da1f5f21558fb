"""Mixed precision: the autocast dtype a run uses (`train.amp`) and the autocast context."""

from __future__ import annotations

import contextlib

import torch

from glmae.errors import InputError

AMP_SETTINGS = ("auto", "bf16", "fp16", "off")


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for `train.amp`. auto: bf16 on CUDA devices that support it (else fp16), and
    on CPUs with AMX tiles, where bf16 matrix products run several times faster than fp32."""
    if setting == "off":
        return None
    if setting == "bf16":
        return torch.bfloat16
    if setting == "fp16":
        if device.type != "cuda":
            raise InputError("train.amp=fp16 needs a CUDA device (use bf16 or off on CPU)")
        return torch.float16
    if setting != "auto":
        raise InputError(f"train.amp: expected {', '.join(AMP_SETTINGS)}, got {setting!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return torch.bfloat16 if device.type == "cpu" and amx else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast on `device` with `dtype`; nothing when dtype is None (full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
