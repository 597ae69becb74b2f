"""The training loop: learning-rate schedule, dead-latent counters, checkpoints and exact resume.

One step (forward, losses, projected gradient, clipping, Adam, decoder renormalisation) is ``sae_step`` in
``dictlearn.training.step``; this module owns what happens between steps. A checkpoint holds the weights, the optimizer,
the dead-latent counters, the buffer (contents, order, generator, source position) and the metrics, so a run
killed at any moment and resumed ends with the same weights as one never stopped (on the CPU, same seed).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dictlearn.activations.buffer import ShuffledBuffer
from dictlearn.errors import UserError
from dictlearn.files import atomic_write, torch_save
from dictlearn.params import Params
from dictlearn.sae.topk import TopKSAE
from dictlearn.training.step import sae_step

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"


def default_lr(num_latents: int) -> float:
    """2e-4 / sqrt(num_latents / 2**14): Gao et al. 2024 (section 2.3) scale the learning rate as 1/sqrt(n);
    dictionary_learning's TopK trainer and sparsify use this form."""
    return 2e-4 / math.sqrt(num_latents / 2**14)


def default_dead_tokens(train_tokens: int) -> int:
    """Gao et al. call a latent dead after 10M tokens without firing; a short run scales that down to a tenth
    of its length, so it can still find (and revive) dead latents."""
    return max(1, min(10_000_000, train_tokens // 10))


def default_aux_k(d_in: int) -> int:
    """Gao et al. 2024, A.2: k_aux = d_model / 2."""
    return max(1, d_in // 2)


@dataclass(frozen=True)
class Schedule:
    """Linear warm-up, constant, then linear decay to zero from ``decay_start`` (Gao et al. decay over the
    last 20%; dictionary_learning's TopK trainer uses the same shape)."""

    total_steps: int
    warmup_steps: int
    decay_start: int

    @classmethod
    def from_params(cls, params: Params, total_steps: int) -> Schedule:
        warmup = int(params.train.warmup_fraction * total_steps)
        return cls(total_steps, warmup, max(warmup, int(params.train.decay_start_fraction * total_steps)))

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if step >= self.decay_start:
            return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.decay_start))
        return 1.0


class DeadLatentTracker:
    """Tokens since each latent last fired; the trainer owns it and hands the dead mask to the loss."""

    def __init__(self, num_latents: int, dead_tokens: int):
        self.tokens_since_fired_F = torch.zeros(num_latents, dtype=torch.long)
        self.dead_tokens = dead_tokens

    def update(self, top_indices_BK: torch.Tensor, top_acts_BK: torch.Tensor) -> None:
        self.tokens_since_fired_F += len(top_indices_BK)
        fired = top_indices_BK[top_acts_BK > 0].cpu()
        self.tokens_since_fired_F[fired] = 0

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired_F >= self.dead_tokens

    def state_dict(self) -> dict:
        return {"tokens_since_fired": self.tokens_since_fired_F.clone(), "dead_tokens": self.dead_tokens}

    def load_state_dict(self, state: dict) -> None:
        self.tokens_since_fired_F.copy_(state["tokens_since_fired"])


def _changed_fields(before: dict, after: dict, prefix: str = "") -> list[str]:
    """'section.key: old -> new' for every field that differs between two params dumps."""
    changed = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += _changed_fields(old, new, f"{prefix}{key}.")
        elif old != new:
            changed.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return changed


class Trainer:
    """Trains ``sae`` on batches from ``buffer`` and writes checkpoints and metrics into ``folder``."""

    def __init__(self, sae: TopKSAE, buffer: ShuffledBuffer, params: Params, folder: Path, lr: float):
        self.sae = sae
        self.buffer = buffer
        self.params = params
        self.folder = Path(folder)
        self.total_steps = max(1, params.train.tokens // params.buffer.batch_size)
        self.schedule = Schedule.from_params(params, self.total_steps)
        self.lr = lr
        self.aux_k = params.sae.aux_k or default_aux_k(sae.d_in)
        self.tracker = DeadLatentTracker(
            sae.num_latents, params.sae.dead_tokens or default_dead_tokens(params.train.tokens)
        )
        # Adam with Gao et al.'s epsilon (6.25e-10); betas are PyTorch's defaults, as in sparsify.
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=lr, eps=6.25e-10)
        self.step = 0
        self.tokens = 0
        self.metrics: list[dict] = []
        self.last_checkpoint_step: int | None = None

    @property
    def checkpoint_path(self) -> Path:
        return self.folder / CHECKPOINT_FILE

    def save_checkpoint(self) -> None:
        torch_save(
            self.checkpoint_path,
            {
                "step": self.step,
                "tokens": self.tokens,
                "sae": self.sae.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "tracker": self.tracker.state_dict(),
                "buffer": self.buffer.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "metrics": self.metrics,
                "params": self.params.model_dump(mode="json"),
            },
        )
        self.last_checkpoint_step = self.step

    def load_checkpoint(self) -> None:
        if not self.checkpoint_path.is_file():
            raise UserError(f"--resume: no checkpoint at {self.checkpoint_path}; start the run without --resume")
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        changed = _changed_fields(state["params"], self.params.model_dump(mode="json"))
        if changed:
            raise UserError(
                f"--resume: params changed since the checkpoint ({'; '.join(changed[:3])}); "
                "resume with the params the run started with, or start over without --resume"
            )
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.tracker.load_state_dict(state["tracker"])
        self.buffer.load_state_dict(state["buffer"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.tokens, self.metrics = state["step"], state["tokens"], state["metrics"]
        self.last_checkpoint_step = self.step

    def _write_metrics(self) -> None:
        """Rewrite metrics.jsonl from the records held (at the start of a run, or from a checkpoint's)."""
        lines = "".join(json.dumps(m) + "\n" for m in self.metrics)
        atomic_write(self.folder / METRICS_FILE, lambda temp: temp.write_text(lines))

    def _append_metrics(self, record: dict) -> None:
        """One line per record, so logging costs the same at step 10 and step 100,000; a line cut short by a
        kill is dropped when ``fit`` rewrites the file from the checkpoint's records."""
        self.metrics.append(record)
        with (self.folder / METRICS_FILE).open("a") as lines:
            lines.write(json.dumps(record) + "\n")

    def fit(self, on_step: Callable[[Trainer, dict], None] = lambda trainer, record: None) -> None:
        """Run until ``train.tokens`` or the end of the data; checkpoints every ``checkpoint_every`` steps."""
        train = self.params.train
        self._write_metrics()  # fresh, or the records up to the checkpoint being resumed
        while self.step < self.total_steps:
            x_BD = self.buffer.next_batch()
            if x_BD is None:
                break
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr * self.schedule.factor(self.step)
            dead_F = self.tracker.dead_mask()
            out = sae_step(
                self.sae,
                self.optimizer,
                x_BD.to(self.sae.W_dec.device, self.sae.W_dec.dtype),
                dead_F.to(self.sae.W_dec.device),
                aux_k=self.aux_k,
                aux_coef=self.params.sae.aux_coef,
                max_grad_norm=train.max_grad_norm,
            )
            if not math.isfinite(out.loss):
                kept = (
                    f"the last good checkpoint (step {self.last_checkpoint_step}) is {self.checkpoint_path}"
                    if self.last_checkpoint_step is not None
                    else "no checkpoint was written yet"
                )
                raise UserError(
                    f"training diverged: loss is {out.loss} at step {self.step}; {kept}; "
                    "lower train.lr or check the activations for inf/nan"
                )
            self.tracker.update(out.top_indices_BK, out.top_acts_BK)
            self.step += 1
            self.tokens += len(x_BD)
            record = {
                "step": self.step,
                "tokens": self.tokens,
                "loss": out.loss,
                "fvu": out.fvu,
                "auxk_loss": out.auxk_loss,
                "l0": float((out.top_acts_BK > 0).sum(-1).float().mean()),
                "dead_fraction": float(dead_F.float().mean()),
                "lr": self.optimizer.param_groups[0]["lr"],
            }
            if self.step % train.log_every == 0 or self.step == self.total_steps:
                self._append_metrics(record)
            if self.step % train.checkpoint_every == 0:
                self.save_checkpoint()
            on_step(self, record)
