from collections import Counter

import pytest
import torch

from datamodules import PairedDomainDataModule


def make(root, **kwargs):
    dm = PairedDomainDataModule(root=str(root), category="grass", image_size=32, batch_size=4, **kwargs)
    dm.setup("fit")
    return dm


def test_splits_are_disjoint_and_stratified(surfaces_root):
    dm = make(surfaces_root, val_fraction=0.25, test_fraction=0.25)
    splits = {name: [s.image_path for s in getattr(dm, name).samples]
              for name in ("source_train", "source_val", "target_test")}
    assert sum(map(len, splits.values())) == 21 and len(set().union(*splits.values())) == 21
    normals = Counter(name for name, ps in splits.items() for p in ps if "/good/" in p)
    assert normals == {"source_train": 8, "source_val": 4, "target_test": 4}
    assert [s.image_path for s in dm.target_train.samples] == splits["source_train"]
    assert [s.image_path for s in dm.source_test.samples] == splits["target_test"]


def test_train_batches_pair_labelled_source_and_unlabelled_target(surfaces_root):
    dm = make(surfaces_root)
    loaders = dm.train_dataloader()
    assert set(loaders) == {"source", "target"} and all(loader.drop_last for loader in loaders.values())
    source, target = next(iter(loaders["source"])), next(iter(loaders["target"]))
    assert torch.equal(source["image"][:, 0], source["image"][:, 2])  # gray source (paper default)
    assert not torch.equal(target["image"][:, 0], target["image"][:, 2])  # RGB target
    assert set(source["label"].tolist()) <= {0, 1} and (target["label"] == -1).all()
    assert not target["has_mask"].any() and target["mask"].sum() == 0
    assert dm.run_tag == "surfaces-grass-gray-to-none-da"


def test_val_and_test_dataloader_order(surfaces_root):
    dm = make(surfaces_root)
    assert not isinstance(dm.val_dataloader(), list)
    target_test, source_test = dm.test_dataloader()
    target_batch, source_batch = next(iter(target_test)), next(iter(source_test))
    assert target_batch["path"] == source_batch["path"]
    assert torch.equal(source_batch["image"][:, 0], source_batch["image"][:, 1])
    assert (target_batch["label"] >= 0).all()
    oracle = make(surfaces_root, target_val=True)
    source_val, target_val = oracle.val_dataloader()
    assert next(iter(target_val))["path"] == next(iter(source_val))["path"]
    assert oracle.run_tag.endswith("-da-oracle") and oracle.describe()["target_val_oracle"]
    assert PairedDomainDataModule.test_dataloader_names == ("target", "source")


def test_batch_larger_than_train_split(surfaces_root):
    with pytest.raises(ValueError, match="train split of 'grass' has 15 images, fewer than batch_size=64"):
        PairedDomainDataModule(root=str(surfaces_root), category="grass", batch_size=64).setup("fit")
