"""Objectives: they own the training step (forward, backward, momentum and queue updates)."""

from vlp.objectives.base import Objective
from vlp.objectives.pretrain import PretrainObjective
from vlp.objectives.vqa import VQAObjective

__all__ = ["Objective", "PretrainObjective", "VQAObjective"]
