"""LoRA (Hu et al. 2021) for linear layers: y = W x + b + (alpha / r) * B (A x), with W and b frozen.

``LoRALinear`` subclasses ``nn.Linear`` and keeps ``weight``/``bias`` as its own parameters, so a wrapped
layer has the same state-dict keys as before plus ``lora_a`` [r, in] and ``lora_b`` [out, r]:

- a plain (non-LoRA) checkpoint loads into a LoRA model with ``strict=True``: the missing ``lora_a``/``lora_b``
  keys are accepted and the adapters keep their current values (``B = 0``: the plain model's outputs);
- after ``merge_lora`` the model is plain again (``W <- W + (alpha/r) B A``) and saves plain keys.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from vlp.errors import ConfigError

__all__ = ["LoRALinear", "apply_lora", "merge_lora"]


class LoRALinear(nn.Linear):
    """A frozen linear layer plus a trainable low-rank update; ``lora_b`` starts at zero (identical outputs)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        if rank < 1:
            raise ConfigError(f"train.lora_rank: must be >= 1, got {rank}")
        nn.Module.__init__(self)  # adopt the base parameters instead of allocating new ones
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.base_requires_grad = base.weight.requires_grad
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank = rank
        self.scaling = (alpha if alpha is not None else rank) / rank
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))
        # A as a regular linear init, B zero: the product is zero at init but gradients reach B at once.
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.register_load_state_dict_pre_hook(_keep_missing_adapters)

    def forward(self, x: Tensor) -> Tensor:
        update = nn.functional.linear(nn.functional.linear(x, self.lora_a), self.lora_b)
        return super().forward(x) + self.scaling * update

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (the update folded into the weight)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight + self.scaling * (self.lora_b @ self.lora_a))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.weight.requires_grad_(self.base_requires_grad)
        if linear.bias is not None:
            linear.bias.requires_grad_(self.base_requires_grad)
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


def _keep_missing_adapters(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    # A plain checkpoint has no adapter keys: load the adapters' current values so strict loading passes.
    for name in ("lora_a", "lora_b"):
        state_dict.setdefault(prefix + name, getattr(module, name).detach())


def apply_lora(module: nn.Module, rank: int, alpha: float | None = None,
               targets: tuple[type[nn.Module], ...] = (nn.Linear,)) -> int:
    """Replace every linear layer inside ``module`` whose exact type is in ``targets`` by a ``LoRALinear``.

    Exact type, not ``isinstance``: subclasses such as ``nn.MultiheadAttention``'s ``out_proj`` are read through
    their ``weight`` by their parent and would silently bypass the adapter. ``alpha`` defaults to ``rank``
    (scaling 1). Other parameters of ``module`` are left as they are (freeze them separately if wanted).
    Returns the number of layers wrapped.
    """
    for target in targets:
        if not issubclass(target, nn.Linear):
            raise TypeError(f"apply_lora targets must be nn.Linear types, got {target.__name__}")
    if rank < 1:
        raise ConfigError(f"train.lora_rank: must be >= 1, got {rank}")
    replacements = [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if type(child) in targets
    ]
    for parent, name, child in replacements:
        setattr(parent, name, LoRALinear(child, rank, alpha))  # type: ignore[arg-type]
    return len(replacements)


def merge_lora(module: nn.Module) -> int:
    """Fold every ``LoRALinear`` inside ``module`` back into a plain ``nn.Linear``; returns the count merged."""
    replacements = [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if isinstance(child, LoRALinear)
    ]
    for parent, name, child in replacements:
        setattr(parent, name, child.merged())
    return len(replacements)
