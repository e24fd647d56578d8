"""t-SNE of source vs target features at the start and the end of training (paper 000, Figs 2-4)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from callbacks.figures import save_figure  # noqa: E402

DOMAIN_COLOURS = {"source": "tab:red", "target": "tab:blue"}  # paper 000: red = source, blue = target
CLASS_COLOURS = {0: "tab:green", 1: "tab:purple"}
CLASS_NAMES = {0: "normal", 1: "defect"}


class FeatureTSNE(Callback):
    """Writes ``tsne_start.png`` and ``tsne_end.png``: features of the labelled source and target val splits
    embedded by t-SNE, coloured by domain (left) and by class (right; marker = domain).

    The model must offer ``embed(images, domain) -> [B, D]``; the DataModule must be a
    ``PairedDomainDataModule`` (its ``source_val`` and ``target_val_dataset``). The val split is used only
    for this picture, never for selection.

    Args:
        max_per_domain: at most this many images per domain (the first ones of the split).
        perplexity: t-SNE perplexity (lowered automatically for small sets).
        seed: t-SNE random state.
    """

    def __init__(self, max_per_domain: int = 200, perplexity: float = 30.0, seed: int = 0) -> None:
        if max_per_domain < 2 or perplexity <= 0:
            raise ValueError(f"FeatureTSNE needs max_per_domain >= 2 and perplexity > 0, got {max_per_domain}, "
                             f"{perplexity}")
        self.max_per_domain = max_per_domain
        self.perplexity = perplexity
        self.seed = seed

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step == 0:  # a resumed run has no "start" picture to make
            self._plot(trainer, pl_module, "tsne_start", "start of training")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._plot(trainer, pl_module, "tsne_end", f"end of training (step {trainer.global_step})")

    @torch.no_grad()
    def features(self, trainer: Trainer, pl_module: LightningModule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(features [N, D], domain 0/1 [N], class label [N]) of both val splits."""
        datamodule = trainer.datamodule
        if not hasattr(pl_module, "embed") or not hasattr(datamodule, "target_val_dataset"):
            raise TypeError("FeatureTSNE needs a model with embed(images, domain) and a PairedDomainDataModule")
        datasets = {"source": datamodule.source_val, "target": datamodule.target_val_dataset}
        was_training = pl_module.training
        pl_module.eval()
        features, domains, labels = [], [], []
        for index, (domain, dataset) in enumerate(datasets.items()):
            seen = 0
            for batch in DataLoader(dataset, batch_size=datamodule.batch_size):
                images = batch["image"][: self.max_per_domain - seen].to(pl_module.device)
                features.append(pl_module.embed(images, domain).float().cpu())
                labels.append(batch["label"][: images.shape[0]])
                domains.append(torch.full((images.shape[0],), index))
                seen += images.shape[0]
                if seen >= self.max_per_domain:
                    break
        pl_module.train(was_training)
        return torch.cat(features).numpy(), torch.cat(domains).numpy(), torch.cat(labels).numpy()

    def _plot(self, trainer: Trainer, pl_module: LightningModule, name: str, title: str) -> None:
        if not trainer.is_global_zero:
            return
        features, domains, labels = self.features(trainer, pl_module)
        perplexity = min(self.perplexity, (len(features) - 1) / 3)
        points = TSNE(perplexity=perplexity, init="pca", random_state=self.seed).fit_transform(features)
        figure, (by_domain, by_class) = plt.subplots(1, 2, figsize=(10, 4.5))
        for index, (domain, colour) in enumerate(DOMAIN_COLOURS.items()):
            chosen = domains == index
            by_domain.scatter(*points[chosen].T, s=12, c=colour, label=domain, alpha=0.7)
            for label, class_colour in CLASS_COLOURS.items():
                both = chosen & (labels == label)
                by_class.scatter(*points[both].T, s=14, c=class_colour, marker="o" if index == 0 else "^",
                                 label=f"{domain} {CLASS_NAMES[label]}", alpha=0.7)
        by_domain.set_title("by domain")
        by_class.set_title("by class (o = source, ^ = target)")
        for ax in (by_domain, by_class):
            ax.legend(fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        figure.suptitle(f"t-SNE of encoder features, {title}")
        save_figure(trainer, figure, name)
