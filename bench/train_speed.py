"""Training speed of the TopK SAE (``dictlearn.step.sae_step``) on a fixed synthetic CPU workload.

Prints tokens/s, the machine's fp32 matmul rate, the lower bound for one step (the dense encoder matmul, the
only dense product left once the backward is sparse), the ratio of the two, and where a step's time goes.
Plain figures, no asserts. Usage: ``.venv/bin/python bench/train_speed.py [--default-malloc]``.
"""

import os

# Must precede the first import of torch (OpenMP reads it once). Idle OpenMP workers sleep instead of
# spinning: when this 2-vCPU VM gets less than two cores from its host, spinning workers stall every small
# parallel op for a scheduler tick (measured 8 ms for an 8192 x 512 norm that takes 0.5 ms otherwise).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

# Run as a file from anywhere: the package sits one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dictlearn.cli import keep_freed_memory  # noqa: E402
from dictlearn.sae.losses import auxk_loss, fvu  # noqa: E402
from dictlearn.sae.topk import TopKSAE, top_k_indices  # noqa: E402
from dictlearn.training.step import sae_step  # noqa: E402

THREADS = 2
D_IN, NUM_LATENTS, K, AUX_K = 512, 8192, 32, 256
BATCH_SIZE = 4096
DEAD_FRACTION = 0.10
WARMUP_STEPS, TIMED_STEPS, BREAKDOWN_STEPS = 3, 20, 5
AUX_COEF, MAX_GRAD_NORM, LR = 1 / 32, 1.0, 1e-4


def matmul_seconds(x_BD: torch.Tensor, W_FD: torch.Tensor, repeats: int = 5) -> float:
    """Median seconds of the encoder-shaped fp32 matmul (B, D) @ (D, F) into a preallocated output."""
    out_BF = torch.empty(x_BD.shape[0], W_FD.shape[0])
    torch.mm(x_BD, W_FD.T, out=out_BF)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(x_BD, W_FD.T, out=out_BF)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


SPARSE_BACKWARD_NODES = ("_SparseDecodeBackward", "_GatherPreActsBackward")


def time_sparse_backward_nodes(loss: torch.Tensor, seconds: dict[str, float]) -> None:
    """Hook every sparse decode and gather node of ``loss``'s graph so that the coming backward adds each
    node's wall time into ``seconds[node name]`` (CPU autograd runs one node at a time)."""
    started: dict[torch.autograd.graph.Node, float] = {}

    def before(node):
        return lambda grad_outputs: started.__setitem__(node, time.perf_counter())

    def after(node):
        def hook(grad_inputs, grad_outputs):
            seconds[node.name()] = seconds.get(node.name(), 0.0) + time.perf_counter() - started[node]

        return hook

    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
        if node.name() in SPARSE_BACKWARD_NODES:
            node.register_prehook(before(node))
            node.register_hook(after(node))


