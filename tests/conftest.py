"""Test session settings: tiny presets, no hub access, few threads (the CI machine has 2 cores)."""
import os

os.environ["FLASHLIB_SMOKE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
