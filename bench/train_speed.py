"""Training speed of the TopK SAE (``dictlearn.training.step.train_step``) on a fixed synthetic CPU workload.

Prints tokens/s with no dead latent (plain), with 10% and with half of the latents dead (AuxK over ``AUX_K`` of
them), the half-dead / plain step-time ratio, the machine's fp32 matmul rate, the lower bound for one step (the
dense encoder matmul, the only dense product left once the backward is sparse), and where a half-dead step's
time goes. The optimiser is the trainer's own ``adam()``. Plain figures, no asserts. Usage: ``.venv/bin/python bench/train_speed.py [--default-malloc]``.
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
from dictlearn.sae.base import StepContext  # noqa: E402
from dictlearn.sae.kernels import top_k_indices  # noqa: E402
from dictlearn.sae.losses import auxk_loss  # noqa: E402
from dictlearn.sae.topk import TopKObjective, TopKSAE  # noqa: E402
from dictlearn.training.step import GradientRule, train_step  # noqa: E402
from dictlearn.training.trainer import adam  # noqa: E402

THREADS = 2
D_IN, NUM_LATENTS, K, AUX_K = 512, 8192, 32, 256
BATCH_SIZE = 4096
DEAD_FRACTIONS = (0.10, 0.5)
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


def breakdown(sae, objective, optimizer, gradient_rule, batches, dead_mask_F) -> list[tuple[str, float, bool]]:
    """(phase, ms per step, whether it is part of the phase above) over BREAKDOWN_STEPS steps, timed with
    ``time.perf_counter``.

    The phases call the same functions in the same order as ``train_step`` under ``TopKObjective``. The
    encoder's matmul and top-k are re-run on their own after ``reconstruction`` so their share can be taken out
    of it; the backward is split by hooks on its sparse autograd nodes.
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
        ctx = StepContext(step, BREAKDOWN_STEPS, dead_mask_F)
        last = time.perf_counter()
        codes, x_hat_BD, fvu_loss, _ = objective.reconstruction(sae, x_BD, x_BD, ctx)
        mark("forward")
        with torch.no_grad():
            # The same product into the forward's own output (same values), so no allocation is timed here.
            torch.addmm(sae.b_enc, x_BD - sae.b_dec, sae.W_enc.T, out=codes.pre_acts)
        mark("matmul")
        top_k_indices(codes.pre_acts, K)
        mark("topk")
        aux_loss = auxk_loss(sae, x_BD, x_BD, x_hat_BD, codes.pre_acts, dead_mask_F, AUX_K)
        mark("auxk")
        loss = fvu_loss + AUX_COEF * aux_loss
        time_sparse_backward_nodes(loss, seconds)
        last = time.perf_counter()
        loss.backward()
        mark("backward")
        objective.before_optimizer_step(sae)
        mark("project")
        gradient_rule.apply_(sae.parameters())
        mark("rule")
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
        del codes, x_hat_BD, fvu_loss, aux_loss, loss

    ms = {name: s / BREAKDOWN_STEPS * 1e3 for name, s in seconds.items()}
    return [
        ("forward (encode, decode, fvu)", ms["forward"], False),
        ("of which encoder matmul (dense, no autograd)", ms["matmul"], True),
        ("of which top-k selection", ms["topk"], True),
        ("AuxK forward (dead top-k, gather, decode)", ms["auxk"], False),
        ("backward", ms["backward"], False),
        ("of which sparse decode nodes (top-k, AuxK)", ms["_SparseDecodeBackward"], True),
        ("of which sparse gather nodes (top-k, AuxK)", ms["_GatherPreActsBackward"], True),
        ("decoder-gradient projection", ms["project"], False),
        ("gradient rule (unit norm)", ms["rule"], False),
        ("gradient clipping", ms["clip"], False),
        ("optimizer (trainer's adam())", ms["adam"], False),
        ("zero_grad", ms["zero_grad"], False),
        ("decoder renorm", ms["renorm"], False),
        ("loss .item()", ms["item"], False),
    ]


