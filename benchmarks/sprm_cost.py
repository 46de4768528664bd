"""SPRM against self-attention: forward + backward time per batch, one thread, d 64, the same tokens per batch.

    .venv/bin/python benchmarks/sprm_cost.py            # T = 64 .. 4096, writes the `sprm_cost` key of
                                                         # benchmarks/results/nextevent.json
    .venv/bin/python benchmarks/sprm_cost.py --quick    # T = 64, 256 only, prints, writes nothing

For each sequence length T, a batch of 8,192 / T sequences (so every T sees 8,192 tokens) through the
model's own `CausalSelfAttention` and `SPRM` modules (default kernels (3,1), (3,2), (3,4), 64 prototypes),
forward + backward of the summed output; median of `--repeats` timed runs after 2 warm-up runs, both
modules timed alternately in one process (these machines are noisy: the ratio is the figure to quote).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from pantherseq.model.base import ModelConfig
from pantherseq.model.layers import CausalSelfAttention
from pantherseq.model.sprm import SPRM

RESULTS = Path(__file__).resolve().parent / "results" / "nextevent.json"
TOKENS = 8192


def time_fwd_bwd(module: torch.nn.Module, x: torch.Tensor) -> float:
    x = x.detach().requires_grad_(True)
    t0 = time.perf_counter()
    module(x).sum().backward()
    return (time.perf_counter() - t0) * 1e3


def measure(T: int, repeats: int) -> dict[str, float]:
    cfg = ModelConfig(d_model=64, n_heads=2, max_len=T, dropout=0.0)
    torch.manual_seed(0)
    att, sprm = CausalSelfAttention(cfg), SPRM(cfg)
    x = torch.randn(max(TOKENS // T, 1), T, cfg.d_model)
    times: dict[str, list[float]] = {"attention_ms": [], "sprm_ms": []}
    for i in range(repeats + 2):
        for name, m in (("attention_ms", att), ("sprm_ms", sprm)):
            ms = time_fwd_bwd(m, x)
            if i >= 2:
                times[name].append(ms)
    out = {k: round(statistics.median(v), 2) for k, v in times.items()}
    out["ratio"] = round(out["sprm_ms"] / out["attention_ms"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    lengths = (64, 256) if args.quick else (64, 128, 256, 512, 1024, 2048, 4096)
    rows = {}
    print(f"{'T':>6} {'attention ms':>13} {'SPRM ms':>9} {'SPRM/attn':>10}")
    for T in lengths:
        rows[str(T)] = r = measure(T, args.repeats)
        print(f"{T:>6} {r['attention_ms']:>13.2f} {r['sprm_ms']:>9.2f} {r['ratio']:>10.3f}", flush=True)
    if not args.quick:
        data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        data["sprm_cost"] = {"tokens_per_batch": TOKENS, "d_model": 64, "threads": 1, "repeats": args.repeats,
                             "command": "python benchmarks/sprm_cost.py", **rows}
        RESULTS.write_text(json.dumps(data, indent=1))
        print(f"-> {RESULTS} (sprm_cost)")


if __name__ == "__main__":
    main()
