"""Mixed precision: which autocast dtype a ``train.amp`` setting means, and the fp16 gradient scaler.

``train.amp``:

* ``"off"``: float32 everywhere (the default; every CPU number in the README).
* ``"bf16"``: autocast to bfloat16. Its exponent range is float32's, so gradients do not
  underflow and no scaler is needed.
* ``"fp16"``: autocast to float16 with a ``torch.amp.GradScaler``: the loss is multiplied by a
  large scale before the backward so small gradients survive float16, the gradients are
  unscaled before the step, and a step whose gradients hold inf/NaN is skipped (and the scale
  halved). The loop counts those steps per epoch (``metrics.csv`` column ``skipped_steps``).
* ``"auto"``: bf16 on a CUDA GPU that supports it (Ampere and later), fp16 + GradScaler on an
  older CUDA GPU, off on CPU.

The scaler's state (scale, growth tracker) is saved in every checkpoint and restored on
resume, so a resumed fp16 run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import torch

__all__ = ["autocast_dtype", "make_scaler", "uses_scaler"]


def autocast_dtype(amp: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``; None means no autocast (float32)."""
    device = torch.device(device)
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    raise ValueError(f"amp {amp!r} is not supported; allowed: off, auto, bf16, fp16")


def uses_scaler(amp: str, device: torch.device | str) -> bool:
    """True when ``amp`` autocasts to float16 on ``device``: then training needs a GradScaler."""
    return autocast_dtype(amp, device) == torch.float16


def make_scaler(amp: str, device: torch.device | str):
    """A ``torch.amp.GradScaler`` for float16 autocast on ``device``, else None (bf16 and off)."""
    device = torch.device(device)
    if not uses_scaler(amp, device):
        return None
    return torch.amp.GradScaler(device.type)
