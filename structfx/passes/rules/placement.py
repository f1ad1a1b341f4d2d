"""The dtype and device a replacement is built in: the model's own, where the layer it replaces computes.

Closed forms and fits run in float32 (float64 for a float64 model), since CPU SVD and Adam do not take
half precision, and the result is cast to the model's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from structfx.errors import StructfxError
from structfx.passes.sites import Site, dense_parameters

#: The floating dtypes every structfx layer computes in (forward, fake kernel and backward).
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def site_placement(site: Site) -> tuple[torch.dtype, torch.device]:
    """(dtype, device) of the site: its weight's for a dense layer, else the recorded input's.

    Raises StructfxError for a dtype structfx layers do not compute in.
    """
    if site.kind == "dense":
        weight, _ = dense_parameters(site.module)
        dtype, device = weight.dtype, weight.device
    elif site.samples:
        dtype, device = site.samples[0].dtype, site.samples[0].device
    else:
        dtype, device = torch.get_default_dtype(), torch.device("cpu")
    if dtype not in SUPPORTED_DTYPES:
        supported = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise StructfxError(
            f"{site.place} computes in {str(dtype).removeprefix('torch.')}, which structfx layers do not support "
            f"({supported}): convert the model (e.g. model.float()) or keep this layer with filter_fn"
        )
    return dtype, device


def fitting_dtype(dtype: torch.dtype) -> torch.dtype:
    """What closed forms and fits compute in for a model in ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def placed(module: nn.Module, site: Site) -> nn.Module:
    """``module`` with its floating parameters and buffers in the site's dtype, on its device."""
    dtype, device = site_placement(site)
    return module.to(device=device, dtype=dtype)
