"""What every ShiftAD LightningModule shares: optimizers from the config, loss guards, evaluation."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn

from lightning_modules.components.metrics import ScoreCollector, image_metrics, pixel_metrics, sample_ids


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or Inf; the run stops before any weight is overwritten."""


def adam() -> OptimizerCallable:
    return lambda params: torch.optim.Adam(params, lr=1e-3)


class ShiftADModule(LightningModule):
    """Base of every method.

    Args:
        optimizer: built on the trainable parameter groups only (``class_path``/``init_args`` in YAML).
        scheduler: optional learning-rate scheduler, stepped every ``scheduler_interval``.
        scheduler_interval: ``step`` or ``epoch``.
    """

    #: short name used for run folders and W&B tags.
    method_name = "method"
    #: init arguments that ``test``/``validate``/``predict --ckpt_path`` may set to another value than the
    #: checkpoint's: name -> the allowed (checkpoint value, new value) pairs, or None for any value.
    test_time_options: dict[str, frozenset[tuple] | None] = {}

    def __init__(
        self,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "step",
    ) -> None:
        super().__init__()
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}")
        self.optimizer_factory = optimizer or adam()
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval

    def parameter_groups(self) -> list[dict]:
        """Trainable parameter groups; a group may carry ``lr_mult``, applied to the optimizer's lr."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params}] if params else []

    def configure_optimizers(self):
        groups = [g for g in self.parameter_groups() if g["params"]]
        if not groups:
            return None
        optimizer = self.optimizer_factory(groups)
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * group.get("lr_mult", 1.0)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}

    def check_finite(self, terms: dict[str, torch.Tensor]) -> None:
        """Stops the run, naming the step and the term, when a loss term (or statistic) is NaN or Inf.

        Every process stops together (a process that stopped alone would leave the others waiting).
        """
        bad = [(name, value.detach()) for name, value in terms.items() if not torch.isfinite(value.detach()).all()]
        if self._trainer is not None and self.trainer.world_size > 1:
            if not self.trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
                return
        elif not bad:
            return
        if bad:
            name, value = bad[0]
            shown = value.float().item() if value.numel() == 1 else "non-finite"
            where = f"loss term {name!r} is {shown}"
        else:
            where = "a loss term is non-finite on another process"
        raise NonFiniteLossError(
            f"{type(self).__name__}: {where} at global step {self.global_step} (epoch {self.current_epoch}); "
            f"the run stops here and the last checkpoint is left as it was"
        )

    def checked_total(self, terms: dict[str, torch.Tensor], prefix: str = "train") -> torch.Tensor:
        """Sums loss terms after checking each is finite, and logs each one (averaged over processes)."""
        self.check_finite(terms)
        total = sum(terms.values())
        self.log_dict({f"{prefix}/{name}": value.detach() for name, value in terms.items()}, sync_dist=True)
        self.log(f"{prefix}/loss", total.detach(), prog_bar=True, sync_dist=True)
        return total

    def on_train_start(self) -> None:
        # Lightning keeps the module modes it finds; a resumed fit (no sanity check before it) must train in the
        # modes of a fresh one. Each model's train() keeps its frozen parts in eval.
        self.train()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        bad = [name for name, value in checkpoint["state_dict"].items()
               if value.is_floating_point() and not torch.isfinite(value).all()]
        if bad:
            raise NonFiniteLossError(
                f"{type(self).__name__}: not saving a checkpoint at global step {self.global_step}: non-finite "
                f"values in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; the last good checkpoint is kept"
            )
        checkpoint["shiftad_method"] = type(self).__name__
        data_tag = getattr(self.trainer.datamodule, "run_tag", None) if self._trainer is not None else None
        if data_tag is not None:
            checkpoint["shiftad_data_tag"] = data_tag  # a later test on other data is filed under both tags
        checkpoint["rng_states"] = rng_states()

    def test_domain_names(self) -> tuple[str, ...]:
        """The domain of each test dataloader, in order: the DataModule's ``test_dataloader_names``, else
        ``("target",)``. Test metrics are logged as ``test/<domain>/<metric>``."""
        datamodule = self.trainer.datamodule
        names = tuple(getattr(datamodule, "test_dataloader_names", None) or ("target",))
        loaders = len(self.trainer.num_test_batches)
        if len(names) != loaders or len(set(names)) != len(names):
            raise ValueError(f"{type(datamodule).__name__}.test_dataloader_names is {names}, but the test has "
                             f"{loaders} dataloader(s): it needs one distinct name per test dataloader")
        return names

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("shiftad_method")
        if saved is not None and saved != type(self).__name__:
            raise ValueError(
                f"this checkpoint was written by method {saved!r}, but the model is {type(self).__name__!r}; "
                f"pick the config of {saved!r} or a checkpoint of {type(self).__name__!r}"
            )
        if "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])


class AnomalyDetectionModule(ShiftADModule):
    """Base of the anomaly detectors: one evaluation path for every method.

    Subclasses implement :meth:`anomaly_scores`. Test batches are the sample dicts of ``datamodules``.
    Each test dataloader is one domain (:meth:`test_domain_names`) with its own image and pixel collectors,
    gathered across ranks and ranked before any curve is computed; metrics are ``test/<domain>/<metric>``.
    The figure keeps anomaly maps of the first dataloader (the target).

    Args:
        aupro_fpr_limit: upper FPR limit of AUPRO (0.3 is the MVTec AD definition).
        num_map_examples: how many test samples keep their anomaly maps for the figure grid.
    """

    #: evaluation-only arguments: a test of a checkpoint may change them freely.
    test_time_options = {"aupro_fpr_limit": None, "num_map_examples": None}

    def __init__(self, *args, aupro_fpr_limit: float = 0.3, num_map_examples: int = 8, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.aupro_fpr_limit = aupro_fpr_limit
        self.num_map_examples = num_map_examples
        # One collector per test dataloader, made at the start of each test (the DataModule sets how many).
        self.image_scores = torch.nn.ModuleList()
        self.pixel_scores = torch.nn.ModuleList()
        self.map_examples: dict[str, torch.Tensor] = {}
        self.test_domains: tuple[str, ...] = ()
        self.test_results: dict[str, float] = {}

    def anomaly_scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """images [B, 3, H, W] in [0, 1] -> (image scores [B], anomaly maps [B, h, w] or None)."""
        raise NotImplementedError

    def on_test_epoch_start(self) -> None:
        self.test_domains = self.test_domain_names()
        self.image_scores = torch.nn.ModuleList(ScoreCollector() for _ in self.test_domains).to(self.device)
        self.pixel_scores = torch.nn.ModuleList(ScoreCollector() for _ in self.test_domains).to(self.device)
        self.map_examples = {}

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        scores, maps = self.anomaly_scores(batch["image"])
        ids = sample_ids(batch["path"]).to(scores.device)
        self.image_scores[dataloader_idx].update(scores, batch["label"], ids)
        if maps is None:
            return
        masks = batch["mask"][:, 0]
        maps = F.interpolate(maps[:, None].float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        with_mask = batch["has_mask"].bool()
        if with_mask.any():
            self.pixel_scores[dataloader_idx].update(maps[with_mask], masks[with_mask], ids[with_mask])
        if dataloader_idx == 0:
            self._keep_examples(batch["image"], masks, maps)

    def _keep_examples(self, images: torch.Tensor, masks: torch.Tensor, maps: torch.Tensor) -> None:
        taken = self.map_examples.get("image", torch.empty(0)).shape[0]
        room = self.num_map_examples - taken
        if room <= 0:
            return
        new = {"image": images[:room], "mask": masks[:room], "map": maps[:room]}
        for key, value in new.items():
            value = value.detach().float().cpu()
            self.map_examples[key] = torch.cat([self.map_examples[key], value]) if key in self.map_examples else value

    def on_test_epoch_end(self) -> None:
        results = {}
        for domain, image_scores, pixel_scores in zip(self.test_domains, self.image_scores, self.pixel_scores,
                                                      strict=True):
            metrics = image_metrics(*image_scores.compute())
            # A category has masks for all its samples or for none, so with one category per domain every
            # process takes the same branch (a process skipping the gather alone would stall the others).
            if not pixel_scores.scores:
                rank_zero_warn(f"pixel metrics skipped on the {domain} test set: it has no ground-truth masks "
                               f"(image metrics only)")
            else:
                maps, masks = pixel_scores.compute()
                metrics.update(pixel_metrics(maps, masks, self.aupro_fpr_limit))
            results.update({f"test/{domain}/{k}": v for k, v in metrics.items() if math.isfinite(v)})
        self.test_results = results
        self.log_dict(results)


def rng_states() -> dict:
    """The global RNG states (torch, CUDA, numpy, python) as plain tensors and ints, loadable with
    ``weights_only=True``; a resumed fit draws what the uninterrupted one would."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    python_version, python_state, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gauss": float(cached_gauss)},
        "python": {"version": python_version, "state": list(python_state), "gauss": python_gauss},
    }


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    numpy = states["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gauss"]))
    python = states["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))


def freeze(modules: Iterable[torch.nn.Module]) -> None:
    """Frozen means no gradient and eval mode (BatchNorm statistics stay as loaded)."""
    for module in modules:
        module.requires_grad_(False)
        module.eval()
