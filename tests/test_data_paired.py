from collections import Counter

import numpy as np
import pytest
import torch

from datamodules import Domain, PairedDomainDataModule


def gray_grass(root) -> Domain:
    return Domain(dataset="surfaces", root=str(root), category="grass", shift="gray")


def make(root, **kwargs):
    dm = PairedDomainDataModule(source=gray_grass(root), image_size=32, batch_size=4, **kwargs)
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
        PairedDomainDataModule(source=gray_grass(surfaces_root), batch_size=64).setup("fit")


def test_square_symmetries_are_the_eight_distinct_ones():
    from datamodules.dataset import square_symmetry

    asymmetric = np.arange(12).reshape(3, 4)[:3, :3]
    images = {square_symmetry(asymmetric, s).tobytes() for s in range(8)}
    assert len(images) == 8 and np.array_equal(square_symmetry(asymmetric, 0), asymmetric)
    assert np.array_equal(square_symmetry(asymmetric, 4), asymmetric[:, ::-1])


def test_symmetry_augment_moves_image_and_mask_together_and_only_in_training(surfaces_root):
    dm = make(surfaces_root, symmetry_augment=True)
    plain = make(surfaces_root)
    train = dm.source_train
    defective = next(i for i, s in enumerate(train.samples) if s.has_mask)
    n = len(train)
    drawn = [train[defective + epoch * n] for epoch in range(6)]
    original = plain.source_train[defective]
    matched = 0
    for item in drawn:
        # the symmetry that maps the original mask onto this one must also map the image
        for s in range(8):
            turned_mask = square_symmetry_t(original["mask"], s)
            if torch.equal(turned_mask, item["mask"]) and torch.allclose(square_symmetry_t(original["image"], s),
                                                                          item["image"]):
                matched += 1
                break
    assert matched == len(drawn)
    assert len({item["image"].numpy().tobytes() for item in drawn}) > 1  # epochs draw afresh
    assert torch.equal(train[defective + n]["image"], drawn[1]["image"])  # the same key, the same draw
    assert dm.source_val.symmetry_seed is None and dm.target_test.symmetry_seed is None
    assert dm.target_train.symmetry_seed not in (None, train.symmetry_seed)


def test_adabn_statistics_loader_is_every_target_train_image_once_and_not_augmented(surfaces_root):
    dm = make(surfaces_root, symmetry_augment=True)
    plain = make(surfaces_root)
    batches = list(dm.target_statistics_dataloader())
    assert [p for b in batches for p in b["path"]] == [s.image_path for s in dm.target_train.samples]
    images = torch.cat([b["image"] for b in batches])
    assert torch.equal(images, torch.stack([plain.target_train[i]["image"] for i in range(len(plain.target_train))]))
    assert all((b["label"] < 0).all() for b in batches)  # labels stay hidden


def square_symmetry_t(tensor: torch.Tensor, symmetry: int) -> torch.Tensor:
    from datamodules.dataset import square_symmetry

    return torch.from_numpy(np.ascontiguousarray(square_symmetry(tensor.permute(1, 2, 0).numpy(), symmetry))).permute(2, 0, 1)
