"""Optional experiment tracking: a logger that sends training records and the final evaluation to Weights &
Biases when ``train.wandb`` is set, and does nothing (no import, no cost) when it is not."""

from __future__ import annotations

from pathlib import Path

from dictlearn.errors import UserError
from dictlearn.params import Params


class NoTracking:
    """The default: every call returns at once."""

    def log(self, record: dict, step: int | None = None) -> None:
        pass

    def summary(self, result: dict) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracking(NoTracking):
    """One wandb run: ``log`` sends a training record, ``summary`` the evaluation's numbers, ``finish`` ends it."""

    def __init__(self, run):
        self.run = run

    def log(self, record: dict, step: int | None = None) -> None:
        self.run.log({key: value for key, value in record.items() if isinstance(value, int | float)}, step=step)

    def summary(self, result: dict) -> None:
        for key, value in result.items():
            if isinstance(value, int | float):
                self.run.summary[f"eval/{key}"] = value

    def finish(self) -> None:
        self.run.finish()


def start_tracking(params: Params, folder: str | Path) -> NoTracking:
    """A ``WandbTracking`` for ``train.wandb`` (its run named after the run folder unless set), else ``NoTracking``.

    Offline mode (the default) writes under ``<folder>/wandb`` and needs no network; ``wandb sync`` uploads later.
    """
    settings = params.train.wandb
    if settings is None:
        return NoTracking()
    try:
        import wandb
    except ImportError:
        raise UserError(
            "train.wandb is set but wandb is not installed; pip install wandb (or set it to null)"
        ) from None
    run = wandb.init(
        project=settings.project,
        name=settings.run_name or Path(folder).name,
        mode=settings.mode,
        dir=str(folder),
        config=params.model_dump(mode="json"),
    )
    return WandbTracking(run)
