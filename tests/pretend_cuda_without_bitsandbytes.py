"""A pytest plugin (-p) for test_cuda_skips.py: torch reports a GPU, and bitsandbytes cannot be imported."""
import importlib.util
import sys

import torch

torch.cuda.is_available = lambda: True
sys.modules["bitsandbytes"] = None  # import raises ImportError
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: None if name == "bitsandbytes" else _find_spec(name, *a, **k)
