"""Lightning wrappers: the meta-comparer, its ``aggregate`` ablation and a k-NN patch baseline.

All three are tested the same way: at the start of a test (or predict), the held-out domain's normal
references (``datamodule.reference_images()`` of ``datamodules.LODODataModule``) are read once, without any
fine-tuning, and every test image is scored against them. The thresholds come from the references too
(:class:`ReferenceDetector`), so they are the target's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn

from lightning_modules.base import AnomalyDetectionModule
from lightning_modules.components.backbone import BackboneSpec, FeatureExtractor
from lightning_modules.components.calibration import HeldOutScores
from lightning_modules.components.knn_patch import KNNPatchScorer
from lightning_modules.meta_comparer.losses import attention_loss, classification_loss, ranking_loss
from lightning_modules.meta_comparer.torch_model import MetaComparerModel
from lightning_modules.padim.torch_model import PadimModel


def target_references(datamodule) -> torch.Tensor:
    """The held-out domain's normal reference images [N, 3, H, W] from the DataModule."""
    if datamodule is None or not hasattr(datamodule, "reference_images"):
        raise ValueError(
            f"testing needs the target domain's normal references: use a DataModule with reference_images() "
            f"(datamodules.LODODataModule), got {type(datamodule).__name__}")
    references = datamodule.reference_images()
    if references.ndim != 4 or references.shape[0] == 0:
        raise ValueError(f"reference_images() must give [N>0, 3, H, W], got {tuple(references.shape)}")
    return references


class ReferenceDetector(AnomalyDetectionModule):
    """A detector scoring against the target's normal references, given at test/predict time.

    :meth:`prepare_scoring` fits the references, and the thresholds from them with no label: the references
    are split in two halves (even and odd positions); each half is scored against a fit of the other, and
    these held-out normal scores give the thresholds (domain ``target``). The final fit uses every reference.
    """

    #: the fewest references a fit needs
    min_references = 1

    def fit_references(self, references: torch.Tensor) -> None:
        """Fits what scoring needs on normal reference images [N, 3, H, W] (already on the device)."""
        raise NotImplementedError

    def prepare_scoring(self, datamodule) -> None:
        references = target_references(datamodule).to(self.device)
        if self.threshold.method == "manual":
            self.fit_references(references)
            return
        if references.shape[0] < 2 * self.min_references:
            self.calibration.reset()
            rank_zero_warn(f"{type(self).__name__}: no thresholds: fitting them on the references needs at least "
                           f"{2 * self.min_references} reference images (one half is scored against a fit of the "
                           f"other), got {references.shape[0]}; "
                           f"add references (data.init_args.reference_fraction) or pass "
                           f"--model.init_args.threshold.method manual --model.init_args.threshold.image_threshold "
                           f"<score>")
            self.fit_references(references)
            return
        held_out = HeldOutScores().to(self.device)
        positions = torch.arange(references.shape[0], device=references.device)
        for part in (positions % 2 == 0, positions % 2 == 1):
            self.fit_references(references[~part])
            with torch.no_grad():
                for index, chunk in zip(positions[part].split(16), references[part].split(16), strict=True):
                    scores, maps = self.anomaly_scores(chunk)
                    batch = {"label": torch.zeros(len(chunk), dtype=torch.long, device=self.device),
                             "path": [f"reference:{int(i)}" for i in index],
                             "mask": torch.zeros(len(chunk), 1, *chunk.shape[-2:], device=self.device),
                             "has_mask": torch.zeros(len(chunk), dtype=torch.bool, device=self.device)}
                    held_out.update(batch, scores, maps)
        held_out.fit(self.calibration, self.threshold, "target", "the target references")
        self.fit_references(references)


