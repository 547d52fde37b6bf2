"""Evaluation precision: the one default every evaluation entry point shares, what ``auto`` resolves to, and
vlp's AMX detection.

``auto`` is bf16 on CUDA devices with bf16 support and fp32 on every CPU, so a CPU evaluation gives the same
numbers on every machine whatever its instruction set; bf16 on a CPU runs only when asked for (``bf16``).
AMX (Intel's matrix tiles, the only CPU feature that makes bf16 matmuls faster than fp32) is detected for
reports and benchmarks; ``VLP_ASSUME_AMX=0|1`` overrides the detection, so both answers can be tested on
any machine.

torch is imported inside the functions: the config schema reads the constants without loading torch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vlp.errors import UserError

if TYPE_CHECKING:
    import torch

__all__ = [
    "PRECISIONS", "DEFAULT_PRECISION", "ASSUME_AMX_ENV", "AutocastFactory", "detect_amx", "amx_available",
    "resolve_precision", "autocast_context",
]

PRECISIONS = ("auto", "fp32", "bf16")
DEFAULT_PRECISION = "auto"
ASSUME_AMX_ENV = "VLP_ASSUME_AMX"

AutocastFactory = Callable[[], contextlib.AbstractContextManager[Any]]


def detect_amx() -> bool:
    """Whether the CPU reports AMX tiles with bf16 support (torch's cpuinfo query), ignoring the override."""
    import torch

    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if not callable(capabilities):
        return False
    found = capabilities()
    return bool(found.get("amx_tile", False)) and bool(found.get("amx_bf16", False))


def amx_available() -> bool:
    """vlp's answer to "does this CPU have AMX": ``VLP_ASSUME_AMX`` when set (1 = yes, 0 = no), else
    ``detect_amx()``."""
    value = os.environ.get(ASSUME_AMX_ENV, "").strip()
    if not value:
        return detect_amx()
    if value not in ("0", "1"):
        raise UserError(f"{ASSUME_AMX_ENV}='{value}' is not 0 (no AMX) or 1 (AMX); unset it to detect")
    return value == "1"


def resolve_precision(precision: str, device: torch.device) -> str:
    """fp32 or bf16: ``auto`` is bf16 on a CUDA device with bf16 support and fp32 anywhere else."""
    import torch

    if precision not in PRECISIONS:
        raise UserError(f"eval.precision: '{precision}' is not one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast_context(precision: str, device: torch.device) -> AutocastFactory:
    """A factory of the autocast context for ``precision`` on ``device`` (fp32: none; bf16: bf16 autocast on
    the device type; auto: as ``resolve_precision``)."""
    import torch

    if resolve_precision(precision, device) == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
