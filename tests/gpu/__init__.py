"""Checks that need CUDA: run on a GPU machine by ``make gpu-check`` (benchmarks/gpu_check.py)."""