def breakdown(sae, optimizer, batches, dead_mask_F) -> list[tuple[str, float, bool]]:
    """(phase, ms per step, whether it is part of the phase above) over BREAKDOWN_STEPS steps, timed with
    ``time.perf_counter``.

    The phases call the same functions in the same order as ``sae_step``. The encoder's matmul and top-k are
    re-run on their own after ``encode`` so their share can be taken out of it; the backward is split by
    hooks on its sparse autograd nodes.
    """
    seconds: dict[str, float] = {}
    last = time.perf_counter()

    def mark(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        seconds[name] = seconds.get(name, 0.0) + now - last
        last = now

    for step in range(BREAKDOWN_STEPS):
        x_BD = batches[step % len(batches)]
        last = time.perf_counter()
        top_acts_BK, top_indices_BK, pre_acts_BF = sae.encode(x_BD)
        mark("encode")
        with torch.no_grad():
            # The same product into encode's own output (same values), so no allocation is timed here.
            torch.addmm(sae.b_enc, x_BD - sae.b_dec, sae.W_enc.T, out=pre_acts_BF)
        mark("matmul")
        top_k_indices(pre_acts_BF, K)
        mark("topk")
        x_hat_BD = sae.decode(top_acts_BK, top_indices_BK)
        mark("decode")
        fvu_loss = fvu(x_BD, x_hat_BD)
        mark("fvu")
        aux_loss = auxk_loss(sae, x_BD, x_hat_BD, pre_acts_BF, dead_mask_F, AUX_K)
        mark("auxk")
        loss = fvu_loss + AUX_COEF * aux_loss
        time_sparse_backward_nodes(loss, seconds)
        last = time.perf_counter()
        loss.backward()
        mark("backward")
        sae.remove_gradient_parallel_to_decoder_directions_()
        mark("project")
        torch.nn.utils.clip_grad_norm_(sae.parameters(), MAX_GRAD_NORM)
        mark("clip")
        optimizer.step()
        mark("adam")
        optimizer.zero_grad(set_to_none=True)
        mark("zero_grad")
        sae.set_decoder_norm_to_unit_norm_()
        mark("renorm")
        _ = (loss.item(), fvu_loss.item(), aux_loss.item())
        mark("item")
        del top_acts_BK, top_indices_BK, pre_acts_BF, x_hat_BD, fvu_loss, aux_loss, loss

    ms = {name: s / BREAKDOWN_STEPS * 1e3 for name, s in seconds.items()}
    return [
        ("encode", ms["encode"], False),
        ("of which encoder matmul (dense, no autograd)", ms["matmul"], True),
        ("of which top-k selection", ms["topk"], True),
        ("decode forward (embedding_bag)", ms["decode"], False),
        ("fvu forward", ms["fvu"], False),
        ("AuxK forward (dead top-k, gather, decode)", ms["auxk"], False),
        ("backward", ms["backward"], False),
        ("of which sparse decode nodes (top-k, AuxK)", ms["_SparseDecodeBackward"], True),
        ("of which sparse gather nodes (top-k, AuxK)", ms["_GatherPreActsBackward"], True),
        ("decoder-gradient projection", ms["project"], False),
        ("gradient clipping", ms["clip"], False),
        ("optimizer (Adam, fused)", ms["adam"], False),
        ("zero_grad", ms["zero_grad"], False),
        ("decoder renorm", ms["renorm"], False),
        ("loss .item()", ms["item"], False),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--default-malloc", action="store_true", help="skip keep_freed_memory()")
    args = parser.parse_args()
    # Other processes on the machine take cores from both the steps and the matmul reference; report it.
    load_before = os.getloadavg()[0]
    if not args.default_malloc:
        keep_freed_memory()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)

    sae = TopKSAE(D_IN, NUM_LATENTS, K, seed=0)
    batches = [torch.randn(BATCH_SIZE, D_IN) for _ in range(4)]
    sae.init_b_dec_(batches[0][:1024])
    optimizer = torch.optim.Adam(sae.parameters(), lr=LR, fused=True)
    dead_mask_F = torch.zeros(NUM_LATENTS, dtype=torch.bool)
    dead_mask_F[torch.randperm(NUM_LATENTS)[: int(DEAD_FRACTION * NUM_LATENTS)]] = True

    def step(i: int, dead_F: torch.Tensor = dead_mask_F) -> None:
        sae_step(
            sae,
            optimizer,
            batches[i % len(batches)],
            dead_F,
            aux_k=AUX_K,
            aux_coef=AUX_COEF,
            max_grad_norm=MAX_GRAD_NORM,
        )

    for i in range(WARMUP_STEPS):
        step(i)
    W_FD = torch.randn(NUM_LATENTS, D_IN)
    matmul_before = matmul_seconds(batches[0], W_FD)
    step_seconds = []
    for i in range(TIMED_STEPS):
        start = time.perf_counter()
        step(i)
        step_seconds.append(time.perf_counter() - start)
    matmul_after = matmul_seconds(batches[0], W_FD)
    # The same workload with no dead latent: AuxK has nothing to do, as for most of a healthy run (the
    # default run on the embedded model ends with 0 dead latents).
    none_dead_F = torch.zeros_like(dead_mask_F)
    quiet_seconds = []
    for i in range(TIMED_STEPS):
        start = time.perf_counter()
        step(i, none_dead_F)
        quiet_seconds.append(time.perf_counter() - start)

    flop = 2 * BATCH_SIZE * D_IN * NUM_LATENTS
    matmul = (matmul_before + matmul_after) / 2
    mean_step = sum(step_seconds) / len(step_seconds)
    print(
        f"workload: d_in {D_IN}, latents {NUM_LATENTS}, k {K}, aux_k {AUX_K}, "
        f"{dead_mask_F.sum().item()} dead, batch {BATCH_SIZE}, fp32, {torch.get_num_threads()} threads, "
        f"Adam(fused=True), malloc {'default' if args.default_malloc else 'keep freed memory'}, "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, 1-min load average before start {load_before:.2f}"
    )
    median_step = statistics.median(step_seconds)
    print(
        f"training: {BATCH_SIZE / mean_step:,.0f} tokens/s over {TIMED_STEPS} steps "
        f"({BATCH_SIZE / median_step:,.0f} at the median step)"
    )
    quiet_step = sum(quiet_seconds) / len(quiet_seconds)
    print(
        f"training with no dead latents (AuxK idle): {BATCH_SIZE / quiet_step:,.0f} tokens/s "
        f"({quiet_step * 1e3:.1f} ms/step)"
    )
    print(
        f"step time: mean {mean_step * 1e3:.1f} ms, median {median_step * 1e3:.1f} ms, "
        f"min {min(step_seconds) * 1e3:.1f} ms, max {max(step_seconds) * 1e3:.1f} ms"
    )
    print(
        f"fp32 matmul ({BATCH_SIZE}x{D_IN})@({D_IN}x{NUM_LATENTS}): {flop / matmul / 1e9:.1f} GFLOP/s "
        f"(before {flop / matmul_before / 1e9:.1f}, after {flop / matmul_after / 1e9:.1f})"
    )
    print(
        f"lower bound (dense encoder forward, {flop / 1e9:.1f} GFLOP): {matmul * 1e3:.1f} ms/step = "
        f"{BATCH_SIZE / matmul:,.0f} tokens/s"
    )
    print(f"measured / lower bound: {mean_step / matmul:.2f}")

    rows = breakdown(sae, optimizer, batches, dead_mask_F)
    total = sum(ms for _, ms, part in rows if not part)
    print(f"breakdown, ms per step over {BREAKDOWN_STEPS} steps:")
    for name, ms, part in rows:
        print(f"  {'  ' * part}{name:<{48 - 2 * part}} {ms:7.1f}  {100 * ms / total:5.1f}%")
    print(f"  {'sum':<48} {total:7.1f}  (timed sae_step mean {mean_step * 1e3:.1f})")


if __name__ == "__main__":
    main()
