"""The paper's numbers, one constant each, with the table or figure it comes from.

Source: Alizadeh et al., *LLM in a flash*, arXiv 2312.11514 v3 (ACL 2024), transcribed in
``shared/reference/paper-facts.md``. Notebooks print these beside our measurements; nothing
here is used as a result of ours.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Geometry:
    """Shape of a decoder-only transformer's FFN stack (section 3.12 of paper-facts, public configs)."""

    name: str
    n_layers: int
    d_model: int
    d_ffn: int
    bytes_per_param: int  # 2 = fp16, the paper's Table 2 setting


# Public model configs, consistent with the paper's 32 KiB fp32 bundle and 28 + 4 layers.
OPT67B = Geometry("OPT 6.7B", n_layers=32, d_model=4096, d_ffn=16384, bytes_per_param=2)

# --- model composition (App. C.1 DRAM budget) --------------------------------------------
OPT67B_SIZE_GB = 13.4            # Table 2 row 1: fp16 model bytes read by the naive baseline
FFN_SHARE_OPT67B = 0.6462        # App. C.1: FFN share of OPT 6.7B's parameters
EMBEDDING_SHARE_OPT67B = 0.03    # App. C.1
ATTENTION_SHARE_OPT67B = 0.323   # App. C.1
PREDICTOR_SHARE_OPT67B = 0.0125  # App. C.1 (B.3 says < 2.4%; see paper-facts §5)
DRAM_BUDGET_FRACTION = 0.5       # sec 5: about half of the model fits in DRAM

# --- sparsity (Table 6, Fig 9a) ---------------------------------------------------------
TABLE6_ACTIVE_PCT = {1: 1.56, 16: 2.66, 32: 5.36}   # OPT 6.7B, % of FFN neurons active, by layer
TABLE6_MEAN_ACTIVE_PCT = 3.30
OPT67B_SPARSITY = 0.97            # sec 5: ~97% of FFN neurons are zero per token

# --- predictor (sec 3.1, App. B) ------------------------------------------------------
PREDICTOR_FN_RATE = 0.05          # App. C.1: 5% false negatives
PREDICTOR_FP_RATE = 0.07          # App. C.1: 7% false positives
PREDICTED_OVER_ACTIVE = 3.0       # App. B.1: predictor marks ~3x the truly active neurons (OPT)
PREDICTED_SHARE_PER_TOKEN = 0.10  # App. C.1: ~10% of the FFN loaded per token without window
PREDICTOR_RANK_OPT67B = {"other": 128, "sensitive": 1024, "n_sensitive": 4}  # Table 4
PREDICTOR_THRESHOLD = 0.5         # Table 4
TABLE1_ZERO_SHOT = {              # Table 1: OPT 6.7B accuracy without / with predictor
    "Arc Easy": (66.1, 66.2),
    "Arc Challenge": (30.6, 30.6),
    "HellaSwag": (50.3, 49.8),
}

# --- windowing (sec 3.1, Fig 4, App. C.1) ----------------------------------------------
WINDOW_K_OPT = 5                  # Fig 4b caption (v3 appendix text says k = 4, "past 5 tokens")
WINDOW_CACHE_SHARE_OF_FFN = 0.24  # App. C.1: cached FFN = 24% of the FFN
NEW_SHARE_PER_TOKEN = 0.024       # App. C.1: 2.4% of the FFN loaded per token with the window

# --- bundling and flash (sec 2.2, 3.2, Fig 2b) ------------------------------------------
SEQUENTIAL_READ_GBPS = 6.1        # sec 2.2 / Table 2: M1 Max, 1 GiB sequential read of an uncached file
SPARSE_READ_GBPS = 1.25           # Table 2: scattered reads, unbundled
BUNDLED_READ_GBPS = 2.25          # Table 2: scattered reads, bundled
READ_THREADS = 32                 # sec 3.3 / App: parallel reads over 32 threads
USEFUL_CHUNK_KIB = 32             # sec 2.2: >= 32 KiB random reads with several threads
CLOSEST_FRIEND_COACTIVATION = 0.95  # Fig 12b: a neuron's closest friend fires with it >= 95%
THIRD_FRIEND_COACTIVATION = 0.86    # Fig 12c

