"""TopK recipe variants trained on the activation store, compared by held-out FVU.

Each variant trains the default TopK SAE through the trainer (``Trainer.fit``) on the same rows in the same
order: the store's last ``--held-out`` rows are kept for the held-out FVU, the rest are served in a seeded
permutation (a new one per pass). The settings are the issue's side-by-side measurement against
dictionary_learning (4,608 latents, k 32, 208 steps of 4,096 rows, lr 3.77e-4, 2% warm-up, linear decay over
the last 20%); only the gradient rule differs between variants. Plain figures, no asserts.
Usage: ``.venv/bin/python bench/recipe.py [--steps 208] [--variants clip_1,unit]``.
"""

import os

# Must precede the first import of torch (see bench/train_speed.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dictlearn.activations.store import ActivationStore  # noqa: E402
from dictlearn.cli import keep_freed_memory  # noqa: E402
from dictlearn.evaluation.metrics import ReconstructionMetrics  # noqa: E402
from dictlearn.params import Params  # noqa: E402
from dictlearn.sae.registry import build_objective, build_sae  # noqa: E402
from dictlearn.training.trainer import Trainer  # noqa: E402

STORE = "data/activations/smollm2-135m/blocks.6.hook_resid_post"
NUM_LATENTS, K, BATCH_SIZE, LR = 4608, 32, 4096, 3.77e-4

# name -> (train.grad_normalization, train.max_grad_norm)
VARIANTS = {
    "clip_1": ("none", 1.0),  # the default before this bench: never acts on an FVU-scaled gradient
    "clip_1e-3": ("none", 1e-3),  # acts on every step (the ablation)
    "unit": ("unit", 1.0),
    "running": ("running", 1.0),
}


class FixedOrderBatches:
    """The trainer's buffer interface over rows held in memory, served in a seeded permutation per pass, so
    every variant (and a peer library given the same seed) sees the same batches in the same order."""

    def __init__(self, rows_ND: torch.Tensor, batch_size: int, seed: int = 0) -> None:
        self.rows_ND = rows_ND
        self.batch_size = batch_size
        self.seed = seed
        self.served = 0
        self._order = torch.empty(0, dtype=torch.long)

    def order(self, passes: int) -> torch.Tensor:
        """Row indices for ``passes`` passes over the rows (pass p in the permutation seeded ``seed + p``)."""
        n = len(self.rows_ND)
        return torch.cat(
            [torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + p)) for p in range(passes)]
        )

    def _rows(self, start: int, count: int) -> torch.Tensor:
        passes = -(-(start + count) // len(self.rows_ND))
        if len(self._order) < passes * len(self.rows_ND):
            self._order = self.order(passes)
        return self.rows_ND[self._order[start : start + count]]

    def next_batch(self) -> torch.Tensor:
        batch = self._rows(self.served, self.batch_size)
        self.served += self.batch_size
        return batch

    def peek(self, rows: int) -> torch.Tensor:
        return self._rows(self.served, rows)

    def state_dict(self) -> dict:
        return {"served": self.served}


def held_out_fvu(sae, rows_ND: torch.Tensor) -> float:
    metrics = ReconstructionMetrics(sae.num_latents)
    with torch.no_grad():
        for x_BD in rows_ND.split(BATCH_SIZE):
            out = sae(x_BD)
            metrics.update(x_BD, out.x_hat, out.codes.values, out.codes.indices)
    return metrics.result()["fvu"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=STORE)
    parser.add_argument("--steps", type=int, default=208)
    parser.add_argument("--held-out", type=int, default=40_000, help="the store's last rows, kept for the FVU")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; expected one of {', '.join(VARIANTS)}")
    keep_freed_memory()
    torch.set_num_threads(args.threads)

    rows_ND = torch.cat([chunk.acts for chunk in ActivationStore(args.store).iter_chunks()])
    train_ND, held_out_ND = rows_ND[: -args.held_out], rows_ND[-args.held_out :]
    print(
        f"store {args.store}: {len(train_ND):,} training rows, {len(held_out_ND):,} held out; {args.steps} steps of "
        f"{BATCH_SIZE} ({args.steps * BATCH_SIZE / len(train_ND):.2f} passes), {NUM_LATENTS} latents, k {K}, lr {LR}"
    )
    results = []
    for name in variants:
        normalization, max_grad_norm = VARIANTS[name]
        params = Params().with_overrides(
            sae={"num_latents": NUM_LATENTS, "k": K},
            buffer={"batch_size": BATCH_SIZE},
            train={
                "tokens": args.steps * BATCH_SIZE,
                "lr": LR,
                "grad_normalization": normalization,
                "max_grad_norm": max_grad_norm,
                "checkpoint_every": args.steps + 1,
                "log_every": max(1, args.steps // 8),
            },
        )
        torch.manual_seed(params.train.seed)
        sae = build_sae(params.sae, d_in=train_ND.shape[1], d_out=None, num_latents=NUM_LATENTS)
        objective = build_objective(params.sae, sae, args.steps)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            trainer = Trainer(sae, objective, FixedOrderBatches(train_ND, BATCH_SIZE), params, Path(folder), LR)
            trainer.initialize()
            trainer.fit()
        fvu = held_out_fvu(sae, held_out_ND)
        last = trainer.metrics[-1]
        results.append((name, fvu, last["fvu"], last["dead_fraction"], time.perf_counter() - start))
        print(f"  {name}: held-out FVU {fvu:.4f} (last step {last['fvu']:.4f})", flush=True)
    print(f"{'variant':<12} {'held-out FVU':>12} {'last-step FVU':>13} {'dead':>6} {'seconds':>8}")
    for name, fvu, last_fvu, dead, seconds in results:
        print(f"{name:<12} {fvu:>12.4f} {last_fvu:>13.4f} {dead:>6.1%} {seconds:>8.0f}")


if __name__ == "__main__":
    main()
