"""The contrastive logit scale (and SigLIP's bias): parameters a model owns, as open_clip's models do.

The losses (``vlp.losses.contrastive_loss``, ``siglip_loss``) are functions of the embeddings and of these
values; a model exposes them as ``logit_scale()`` and ``logit_bias()``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vlp.errors import UserError

__all__ = ["LogitScale"]


def check_temperature(temperature: float, temperature_min: float, temperature_max: float) -> None:
    if not 0 < temperature_min <= temperature <= temperature_max:
        raise UserError(
            f"temperature {temperature} must satisfy 0 < temperature_min ({temperature_min})"
            f" <= temperature <= temperature_max ({temperature_max})"
        )


class LogitScale(nn.Module):
    """A log logit scale (= -log temperature) kept within [1/temperature_max, 1/temperature_min], and with
    ``bias`` given, a scalar logit bias (SigLIP). State-dict keys: ``log_scale`` and ``bias``."""

    log_scale: Tensor
    bias: Tensor | None

    def __init__(self, temperature: float = 0.07, temperature_min: float = 0.01, temperature_max: float = 100.0,
                 learnable: bool = True, bias: float | None = None) -> None:
        super().__init__()
        check_temperature(temperature, temperature_min, temperature_max)
        self.min_log_scale = -math.log(temperature_max)
        self.max_log_scale = -math.log(temperature_min)
        self._add("log_scale", -math.log(temperature), learnable)
        if bias is None:
            self.bias = None
        else:
            self._add("bias", bias, learnable)

    def _add(self, name: str, value: float, learnable: bool) -> None:
        tensor = torch.tensor(float(value))
        if learnable:
            self.register_parameter(name, nn.Parameter(tensor))
        else:
            self.register_buffer(name, tensor)

    def logit_scale(self) -> Tensor:
        """exp of the clamped log scale, i.e. 1/temperature.

        The stored value itself is clamped (as open_clip does after each optimizer step and ALBEF
        at the start of forward), so an optimizer that overshoots the bound still gets gradients and
        can move back. Only ``exp`` reads the parameter and it saves its output, not its input, so
        this in-place clamp is safe even when called several times before one backward.
        """
        with torch.no_grad():
            self.log_scale.clamp_(self.min_log_scale, self.max_log_scale)
        return self.log_scale.float().exp()

    def logit_bias(self) -> Tensor | None:
        """The bias added to every scaled similarity (fp32), or None when there is none (softmax ITC)."""
        return None if self.bias is None else self.bias.float()
