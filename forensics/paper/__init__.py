"""Reproduction helpers: the end-to-end demo and the paper's pathological generators."""
