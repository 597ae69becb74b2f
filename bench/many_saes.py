"""Many SAEs from one pass, on the embedded default: tokens/s of harvesting L hooks in one forward (the
forward stops after the deepest hook) against L separate harvests of one hook each (what L separate training
runs pay), on the same windows and batches; and training tokens/s of one process against 2 gloo processes
(data-parallel, one thread each) on a synthetic TopK workload of the embedded model's width.

    python bench/many_saes.py [--params params.json] [--hooks 'blocks.{2,4,6,8}.hook_resid_post'] [--tokens 16384]
                              [--part all|harvest|data-parallel] [--steps 20]

Goals: the harvest part of L SAEs costs one forward, not L (ratio near L); 2 processes on 2 free cores train
near 2x the tokens/s of one single-threaded process (the gradient all-reduce is one flat tensor a step).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from dictlearn.activations.harvest import LiveActivations  # noqa: E402
from dictlearn.cli import prepare_hooks  # noqa: E402
from dictlearn.lm.models import resolve_hooks  # noqa: E402
from dictlearn.lm.text import first_windows, training_windows  # noqa: E402
from dictlearn.report.common import print_table  # noqa: E402
from dictlearn.sae.base import StepContext  # noqa: E402
from dictlearn.sae.topk import TopKObjective, TopKSAE  # noqa: E402
from dictlearn.training.distributed import Distributed  # noqa: E402
from dictlearn.training.step import GradientRule, train_step  # noqa: E402
from dictlearn.training.trainer import adam  # noqa: E402

# The data-parallel workload: SmolLM2-135M's width, 8x latents, Gao et al.'s k 32, a 4,096-row global batch.
D_IN, NUM_LATENTS, K, BATCH, WARMUP_STEPS = 576, 4608, 32, 4096, 3


def harvest_seconds(lm, hooks, windows, model_batch_size: int) -> tuple[float, int]:
    """Seconds to harvest every chunk at ``hooks`` (one forward per batch), and the rows per hook."""
    source = LiveActivations(lm, hooks, windows, model_batch_size)
    start, rows = time.perf_counter(), 0
    for chunk_set in source.iter_chunk_sets():
        rows += len(next(iter(chunk_set.values())).acts)
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, rows


def train_seconds(distributed: Distributed, steps: int) -> float:
    """Seconds for ``steps`` TopK training steps on this rank's share of a synthetic global batch (after
    ``WARMUP_STEPS``), the slowest rank's."""
    rows = BATCH // distributed.world_size
    sae = TopKSAE(D_IN, NUM_LATENTS, K, seed=0)
    objective, optimizer = TopKObjective(aux_k=256, aux_coef=1 / 32), adam(sae, 1e-4)
    generator = torch.Generator().manual_seed(distributed.rank)
    dead_F = torch.zeros(NUM_LATENTS, dtype=torch.bool)
    for step in range(WARMUP_STEPS + steps):
        if step == WARMUP_STEPS:
            distributed.wait_for_all()
            start = time.perf_counter()
        x_BD = torch.randn(rows, D_IN, generator=generator)
        ctx = StepContext(step, WARMUP_STEPS + steps, dead_F, distributed)
        train_step(sae, objective, optimizer, x_BD, x_BD, ctx, max_grad_norm=1.0, gradient_rule=GradientRule(),
                   distributed=distributed)  # fmt: skip
    distributed.wait_for_all()
    return time.perf_counter() - start


def _rank(rank: int, world_size: int, port: int, steps: int, result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    distributed = Distributed.from_env("cpu")
    seconds = train_seconds(distributed, steps)
    if distributed.is_first:
        Path(result).write_text(str(seconds))
    distributed.close()


def gloo_seconds(world_size: int, steps: int) -> float:
    with socket.socket() as sock, tempfile.TemporaryDirectory() as folder:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        result = str(Path(folder) / "seconds")
        mp.spawn(_rank, args=(world_size, port, steps, result), nprocs=world_size)
        return float(Path(result).read_text())


def data_parallel(steps: int) -> None:
    """Training tokens/s: one process (1 thread, then 2) against 2 gloo processes of 1 thread each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    one_thread = train_seconds(Distributed(), steps)
    torch.set_num_threads(2)
    two_threads = train_seconds(Distributed(), steps)
    torch.set_num_threads(threads)
    two_processes = gloo_seconds(2, steps)
    tokens = steps * BATCH
    rows = [
        ["1 process, 1 thread", f"{one_thread:.1f}", f"{tokens / one_thread:,.0f}"],
        ["1 process, 2 threads", f"{two_threads:.1f}", f"{tokens / two_threads:,.0f}"],
        ["2 gloo processes, 1 thread each", f"{two_processes:.1f}", f"{tokens / two_processes:,.0f}"],
    ]
    print(
        f"TopK d_in {D_IN}, {NUM_LATENTS} latents, k {K}, global batch {BATCH}, {steps} steps; "
        f"CPU cores seen: {os.cpu_count()}"
    )
    print_table(rows, headers=["training", "seconds", "tokens/s"])
    print(
        f"2 processes / 1 process (1 thread): {one_thread / two_processes:.2f}x; "
        f"against 1 process with 2 threads: {two_threads / two_processes:.2f}x (goal: near 2x on 2 free cores)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.json")
    parser.add_argument("--hooks", default="blocks.{2,4,6,8}.hook_resid_post")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--part", choices=["all", "harvest", "data-parallel"], default="all")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps for the data-parallel part")
    args = parser.parse_args()
    if args.part != "harvest":
        data_parallel(args.steps)
    if args.part == "data-parallel":
        return
    params, lm, _ = prepare_hooks(args.params)
    hooks = resolve_hooks(lm.config, args.hooks)
    windows = lambda: first_windows(training_windows(params.data, lm.tokenizer), params.data, args.tokens)  # noqa: E731
    batch = params.buffer.model_batch_size
    harvest_seconds(lm, hooks[:1], lambda: first_windows(windows(), params.data, batch * 16), batch)  # warm-up
    together, rows = harvest_seconds(lm, hooks, windows, batch)
    apart = [harvest_seconds(lm, [hook], windows, batch)[0] for hook in hooks]
    rows_table = [
        [f"{len(hooks)} hooks, one pass", rows, f"{together:.1f}", f"{rows / together:,.0f}"],
        [f"{len(hooks)} separate passes", rows, f"{sum(apart):.1f}", f"{rows / sum(apart):,.0f}"],
        *[[f"  {hook.name} alone", rows, f"{s:.1f}", f"{rows / s:,.0f}"] for hook, s in zip(hooks, apart)],
    ]
    print(f"device: {lm.device}, torch threads: {torch.get_num_threads()}, model batch {batch}")
    print_table(rows_table, headers=["harvest", "tokens per hook", "seconds", "tokens/s (per hook)"])
    print(
        f"one pass / separate passes: {sum(apart) / together:.2f}x faster (goal: near {len(hooks)}x for equal depths)"
    )


if __name__ == "__main__":
    main()
