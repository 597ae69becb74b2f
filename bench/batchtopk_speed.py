"""Step time of BatchTopK (and Matryoshka) against TopK on bench/train_speed.py's synthetic CPU workload.

The architectures' steps alternate, so a neighbour's load on the shared machine slows all of them alike;
prints the median step times and their ratios. Plain figures, no asserts.
Usage: ``.venv/bin/python bench/batchtopk_speed.py``.
"""

import os

# Before torch's first import (see bench/train_speed.py): idle OpenMP workers sleep instead of spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dictlearn.sae.base import StepContext  # noqa: E402
from dictlearn.sae.batchtopk import BatchTopKObjective, BatchTopKSAE  # noqa: E402
from dictlearn.sae.matryoshka import MatryoshkaObjective, MatryoshkaSAE, group_sizes_from_fractions  # noqa: E402
from dictlearn.sae.registry import DEFAULT_GROUP_FRACTIONS  # noqa: E402
from dictlearn.sae.topk import TopKObjective, TopKSAE  # noqa: E402
from dictlearn.training.step import train_step  # noqa: E402

THREADS = 2
D_IN, NUM_LATENTS, K, AUX_K = 512, 8192, 32, 256
BATCH_SIZE = 4096
DEAD_FRACTION = 0.10
WARMUP_STEPS, TIMED_ROUNDS = 3, 15
AUX_COEF, MAX_GRAD_NORM, LR = 1 / 32, 1.0, 1e-4


def main() -> None:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    batches = [torch.randn(BATCH_SIZE, D_IN) for _ in range(4)]
    dead_mask_F = torch.zeros(NUM_LATENTS, dtype=torch.bool)
    dead_mask_F[torch.randperm(NUM_LATENTS)[: int(DEAD_FRACTION * NUM_LATENTS)]] = True
    batch_kwargs = {"aux_k": AUX_K, "aux_coef": AUX_COEF, "threshold_beta": 0.999, "threshold_start_step": 0}
    group_sizes = group_sizes_from_fractions(NUM_LATENTS, DEFAULT_GROUP_FRACTIONS)
    runs = {
        "topk": (TopKSAE(D_IN, NUM_LATENTS, K, seed=0), TopKObjective(AUX_K, AUX_COEF)),
        "batchtopk": (BatchTopKSAE(D_IN, NUM_LATENTS, K, seed=0), BatchTopKObjective(**batch_kwargs)),
        "matryoshka": (
            MatryoshkaSAE(D_IN, NUM_LATENTS, K, group_sizes, seed=0),
            MatryoshkaObjective([1 / len(group_sizes)] * len(group_sizes), **batch_kwargs),
        ),
    }
    optimizers = {}
    for name, (sae, objective) in runs.items():
        objective.initialize_(sae, batches[0][:1024], batches[0][:1024])
        optimizers[name] = torch.optim.Adam(sae.parameters(), lr=LR, fused=True)

    seconds: dict[str, list[float]] = {name: [] for name in runs}
    max_counts: list[int] = []
    for round_ in range(WARMUP_STEPS + TIMED_ROUNDS):
        for name, (sae, objective) in runs.items():
            x_BD = batches[round_ % len(batches)]
            ctx = StepContext(round_, WARMUP_STEPS + TIMED_ROUNDS, dead_mask_F)
            start = time.perf_counter()
            out = train_step(sae, objective, optimizers[name], x_BD, x_BD, ctx, max_grad_norm=MAX_GRAD_NORM)
            elapsed = time.perf_counter() - start
            if round_ >= WARMUP_STEPS:
                seconds[name].append(elapsed)
                if name == "batchtopk":
                    max_counts.append(out.codes.values.shape[1])

    print(
        f"workload: d_in {D_IN}, latents {NUM_LATENTS}, k {K}, aux_k {AUX_K}, {int(dead_mask_F.sum())} dead, "
        f"batch {BATCH_SIZE}, fp32, {torch.get_num_threads()} threads, 1-min load average {os.getloadavg()[0]:.2f}"
    )
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    for name, median in medians.items():
        print(f"{name:>10}: median {median * 1e3:7.1f} ms/step, min {min(seconds[name]) * 1e3:7.1f} ms")
    print(f"batchtopk / topk: {medians['batchtopk'] / medians['topk']:.2f} (median of {TIMED_ROUNDS} steps)")
    print(f"matryoshka / topk: {medians['matryoshka'] / medians['topk']:.2f}")
    print(
        f"batchtopk codes returned as {statistics.median(max_counts)} (median) per row, zero-padded to the batch's "
        f"largest count (k = {K}); the kernels work on the k·B selected entries alone"
    )


if __name__ == "__main__":
    main()
