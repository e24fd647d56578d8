"""Weights & Biases as the default tracker, with an offline fallback that never prompts or fails a run."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info

WANDB_HOST = "api.wandb.ai"


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(WANDB_HOST) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str:
    """``WANDB_MODE`` when the user set it, else online with credentials and offline without."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    return "online" if _has_wandb_credentials() else "offline"


def build_loggers(
    run_dir: Path,
    run_name: str,
    tags: list[str],
    project: str = "shiftad",
    use_wandb: bool = True,
    log_model: bool = False,
) -> list[Logger]:
    """A CSV log in ``run_dir`` (first, so ``trainer.log_dir`` is the run folder) and a W&B run beside it."""
    csv_logger = CSVLogger(save_dir=str(run_dir), name="", version="")
    # Its writer warns when its folder is not empty; made lazily, it would find the run's own config and
    # W&B files there, so it is made now, before them.
    csv_logger.experiment  # noqa: B018
    loggers: list[Logger] = [csv_logger]
    mode = wandb_mode() if use_wandb else "disabled"
    if mode == "disabled":
        return loggers
    # The run is created lazily on first use; these settings keep wandb from ever asking on stdin.
    os.environ.setdefault("WANDB_SILENT", "true")
    if mode == "offline":
        rank_zero_info(
            f"W&B: no login found, logging offline to {run_dir / 'wandb'}. Upload later with "
            f"`wandb sync {run_dir / 'wandb'}/offline-run-*` after `wandb login`."
        )
    loggers.append(
        WandbLogger(
            name=run_name,
            save_dir=str(run_dir),
            project=project,
            tags=tags,
            mode=mode,
            log_model=log_model,  # True: the checkpoints at the end of fit, the best one tagged "best"
            settings={"init_timeout": 60, "silent": True},
        )
    )
    return loggers


def wandb_loggers(loggers: list[Logger]) -> list[WandbLogger]:
    return [logger for logger in loggers if isinstance(logger, WandbLogger)]


def finish_wandb(loggers: list[Logger], exit_code: int | None = None) -> None:
    """Ends this process's W&B runs and waits until their files are complete.

    ``finish()`` returns once the W&B service has the last records, but the service writes the offline run
    file's last block only when it closes the run's stream, later and asynchronously; a reader right after
    (a test, ``wandb sync``, the next in-process run) could miss history and artifacts. Tearing the service
    down waits for that.
    """
    started = [logger for logger in wandb_loggers(loggers) if logger._experiment is not None]
    if not started:
        return
    import wandb

    for logger in started:
        logger.experiment.finish(exit_code=exit_code)
    wandb.teardown()
