"""Tensor math: scores, the exact selection, the optional C kernels, and the per-tensor
operations of prune, diff (task-vector encoding), merge and score. See docs/design.md."""
