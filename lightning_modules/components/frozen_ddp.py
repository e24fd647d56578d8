"""Data-parallel fitting of models with nothing to train (statistics-only detectors such as PaDiM).

torch's ``DistributedDataParallel`` refuses a module without trainable parameters, and there are no
gradients to synchronise anyway. This strategy launches and splits the data like ``ddp`` but leaves
the module unwrapped; the module all-reduces its own statistics (``strategy.reduce``).
Use it as ``--trainer.strategy ddp_frozen`` (registered on import) or ``configs/padim/ddp.yaml``.
"""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

FROZEN_DDP = "ddp_frozen"


class FrozenModelDDPStrategy(DDPStrategy):
    """``DDPStrategy`` that does not wrap a model whose parameters are all frozen."""

    strategy_name = FROZEN_DDP

    def configure_ddp(self) -> None:
        if any(p.requires_grad for p in self.model.parameters()):
            super().configure_ddp()


if FROZEN_DDP not in StrategyRegistry:
    StrategyRegistry.register(FROZEN_DDP, FrozenModelDDPStrategy, description="DDP without the wrapper for "
                              "models with no trainable parameters", start_method="popen")
