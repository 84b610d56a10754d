"""Sparsity-aware self-distillation (teacher: the dense model; student: the same weights run
sparse with a straight-through mask; loss: forward KL)."""

from activeflow_jax.distill.train import DistillConfig, DistillResult, distill

__all__ = ["DistillConfig", "DistillResult", "distill"]