# --- Table 2: I/O latency ablation, OPT 6.7B fp16, M1 Max, half the model in DRAM -------------
# columns: hybrid, predictor, windowing, bundling, dram_gb, flash_to_dram_gb, throughput_gbps, io_ms
TABLE2_ROWS = (
    (False, False, False, False, 0.0, 13.4, 6.10, 2196),
    (True, False, False, False, 6.7, 6.7, 6.10, 1090),
    (True, True, False, False, 4.8, 0.9, 1.25, 738),
    (True, True, True, False, 6.5, 0.2, 1.25, 164),
    (True, True, True, True, 6.5, 0.2, 2.25, 87),
)
TABLE2_COLUMNS = ("hybrid", "predictor", "windowing", "bundling", "dram_gb",
                  "flash_to_dram_gb", "throughput_gbps", "io_ms")

# --- Table 3: per-token latency (ms), about half the model in DRAM -----------------------
# (model, method, backend, io_ms, mem_ms, compute_ms, total_ms)
TABLE3_ROWS = (
    ("OPT 6.7B", "Naive", "CPU", 2196, 0, 986, 3182),
    ("OPT 6.7B", "All", "CPU", 105, 58, 506, 669),
    ("OPT 6.7B", "Naive", "Metal M1", 2196, 0, 193, 2389),
    ("OPT 6.7B", "All", "Metal M1", 92, 35, 438, 565),
    ("OPT 6.7B", "Naive", "Metal M2", 2145, 0, 125, 2270),
    ("OPT 6.7B", "All", "Metal M2", 26, 8, 271, 305),
    ("OPT 6.7B", "Naive", "GPU (RTX 4090)", 2196, 0, 22, 2218),
    ("OPT 6.7B", "All", "GPU (RTX 4090)", 30, 34, 20, 84),
    ("OPT 6.7B", "Speculative", "GPU (RTX 4090)", 38.5, 9.5, 12, 60),
    ("Falcon 7B", "Naive", "CPU", 2295, 0, 800, 3095),
    ("Falcon 7B", "Hybrid", "CPU", 1147, 0, 800, 1947),
    ("Falcon 7B", "All", "CPU", 161, 92, 453, 706),
    ("Persimmon 8B", "Naive", "CPU", 2622, 0, 1184, 3806),
    ("Persimmon 8B", "Hybrid", "CPU", 1311, 0, 1184, 2495),
    ("Persimmon 8B", "All", "CPU", 283, 98, 660, 1041),
    ("Phi-2 2.7B", "Naive", "CPU", 885, 0, 402, 1287),
    ("Phi-2 2.7B", "Hybrid", "CPU", 309, 0, 402, 711),
    ("Phi-2 2.7B", "All", "CPU", 211, 76, 259, 546),
    ("Llama 2 7B", "Naive", "CPU", 2166, 0, 929, 3095),
    ("Llama 2 7B", "Hybrid", "CPU", 974, 0, 929, 1903),
    ("Llama 2 7B", "All", "CPU", 279, 152, 563, 994),
)
TABLE3_COLUMNS = ("model", "method", "backend", "io_ms", "mem_ms", "compute_ms", "total_ms")

# Headline ratios (abstract; Table 3 arithmetic): naive total / all total.
CPU_SPEEDUP_OPT = 3182 / 669      # 4.76x
GPU_SPEEDUP_OPT = 2218 / 84       # 26.4x
MEM_MANAGEMENT_SHARE_CPU = 58 / 669   # 8.7% of per-token latency (Table 3, OPT CPU)
GENERATION_TOKENS = 256           # sec 5: 256 new tokens after a 128-token prompt
PROMPT_TOKENS = 128
LONG_GENERATION_TOKENS = 1000     # Fig 8
