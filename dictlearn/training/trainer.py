"""The training loop for any architecture: learning-rate schedule, dead-latent counters, input scaling,
scheduled events, checkpoints and exact resume.

One step (the objective's loss, backward, its gradient surgery, clipping, Adam, its constraints) is
``train_step`` in ``dictlearn.training.step``; this module owns what happens between steps. A checkpoint holds
the weights, the optimizer, the dead-latent counters, the input scale, the buffer (contents, order, generator,
source position) and the metrics, so a run killed at any moment and resumed ends with the same weights as one
never stopped (on the CPU, same seed and thread count).

Under ``torchrun`` (``Distributed``) every rank runs this loop on its share of each batch, in step: the
counters, loss terms and events are made equal across ranks, a checkpoint holds every rank's buffer and rank 0
alone writes files; a run resumes exactly with the same number of processes.
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
from dictlearn.files import atomic_write, read_torch, torch_save
from dictlearn.formats.run_folder import CHECKPOINT_FILE, METRICS_FILE
from dictlearn.params import Params
from dictlearn.sae.base import EventContext, Objective, SparseAutoencoder, SparseCodes, StepContext
from dictlearn.training.distributed import Distributed
from dictlearn.training.step import GradientRule, train_step


def default_dead_tokens(train_tokens: int) -> int:
    """Gao et al. call a latent dead after 10M tokens without firing; a short run scales that down to a tenth
    of its length, so it can still find (and revive) dead latents."""
    return max(1, min(10_000_000, train_tokens // 10))


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
    """Tokens since each latent last fired; the trainer owns it and hands the dead mask to the loss. Under several
    ranks the counts are global: a latent fired when it fired on any rank, and a step counts every rank's rows,
    so every rank holds the same counters and takes the same resampling decisions."""

    def __init__(self, num_latents: int, dead_tokens: int, distributed: Distributed | None = None):
        self.tokens_since_fired_F = torch.zeros(num_latents, dtype=torch.long)
        self.dead_tokens = dead_tokens
        self.distributed = distributed or Distributed()

    def update(self, codes: SparseCodes) -> None:
        ranks = self.distributed
        self.tokens_since_fired_F += len(codes.indices) * ranks.world_size  # the ranks' batches are equal
        fired = codes.indices[codes.values > 0]
        if ranks.world_size > 1:
            fired_F = torch.zeros(len(self.tokens_since_fired_F), dtype=torch.uint8, device=fired.device)
            fired = ranks.max(fired_F.index_fill_(0, fired, 1)).nonzero().squeeze(1)
        self.tokens_since_fired_F[fired.cpu()] = 0

    def revive(self, latents: torch.Tensor | None) -> None:
        """Start the count again for latents a scheduled event just re-initialised (resampling)."""
        if latents is not None:
            self.tokens_since_fired_F[latents.cpu()] = 0

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired_F >= self.dead_tokens

    def state_dict(self) -> dict:
        return {"tokens_since_fired": self.tokens_since_fired_F.clone(), "dead_tokens": self.dead_tokens}

    def load_state_dict(self, state: dict) -> None:
        self.tokens_since_fired_F.copy_(state["tokens_since_fired"])


def check_world_size(checkpoint: Path, saved: int, running: int) -> None:
    """A checkpoint holds one buffer per rank: it resumes with the number of processes that wrote it."""
    if saved != running:
        raise UserError(
            f"--resume: {checkpoint} was written by {saved} process(es) and this run has {running}; resume with "
            f"torchrun --nproc_per_node {saved}" + (" (or without torchrun)" if saved == 1 else "")
        )


# Params that may differ on --resume: a diverged run resumes from its last good checkpoint with a lower
# learning rate; logging and checkpoint intervals do not change what is computed.
RESUMABLE_CHANGES = {
    "train.lr",
    "train.grad_normalization",
    "train.max_grad_norm",
    "train.checkpoint_every",
    "train.log_every",
    # How processes share the work; a checkpoint's world size is checked on its own (``check_world_size``).
    "train.distribute",
}

# A step is blown up when its FVU is above this (10x worse than predicting the mean, FVU 1) and also this many
# times the run's best FVU so far; this many such steps in a row, with the FVU not even halving over them, is a
# run that has left the basin, not a noisy batch. The second condition keeps a run that merely starts high (a
# transcoder whose unit-norm decoder overshoots a small target) from being stopped while its FVU falls; lr 1000
# sends it from ~1 to ~1e14. The third keeps a run that is recovering from a deliberate jolt: Bricken et al.'s
# resampling gives each new latent a zero bias, so it fires on about half the inputs. On SmolLM2-135M (16x, L1 2)
# 1,174 latents resampled at once sent the FVU from 0.13 to 25, back under 10 three steps later and under 1 after
# 15; with the raw inputs' directions (``ReLUSAE.resample_latents_``) 404 latents sent it to 305, and it fell
# 8-fold over the next 8 steps, which the rule without the third condition stopped as a divergence.
DIVERGED_FVU = 10.0
DIVERGED_STEPS = 10


def left_the_basin(blown_up_fvus: list[float]) -> bool:
    """Whether the FVUs of the current run of blown-up steps (see ``DIVERGED_FVU``) mean divergence: at least
    ``DIVERGED_STEPS`` of them, and the last not below half the one ``DIVERGED_STEPS - 1`` steps before it."""
    if len(blown_up_fvus) < DIVERGED_STEPS:
        return False
    return not blown_up_fvus[-1] < blown_up_fvus[-DIVERGED_STEPS] / 2  # a non-finite FVU has not halved


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


def adam(sae: SparseAutoencoder, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Adam:
    """Adam with Gao et al.'s epsilon (6.25e-10) and the objective's betas (PyTorch's defaults unless its recipe
    says otherwise); the fused kernel where this torch has it for the parameters' device (one pass over all
    parameters: about 4 ms against 13 ms a step on the speed bench), the same update as the loop implementation."""
    try:
        return torch.optim.Adam(sae.parameters(), lr=lr, betas=betas, eps=6.25e-10, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(sae.parameters(), lr=lr, betas=betas, eps=6.25e-10)


class Trainer:
    """Trains ``sae`` under ``objective`` on batches from ``buffer`` and writes checkpoints and metrics into
    ``folder``. A transcoder's buffer rows are ``[input | target]`` (widths ``sae.d_in`` and ``sae.d_out``)."""

    def __init__(
        self,
        sae: SparseAutoencoder,
        objective: Objective,
        buffer: ShuffledBuffer,
        params: Params,
        folder: Path,
        lr: float,
        *,
        paired: bool = False,
        distributed: Distributed | None = None,
    ):
        self.sae = sae
        self.distributed = distributed or Distributed()
        self.objective = objective
        self.buffer = buffer
        self.params = params
        self.folder = Path(folder)
        self.paired = paired
        self.total_steps = max(1, params.train.tokens // params.buffer.batch_size)
        self.schedule = Schedule.from_params(params, self.total_steps)
        self.lr = lr
        self.tracker = DeadLatentTracker(
            sae.num_latents, params.sae.dead_tokens or default_dead_tokens(params.train.tokens), self.distributed
        )
        self.optimizer = adam(sae, lr, objective.adam_betas)
        self.gradient_rule = GradientRule(params.train.grad_normalization or objective.grad_normalization)
        # Activations are divided by this before the SAE sees them (1.0 unless the objective normalises).
        self.input_scale = 1.0
        self.step = 0
        self.bad_steps = 0  # consecutive steps with a blown-up FVU (see DIVERGED_FVU)
        self.blown_up_fvus: list[float] = []  # their FVUs, the last DIVERGED_STEPS of them
        self.best_fvu = math.inf
        self.tokens = 0
        self.metrics: list[dict] = []
        self.last_checkpoint_step: int | None = None

    @property
    def checkpoint_path(self) -> Path:
        return self.folder / CHECKPOINT_FILE

    def save_checkpoint(self, *, with_buffer: bool = True) -> None:
        """Everything needed to resume; ``with_buffer=False`` for a buffer shared by several trainers (a sweep),
        whose state is saved once beside them. Every rank calls it; rank 0 writes every rank's buffer and
        generator (``ranks``) beside the weights, optimiser and counters the ranks share."""
        ranks = self.distributed.gather(
            {"buffer": self.buffer.state_dict() if with_buffer else None, "torch_rng": torch.get_rng_state()}
        )
        self.last_checkpoint_step = self.step
        if not self.distributed.is_first:
            return
        torch_save(
            self.checkpoint_path,
            {
                "step": self.step,
                "tokens": self.tokens,
                "sae": self.sae.state_dict(),
                "input_scale": self.input_scale,
                "best_fvu": self.best_fvu,
                "threads": torch.get_num_threads(),
                "optimizer": self.optimizer.state_dict(),
                "gradient_rule": self.gradient_rule.state_dict(),
                "tracker": self.tracker.state_dict(),
                "world_size": self.distributed.world_size,
                "ranks": ranks,
                "metrics": self.metrics,
                "params": self.params.model_dump(mode="json"),
            },
        )

    def load_checkpoint(self) -> list[str]:
        """Restore everything from the checkpoint; returns notes for the user (what changed and is allowed to:
        the learning rate, clipping and logging intervals; a different thread count)."""
        state = read_torch(self.checkpoint_path, "training checkpoint")
        if not isinstance(state, dict) or not {"params", "sae", "optimizer", "step"} <= set(state):
            raise UserError(f"{self.checkpoint_path}: not a training checkpoint; start over with --overwrite")
        check_world_size(self.checkpoint_path, state.get("world_size", 1), self.distributed.world_size)
        changed = _changed_fields(state["params"], self.params.model_dump(mode="json"))
        refused = [change for change in changed if change.split(":")[0] not in RESUMABLE_CHANGES]
        if refused:
            raise UserError(
                f"--resume: params changed since the checkpoint ({'; '.join(refused[:3])}); only "
                f"{', '.join(sorted(RESUMABLE_CHANGES))} may change on resume: restore the others, "
                "or start over with --overwrite"
            )
        notes = [f"note: resuming with {change}" for change in changed]
        threads = state.get("threads")
        if threads is not None and threads != torch.get_num_threads():
            notes.append(
                f"note: the checkpoint was written with {threads} threads and this run has "
                f"{torch.get_num_threads()}; a resumed run equals an uninterrupted one exactly only at the same "
                "thread count (set DICTLEARN_THREADS)"
            )
        try:
            self.sae.load_state_dict(state["sae"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise UserError(
                f"{self.checkpoint_path} does not fit this SAE ({err}); start over with --overwrite"
            ) from None
        self.input_scale = state["input_scale"]
        self.best_fvu = state.get("best_fvu", math.inf)
        self.tracker.load_state_dict(state["tracker"])
        if "gradient_rule" in state:
            self.gradient_rule.load_state_dict(state["gradient_rule"])
        # Checkpoints written before data-parallel training hold one rank's state at the top level.
        mine = state["ranks"][self.distributed.rank] if "ranks" in state else state
        if mine["buffer"] is not None:
            self.buffer.load_state_dict(mine["buffer"])
        torch.set_rng_state(mine["torch_rng"])
        self.step, self.tokens, self.metrics = state["step"], state["tokens"], state["metrics"]
        self.last_checkpoint_step = self.step
        return notes

    def progress_without_checkpoint(self) -> str:
        """What a --resume finds when the run stopped before its first checkpoint (from metrics.jsonl)."""
        reached = 0
        metrics = self.folder / METRICS_FILE
        if metrics.is_file():
            for line in metrics.read_text().splitlines():
                try:
                    reached = max(reached, int(json.loads(line)["step"]))
                except (ValueError, KeyError, TypeError):
                    continue
        got = f"the run got to step {reached} of {self.total_steps}" if reached else "the run logged no step"
        return (
            f"note: nothing to resume in {self.folder}: {got} before its first checkpoint (every "
            f"{self.params.train.checkpoint_every} steps); starting over"
        )

    def write_metrics(self) -> None:
        """Rewrite metrics.jsonl from the records held (at the start of a run, or from a checkpoint's)."""
        if not self.distributed.is_first:
            return
        lines = "".join(json.dumps(m) + "\n" for m in self.metrics)
        atomic_write(self.folder / METRICS_FILE, lambda temp: temp.write_text(lines))

    def _append_metrics(self, record: dict) -> None:
        """One line per record, so logging costs the same at step 10 and step 100,000; a line cut short by a
        kill is dropped when ``fit`` rewrites the file from the checkpoint's records."""
        self.metrics.append(record)
        if not self.distributed.is_first:
            return
        with (self.folder / METRICS_FILE).open("a") as lines:
            lines.write(json.dumps(record) + "\n")

    def _split(self, rows_BW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) on the SAE's device and dtype, divided by the input scale."""
        rows_BW = rows_BW.to(self.sae.device, self.sae.dtype)
        if self.input_scale != 1.0:
            rows_BW = rows_BW / self.input_scale
        if self.paired:
            return rows_BW[:, : self.sae.d_in], rows_BW[:, self.sae.d_in :]
        return rows_BW, rows_BW

    def _sample(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``rows`` training rows, as (inputs, targets): scheduled events (resampling) score these."""
        batches, count = [], 0
        while count < rows:
            batch = self.buffer.next_batch()
            if batch is None:
                break
            batches.append(batch)
            count += len(batch)
        if not batches:
            raise UserError("the activations ran out before a scheduled resampling could sample any")
        return self._split(torch.cat(batches)[:rows])

    def initialize(self, sample_rows: int = 8192, *, keep_weights: bool = False) -> None:
        """Data-dependent set-up before the first step: the input scale (for objectives that normalise) and
        the objective's initialisation (e.g. ``b_dec`` at the geometric median), from a peek at the buffer.
        ``keep_weights`` (training from a dictionary's weights, ``--init-from``): no initialisation; the weights,
        which act on unscaled activations, are rescaled to the scaled inputs (``finish`` scales them back)."""
        sample = self.buffer.peek(sample_rows).to(self.sae.device, self.sae.dtype)
        if self.objective.normalize_inputs:
            inputs = sample[:, : self.sae.d_in]
            # E||x / s||^2 = d_in (Anthropic, April 2024 update): s = sqrt(E||x||^2 / d_in).
            self.input_scale = float(inputs.double().pow(2).sum(1).mean().div(self.sae.d_in).sqrt())
        # Under several ranks each sampled its own part of the data: rank 0's scale and weights hold for all.
        self.input_scale = self.distributed.broadcast_object(self.input_scale)
        if keep_weights:
            if self.input_scale != 1.0:
                self.sae.fold_input_scale_(1 / self.input_scale)
            return
        self.objective.initialize_(self.sae, *self._split(sample))
        self.distributed.broadcast_state_(self.sae)

    def finish(self) -> None:
        """Fold the input scale into the weights, so the saved SAE acts on unscaled activations."""
        if self.input_scale != 1.0:
            self.sae.fold_input_scale_(self.input_scale)
            self.input_scale = 1.0

    def _divergence_message(self, loss: float, fvu: float) -> str:
        first_bad = self.step - self.bad_steps + 1
        what = (
            f"loss {loss}"
            if not math.isfinite(loss)
            else f"FVU {fvu:.3g} (above {DIVERGED_FVU:g} and {DIVERGED_FVU:g}x the best so far since step {first_bad}, "
            f"and not halving over the last {DIVERGED_STEPS} steps)"
        )
        if self.last_checkpoint_step is not None:
            where = (
                f"the last good checkpoint is step {self.last_checkpoint_step} ({self.checkpoint_path}): "
                "lower train.lr and run again with --resume"
            )
        else:
            where = "no checkpoint was written: lower train.lr and run again with --overwrite"
        return f"training diverged at step {self.step}: {what}; no ae.pt was written; {where}"

    def fit(self, on_step: Callable[[Trainer, dict], None] = lambda trainer, record: None) -> None:
        """Run until ``train.tokens`` or the end of the data; checkpoints every ``checkpoint_every`` steps."""
        train = self.params.train
        self.write_metrics()  # fresh, or the records up to the checkpoint being resumed
        while self.step < self.total_steps:
            rows_BW = self.buffer.next_batch()
            if not self.distributed.every_rank_has(rows_BW, self.buffer.batch_size):
                break
            record = self.train_on(rows_BW)
            if self.step % train.checkpoint_every == 0 and self.bad_steps == 0:
                self.save_checkpoint()
            on_step(self, record)

    def train_on(self, rows_BW: torch.Tensor) -> dict:
        """One step on a batch of buffer rows; returns its record (appended to the metrics every ``log_every``
        steps). ``fit`` calls it with its buffer's batches, a sweep with a batch several trainers share."""
        train = self.params.train
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * self.schedule.factor(self.step)
        dead_F = self.tracker.dead_mask()
        ctx = StepContext(self.step, self.total_steps, dead_F.to(self.sae.device), self.distributed)
        x_BD, y_BD = self._split(rows_BW)
        out = train_step(
            self.sae,
            self.objective,
            self.optimizer,
            x_BD,
            y_BD,
            ctx,
            max_grad_norm=train.max_grad_norm,
            gradient_rule=self.gradient_rule,
            distributed=self.distributed,
        )
        l0 = float((out.codes.values > 0).sum(-1).float().mean())
        if self.distributed.world_size > 1:
            # Every rank's terms are its share of the global batch's (the normalisers are global): their mean is
            # the global value, and every rank then takes the same divergence decision.
            values = torch.tensor([out.loss, l0, *out.terms.values()], dtype=torch.float64)
            self.distributed.average_([values])
            loss, l0, *terms = values.tolist()
            out = out._replace(loss=loss, terms=dict(zip(out.terms, terms, strict=True)))
        fvu = out.terms["fvu"]
        blown_up = not math.isfinite(fvu) or (fvu > DIVERGED_FVU and fvu > DIVERGED_FVU * self.best_fvu)
        self.bad_steps = self.bad_steps + 1 if blown_up else 0
        self.blown_up_fvus = [*self.blown_up_fvus, fvu][-DIVERGED_STEPS:] if blown_up else []
        self.best_fvu = min(self.best_fvu, fvu) if math.isfinite(fvu) else self.best_fvu
        if not math.isfinite(out.loss) or left_the_basin(self.blown_up_fvus):
            raise UserError(self._divergence_message(out.loss, fvu))
        self.tracker.update(out.codes)
        self.step += 1
        self.tokens += len(rows_BW) * self.distributed.world_size
        record = {
            "step": self.step,
            "tokens": self.tokens,
            "loss": out.loss,
            **out.terms,
            "l0": l0,
            "dead_fraction": float(dead_F.float().mean()),
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        event = self.objective.scheduled_event(
            self.sae, EventContext(self.step, self.optimizer, self.tracker.dead_mask(), self._sample)
        )
        if self.distributed.world_size > 1 and self.distributed.any(bool(event)):
            # Each rank scored its own sample: rank 0's event stands, weights, Adam moments and record alike.
            self.distributed.broadcast_state_(self.sae, self.optimizer)
            on_cpu = {key: value.cpu() if torch.is_tensor(value) else value for key, value in (event or {}).items()}
            event = self.distributed.broadcast_object(on_cpu or None)  # not rank 0's GPU tensors on every rank
        if event:
            # A tensor, not a metric: the latents the event re-initialised, whose counters start again.
            self.tracker.revive(event.pop("revived_latents", None))
            record.update(event)
        if self.step % train.log_every == 0 or self.step == self.total_steps or event:
            self._append_metrics(record)
        return record