class MetaComparer(ReferenceDetector):
    """Co-attention meta-comparer with ranking loss (paper 002), trained on source-domain episodes.

    Args:
        backbone: backbone spec (``{name: resnet18, weights: ...}`` for the paper; packaged Lite0 offline).
        layers: backbone stages, one per scale (default: timm feature stages 2, 3, 4 = strides 8, 16, 32).
        backbone_trainable: backbone module prefixes to fine-tune; default frozen.
        channels, pyramid_passes, patch_size, attention_dim, comparer_hidden, num_query_patches,
        num_reference_patches, max_pair_elements, reference_pooling: see ``MetaComparerModel``.
        cls_loss, att_loss, rank_loss: switch L_cls (eq. 2), L_att (eq. 3), L_rank (eq. 4). Without L_att
            the co-attention projections are frozen at their initialisation.
        rank_lambda: lambda of L_rank's pair weight.
        rank_pairs: query patch pairs drawn per scale for L_rank (None = every pair of sampled patches).
    """

    method_name = "meta_comparer"

    def __init__(
        self,
        backbone: BackboneSpec | None = None,
        layers: list[str | int] | None = None,
        backbone_trainable: list[str] | None = None,
        channels: int = 64,
        pyramid_passes: int = 1,
        patch_size: int = 3,
        attention_dim: int = 64,
        comparer_hidden: list[int] | None = None,
        num_query_patches: int | None = 256,
        num_reference_patches: int | None = 256,
        max_pair_elements: int = 2**25,
        reference_pooling: str = "max",
        cls_loss: bool = True,
        att_loss: bool = True,
        rank_loss: bool = True,
        rank_lambda: float = 1.0,
        rank_pairs: int | None = 1024,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not (cls_loss or rank_loss):
            raise ValueError("the comparer learns only from cls_loss or rank_loss; enable at least one of them")
        if rank_pairs is not None and rank_pairs < 1:
            raise ValueError(f"rank_pairs must be a positive int or None (all pairs), got {rank_pairs}")
        self.save_hyperparameters()
        self.model = MetaComparerModel(
            backbone or BackboneSpec(), list(layers or [2, 3, 4]), backbone_trainable, channels, pyramid_passes,
            patch_size, attention_dim, comparer_hidden, num_query_patches, num_reference_patches, max_pair_elements,
            reference_pooling)
        if not att_loss:
            self.model.co_attention.requires_grad_(False)
        self.losses = {"cls": cls_loss, "att": att_loss, "rank": rank_loss}
        self.rank_lambda = rank_lambda
        self.rank_pairs = rank_pairs
        self.bank: list[torch.Tensor] = []

    def loss_terms(self, batch: dict) -> dict[str, torch.Tensor]:
        query, references = batch["query"], batch["references"]
        out = self.model.episode(query["image"], references)
        labels = query["label"]
        terms = {}
        if self.losses["cls"]:
            terms["cls"] = classification_loss(out.patch_logits, labels)
        if self.losses["att"]:
            terms["att"] = attention_loss(out.attention, labels)
        if self.losses["rank"]:
            # The co-attention guides the ranking; it is a target here, not something to move.
            guidance = [a.detach() for a in out.guidance]
            terms["rank"] = ranking_loss(out.patch_logits, guidance, self.rank_lambda, self.rank_pairs)
        return terms

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.checked_total(self.loss_terms(batch))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.checked_total(self.loss_terms(batch), prefix="val")

    def fit_references(self, references: torch.Tensor) -> None:
        batch_size = getattr(self.trainer.datamodule, "batch_size", 16) if self._trainer is not None else 16
        self.bank = self.model.reference_bank(references, batch_size)

    def on_test_end(self) -> None:
        self.bank = []

    def on_predict_end(self) -> None:
        self.bank = []

    def anomaly_scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.bank:
            raise RuntimeError("MetaComparer: no reference bank; call prepare_scoring(datamodule) with a LODODataModule "
                               "(test and predict do)")
        return self.model(images, self.bank)


class MetaComparerAggregate(MetaComparer):
    """``aggregate`` ablation: the same network trained with L_cls only on the pooled source pairs."""

    method_name = "meta_comparer_aggregate"

    def __init__(self, *args, cls_loss: bool = True, att_loss: bool = False, rank_loss: bool = False,
                 **kwargs) -> None:
        super().__init__(*args, cls_loss=cls_loss, att_loss=att_loss, rank_loss=rank_loss, **kwargs)


class KNNPatchBaseline(ReferenceDetector):
    """Anomaly-detection baseline fitted on the same target references: k-NN distance of patch features.

    Patch features: backbone stages averaged over ``patch_size`` neighbourhoods, brought to the finest
    stage's grid (bilinear) and concatenated. Nothing is trained; ``test`` fits the memory bank on the
    references, then the map is the k-NN distance per position and the image score its maximum.

    Args:
        backbone: backbone spec (the meta-comparer's, for a fair comparison).
        layers: backbone stages (default: timm feature stages 2 and 3 = strides 8 and 16).
        patch_size: neighbourhood side in feature positions (odd).
        k: neighbours averaged per patch.
    """

    method_name = "knn_patch"

    def __init__(self, backbone: BackboneSpec | None = None, layers: list[str | int] | None = None,
                 patch_size: int = 3, k: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        if patch_size < 1 or patch_size % 2 == 0:
            raise ValueError(f"patch_size must be odd and positive, got {patch_size}")
        self.save_hyperparameters()
        self.extractor = FeatureExtractor(backbone or BackboneSpec(), list(layers or [2, 3]))
        self.scorer = KNNPatchScorer(k)
        self.patch_size = patch_size

    @torch.no_grad()
    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> patch features [B, h, w, C] on the finest stage's grid."""
        stages = self.extractor(images)
        maps = [F.avg_pool2d(stages[name].float(), self.patch_size, 1, self.patch_size // 2, count_include_pad=False)
                for name in self.extractor.layers]
        grid = maps[0].shape[-2:]
        maps = [m if m.shape[-2:] == grid else F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
                for m in maps]
        return torch.cat(maps, 1).permute(0, 2, 3, 1)

    def fit_references(self, references: torch.Tensor) -> None:
        self.scorer.fit(torch.cat([self.patch_features(chunk).flatten(0, 2) for chunk in references.split(16)]))

    def anomaly_scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.scorer(self.patch_features(images))
        return maps.flatten(1).amax(1), maps


class PadimReferenceBaseline(ReferenceDetector):
    """PaDiM fitted on the same target references: the Gaussians of ``PadimModel`` from the held-out
    domain's normals given at test time. Nothing is trained; every process fits the same references.

    Args: as ``lightning_modules.padim.Padim`` (the surfaces default: packaged Lite0, stages 1-3, 100 features).
    """

    method_name = "padim_reference"
    min_references = 2  # a covariance

    def __init__(self, backbone: BackboneSpec | None = None, layers: list[str | int] | None = None,
                 num_features: int = 100, feature_seed: int = 0, covariance_eps: float = 0.01, blur_sigma: float = 4.0,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.model = PadimModel(backbone or BackboneSpec(), layers or [1, 2, 3], num_features, feature_seed,
                                covariance_eps, blur_sigma)

    def fit_references(self, references: torch.Tensor) -> None:
        self.model.reset_statistics()
        with torch.no_grad():
            for chunk in references.split(16):
                self.model.accumulate(self.model.embed(chunk))

    def anomaly_scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(images)
