"""Runnable recipes of torch_hf (also importable)."""
