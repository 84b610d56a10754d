"""Contextual sparsity: calibrated top-k masks, gather kernels, cross-layer prediction."""
