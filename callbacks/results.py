"""Writes the test metrics of a run as JSON and Markdown in the run folder, prints them, logs a W&B table."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

from callbacks.tracking import wandb_loggers


def markdown_table(rows: list[tuple[str, float]]) -> str:
    lines = ["| metric | value |", "| --- | --- |"]
    lines += [f"| {name} | {value:.4f} |" for name, value in rows]
    return "\n".join(lines) + "\n"


class ResultsWriter(Callback):
    """After ``test``: ``results.json`` and ``results.md`` in the run folder, and a ``results`` W&B table."""

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {
            name: float(value)
            for name, value in sorted(trainer.callback_metrics.items())
            if name.startswith("test/")
        }
        run_dir = Path(trainer.default_root_dir)
        describe = getattr(trainer.datamodule, "describe", None)
        payload = {
            "method": getattr(pl_module, "method_name", type(pl_module).__name__),
            "data": describe() if callable(describe) else None,
            "run_dir": str(run_dir),
            "global_step": trainer.global_step,
            "checkpoint": trainer.ckpt_path,  # None: the weights in memory at the end of fit
            "metrics": metrics,
        }
        calibration = getattr(pl_module, "calibration", None)
        if calibration is not None:  # the decision thresholds in effect, and the domain they were fitted on
            payload["calibration"] = calibration.summary()
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
        rows = list(metrics.items())
        table = markdown_table(rows)
        (run_dir / "results.md").write_text(f"# {payload['method']} — {run_dir}\n\n{table}")
        print(f"\nResults of {payload['method']} ({run_dir}):\n{table}")
        for logger in wandb_loggers(trainer.loggers):
            logger.log_table(key="results", columns=["metric", "value"], data=[list(r) for r in rows])
            if calibration is not None:
                logger.log_table(key="calibration", columns=["key", "value"],
                                 data=[[key, str(value)] for key, value in payload["calibration"].items()])
