"""SyncBatchNorm for models with timm's fused BatchNorm + activation layers.

Lightning's ``sync_batchnorm`` converts with torch's ``SyncBatchNorm.convert_sync_batchnorm``. That turns a
timm ``BatchNormAct2d`` (every EfficientNet, including the packaged Lite0) into a plain ``SyncBatchNorm`` and
drops its activation, so the backbone computes something else entirely. ``cli.py`` puts this plugin in
place whenever ``trainer.sync_batchnorm`` is true.
"""

from __future__ import annotations

from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from timm.layers import BatchNormAct2d, SyncBatchNormAct, convert_sync_batchnorm
from torch import nn


class TimmSyncBatchNorm(TorchSyncBatchNorm):
    """Converts with timm's ``convert_sync_batchnorm`` (fused layers keep their activation) and reverts
    ``SyncBatchNormAct`` to ``BatchNormAct2d``; plain BatchNorms are handled as Lightning does."""

    def apply(self, model: nn.Module) -> nn.Module:
        return convert_sync_batchnorm(model)

    def revert(self, model: nn.Module) -> nn.Module:
        if not isinstance(model, SyncBatchNormAct):
            return super().revert(model)  # recurses through self.revert
        reverted = BatchNormAct2d(model.num_features, model.eps, model.momentum, model.affine,
                                  model.track_running_stats)
        if model.affine:
            reverted.weight, reverted.bias = model.weight, model.bias
        reverted.running_mean, reverted.running_var = model.running_mean, model.running_var
        reverted.num_batches_tracked = model.num_batches_tracked
        reverted.training = model.training
        for name, child in model.named_children():  # the activation and drop layers
            reverted.add_module(name, self.revert(child))
        return reverted