def dead_mask(fraction: float) -> torch.Tensor:
    """bool (F,): ``fraction`` of the latents, drawn at random, marked dead."""
    dead_mask_F = torch.zeros(NUM_LATENTS, dtype=torch.bool)
    dead_mask_F[torch.randperm(NUM_LATENTS)[: int(fraction * NUM_LATENTS)]] = True
    return dead_mask_F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--default-malloc", action="store_true", help="skip keep_freed_memory()")
    parser.add_argument("--steps", type=int, default=TIMED_STEPS, help="timed steps per case")
    args = parser.parse_args()
    # Other processes on the machine take cores from both the steps and the matmul reference; report it.
    load_before = os.getloadavg()[0]
    if not args.default_malloc:
        keep_freed_memory()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)

    sae = TopKSAE(D_IN, NUM_LATENTS, K, seed=0)
    objective = TopKObjective(AUX_K, AUX_COEF)
    batches = [torch.randn(BATCH_SIZE, D_IN) for _ in range(4)]
    objective.initialize_(sae, batches[0][:1024], batches[0][:1024])
    optimizer = adam(sae, LR)
    gradient_rule = GradientRule()  # the trainer's default
    cases = {"plain (no dead latent)": dead_mask(0.0)}
    cases.update({f"{fraction:.0%} dead, AuxK over {AUX_K}": dead_mask(fraction) for fraction in DEAD_FRACTIONS})

    def step(i: int, dead_F: torch.Tensor) -> float:
        x_BD = batches[i % len(batches)]
        start = time.perf_counter()
        train_step(
            sae,
            objective,
            optimizer,
            x_BD,
            x_BD,
            StepContext(i, TIMED_STEPS, dead_F),
            max_grad_norm=MAX_GRAD_NORM,
            gradient_rule=gradient_rule,
        )
        return time.perf_counter() - start

    for i in range(WARMUP_STEPS):
        for dead_F in cases.values():
            step(i, dead_F)
    W_FD = torch.randn(NUM_LATENTS, D_IN)
    matmul_before = matmul_seconds(batches[0], W_FD)
    # The cases take turns step by step, so a change in the machine's load falls on all of them alike.
    seconds = {name: [] for name in cases}
    for i in range(args.steps):
        for name, dead_F in cases.items():
            seconds[name].append(step(i, dead_F))
    matmul_after = matmul_seconds(batches[0], W_FD)

    flop = 2 * BATCH_SIZE * D_IN * NUM_LATENTS
    matmul = (matmul_before + matmul_after) / 2
    print(
        f"workload: d_in {D_IN}, latents {NUM_LATENTS}, k {K}, aux_k {AUX_K}, batch {BATCH_SIZE}, fp32, "
        f"{torch.get_num_threads()} threads, {type(optimizer).__name__}(fused={optimizer.defaults.get('fused')}), "
        f"malloc {'default' if args.default_malloc else 'keep freed memory'}, "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, 1-min load average before start {load_before:.2f}"
    )
    print(f"training, {args.steps} steps per case, the cases interleaved:")
    median = {name: statistics.median(times) for name, times in seconds.items()}
    for name, times in seconds.items():
        mean = sum(times) / len(times)
        print(
            f"  {name:<30} {BATCH_SIZE / mean:>8,.0f} tokens/s  (mean {mean * 1e3:.1f} ms, "
            f"median {median[name] * 1e3:.1f} ms, min {min(times) * 1e3:.1f} ms)"
        )
    plain, half_dead = median["plain (no dead latent)"], median[f"50% dead, AuxK over {AUX_K}"]
    print(f"half dead / plain (median step): {half_dead / plain:.2f}x")
    print(
        f"fp32 matmul ({BATCH_SIZE}x{D_IN})@({D_IN}x{NUM_LATENTS}): {flop / matmul / 1e9:.1f} GFLOP/s "
        f"(before {flop / matmul_before / 1e9:.1f}, after {flop / matmul_after / 1e9:.1f})"
    )
    print(
        f"lower bound (dense encoder forward, {flop / 1e9:.1f} GFLOP): {matmul * 1e3:.1f} ms/step = "
        f"{BATCH_SIZE / matmul:,.0f} tokens/s; plain step / lower bound: {plain / matmul:.2f}"
    )

    rows = breakdown(sae, objective, optimizer, gradient_rule, batches, cases[f"50% dead, AuxK over {AUX_K}"])
    total = sum(ms for _, ms, part in rows if not part)
    print(f"breakdown of a half-dead step, ms per step over {BREAKDOWN_STEPS} steps:")
    for name, ms, part in rows:
        print(f"  {'  ' * part}{name:<{48 - 2 * part}} {ms:7.1f}  {100 * ms / total:5.1f}%")
    print(f"  {'sum':<48} {total:7.1f}  (timed median {half_dead * 1e3:.1f})")


if __name__ == "__main__":
    main()
