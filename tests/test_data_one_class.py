import pytest
import torch

from datamodules import Domain, OneClassDataModule
from datamodules.shifts import Shift

SAMPLE_KEYS = {"image", "label", "mask", "has_mask", "defect_type", "domain", "domain_index", "path"}


def paths(dataset):
    return {dataset[i]["path"] for i in range(len(dataset))}


def make(root, category="brick", dataset="surfaces", source_shift=None, target_shift=None, target=None, **kwargs):
    """A set-up OneClassDataModule on ``root``; ``target`` (a Domain) replaces the ``target_shift`` one."""
    source = Domain(dataset=dataset, root=str(root), category=category, shift=source_shift)
    dm = OneClassDataModule(source=source, target=target or Domain(shift=target_shift), image_size=32, batch_size=4,
                            **kwargs)
    dm.setup("fit")
    return dm


def test_batches_follow_the_contract(surfaces_root):
    dm = make(surfaces_root, category="grass", source_shift="gray", target_shift="brg")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), *dm.test_dataloader()):
        batch = next(iter(loader))
        size = min(4, len(loader.dataset))
        assert set(batch) == SAMPLE_KEYS
        assert batch["image"].shape == (size, 3, 32, 32) and batch["image"].dtype == torch.float32
        assert batch["mask"].shape == (size, 1, 32, 32) and batch["label"].dtype == torch.int64
        assert batch["has_mask"].dtype == torch.bool and batch["domain"] == ["grass"] * size
    train = next(iter(dm.train_dataloader()))
    assert (train["label"] == 0).all() and torch.equal(train["image"][:, 0], train["image"][:, 1])  # gray source
    labels = torch.cat([b["label"] for b in dm.test_dataloader()[0]])
    assert set(labels.tolist()) == {0, 1}


def test_val_is_held_out_from_train_and_never_test(surfaces_root):
    dm = make(surfaces_root, category="wood", val_fraction=0.25)
    train, val, test = paths(dm.train_dataset), paths(dm.val_dataset), paths(dm.test_dataset)
    assert len(val) == 3 and len(train) == 9
    assert not train & val and not (train | val) & test
    assert all("/train/good/" in p for p in val)


def test_test_split_uses_the_target_shift(surfaces_root):
    dm = make(surfaces_root, category="woven", source_shift="gray", target_shift="coljit")
    item = dm.test_dataset[0]
    plain = make(surfaces_root, category="woven").test_dataset[0]
    expected = Shift("coljit")((plain["image"].permute(1, 2, 0) * 255).round().byte().numpy())
    assert torch.allclose(item["image"], torch.from_numpy(expected).permute(2, 0, 1).float() / 255)


def test_pooled_categories_get_their_domain_index(surfaces_root):
    dm = make(surfaces_root, category=["gravel", "brick", "wood"])
    batch = next(iter(dm._loader(dm.test_dataset, batch_size=len(dm.test_dataset))))
    for domain, index in zip(batch["domain"], batch["domain_index"].tolist(), strict=True):
        assert ["gravel", "brick", "wood"][index] == domain
    assert dm.describe()["category"] == "gravel,brick,wood"
    assert dm.run_tag == "surfaces-gravel+brick+wood-none-to-none"


def test_few_shot_folds_are_disjoint_and_seeded(surfaces_root):
    shots = [paths(make(surfaces_root, category="brick", target_shots=2, fold=f).target_shots_dataset)
             for f in range(5)]
    assert all(len(s) == 2 for s in shots)
    assert len(set().union(*shots)) == 10
    dm = make(surfaces_root, category="brick", target_shots=2, fold=1, target_shift="gray")
    assert paths(dm.target_shots_dataset) == shots[1]
    assert not paths(dm.target_shots_dataset) & (paths(dm.val_dataset) | paths(dm.test_dataset))
    assert paths(make(surfaces_root, category="brick", target_shots=2, fold=1, seed=7).target_shots_dataset) != shots[1]
    batch = next(iter(dm.target_train_dataloader()))
    assert batch["image"].shape[0] == 2 and torch.equal(batch["image"][:, 0], batch["image"][:, 2])


@pytest.mark.parametrize(("train_on", "size"), [("source", 11), ("target", 11), ("target_shots", 1),
                                                ("source+target_shots", 12)])
def test_train_on_switch(surfaces_root, train_on, size):
    dm = make(surfaces_root, category="terrazzo", target_shots=1, train_on=train_on, source_shift="gray",
              target_shift="fda")
    assert len(dm.train_dataset) == size
    assert dm.describe()["train_on"] == train_on and dm.describe()["shots"] == 1
    assert "/" not in dm.run_tag and " " not in dm.run_tag


def test_too_many_shots(surfaces_root):
    with pytest.raises(ValueError, match="target_shots=12 exceeds the 11 target normals available in brick"):
        make(surfaces_root, category="brick", target_shots=12, num_folds=1)
    with pytest.raises(ValueError, match="target_shots=5 x num_folds=5 needs 25 disjoint"):
        make(surfaces_root, category="brick", target_shots=5)


def test_bad_arguments_fail_at_construction(surfaces_root):
    source = Domain(dataset="surfaces", root=str(surfaces_root), category="brick")
    with pytest.raises(ValueError, match="target.shift: unknown shift 'sepia'"):
        OneClassDataModule(source=source, target=Domain(shift="sepia"))
    with pytest.raises(ValueError, match="train_on='target_shots' needs target_shots"):
        OneClassDataModule(source=source, train_on="target_shots")
    with pytest.raises(ValueError, match="fold must be in"):
        OneClassDataModule(source=source, target_shots=1, fold=5)
    with pytest.raises(ValueError, match="source: unknown surfaces category \\['marble'\\]"):
        OneClassDataModule(source=Domain(dataset="surfaces", root=str(surfaces_root.parent / "unbuilt"),
                                         category="marble"))


@pytest.mark.parametrize(("dataset", "fixture", "category"), [("mvtec", "mvtec_root", "carpet"),
                                                              ("visa", "visa_root", "candle"),
                                                              ("btad", "btad_root", "01")])
def test_real_dataset_layouts_load(request, dataset, fixture, category):
    dm = make(request.getfixturevalue(fixture), dataset=dataset, category=category, target_shift="histmatch")
    batch = next(iter(dm._loader(dm.test_dataset, batch_size=len(dm.test_dataset))))
    assert batch["has_mask"].all() and (batch["mask"].flatten(1).amax(1) == batch["label"].float()).all()
    assert dm.run_tag == f"{dataset}-{category}-none-to-histmatch"


def test_missing_real_root_fails_at_construction(tmp_path):
    with pytest.raises(FileNotFoundError, match="visa root .*absent.* does not exist; expected <root>/split_csv"):
        OneClassDataModule(source=Domain(dataset="visa", root=str(tmp_path / "absent"), category="candle"))
    with pytest.raises(ValueError, match="source.dataset='mvtec' needs source.root="):
        OneClassDataModule(source=Domain(dataset="mvtec", category="bottle"))
