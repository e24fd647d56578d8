import pytest
import torch

from datamodules import Domain, LODODataModule, OneClassDataModule
from datamodules.surfaces import SURFACES_CATEGORIES

DOMAINS = ["brick", "grass", "wood"]


def make(root, dataset="surfaces", **kwargs):
    kwargs = {"image_size": 32, "batch_size": 4, "num_references": 3, **kwargs}
    dm = LODODataModule(source=Domain(dataset=dataset, root=str(root)), **kwargs)
    dm.setup("fit")
    return dm


def test_training_episodes_pair_queries_with_normals_of_their_own_domain(surfaces_root):
    dm = make(surfaces_root, domains=DOMAINS, held_out="wood")
    batch = next(iter(dm.train_dataloader()))
    assert batch["references"].shape == (4, 3, 3, 32, 32) and batch["query"]["image"].shape == (4, 3, 32, 32)
    queries = {s.image_path: s for s in dm.train_dataset.queries.samples}
    assert {s.domain for s in queries.values()} == {"brick", "grass"}
    assert {s.label for s in queries.values()} == {0, 1}
    for index in range(len(dm.train_dataset)):
        episode = dm.train_dataset[index]
        for reference in episode["references"]:
            source = [s for i, s in enumerate(dm.train_dataset.normals.samples)
                      if torch.equal(dm.train_dataset.normals[i]["image"], reference)]
            assert source and all(s.domain == episode["query"]["domain"] and s.label == 0 for s in source)
            assert all(s.image_path != episode["query"]["path"] for s in source)
        if index == 3:
            break


def test_validation_episodes_are_fixed_and_held_out(surfaces_root):
    dm = make(surfaces_root, domains=DOMAINS, held_out="wood", val_fraction=0.2)
    first, second = next(iter(dm.val_dataloader())), next(iter(dm.val_dataloader()))
    assert torch.equal(first["references"], second["references"])
    val = {s.image_path for s in dm.val_dataset.queries.samples}
    assert val and not val & {s.image_path for s in dm.train_dataset.queries.samples}


def test_test_and_references_come_only_from_the_held_out_domain(surfaces_root):
    dm = make(surfaces_root, domains=DOMAINS, held_out="grass", reference_fraction=0.5)
    test = next(iter(dm._loader(dm.test_dataset, batch_size=len(dm.test_dataset))))
    assert set(test["domain"]) == {"grass"} and (test["domain_index"] == 1).all()
    assert set(test["label"].tolist()) == {0, 1}
    references = dm.reference_dataset().samples
    assert len(references) == 6 and all(s.domain == "grass" and "/train/good/" in s.image_path for s in references)
    assert dm.reference_images().shape == (6, 3, 32, 32)
    assert {s.image_path for s in references} != {s.image_path for s in make(
        surfaces_root, domains=DOMAINS, held_out="grass", reference_fraction=0.5, seed=1).reference_dataset().samples}
    assert dm.run_tag == "surfaces-lodo-grass-ref50"
    assert dm.describe()["held_out"] == "grass" and dm.describe()["reference_fraction"] == 0.5


def test_default_domains_are_every_surfaces_category(surfaces_root):
    dm = LODODataModule(source=Domain(dataset="surfaces", root=str(surfaces_root)), held_out="woven")
    assert dm.domains == list(SURFACES_CATEGORIES) and "woven" not in dm.source_domains


def test_cross_dataset_held_out(mvtec_root, btad_root):
    dm = make(mvtec_root, dataset="mvtec", domains=["bottle", "carpet", "01"], held_out="01",
              target=Domain(dataset="btad", root=str(btad_root)))
    assert {s.domain for s in dm.test_dataset.samples} == {"01"}
    assert all(p.endswith(".bmp") for p in (s.image_path for s in dm.test_dataset.samples))
    assert dm.run_tag == "mvtec-to-btad-lodo-01-ref100"


def test_bad_lodo_arguments(surfaces_root, tmp_path):
    source = Domain(dataset="surfaces", root=str(surfaces_root))
    with pytest.raises(ValueError, match="held_out='tile' is not in domains \\['brick', 'grass', 'wood'\\]"):
        LODODataModule(source=source, domains=DOMAINS, held_out="tile")
    with pytest.raises(ValueError, match="reference_fraction must be in \\[0.1, 1.0\\], got 0.05"):
        LODODataModule(source=source, domains=DOMAINS, held_out="wood", reference_fraction=0.05)
    with pytest.raises(ValueError, match="num_references=20 needs at least 21"):
        make(surfaces_root, domains=DOMAINS, held_out="wood", num_references=20)
    with pytest.raises(FileNotFoundError, match="target domain: btad root .*missing.* does not exist"):
        LODODataModule(source=source, domains=["brick", "01"], held_out="01",
                       target=Domain(dataset="btad", root=str(tmp_path / "missing")))


def test_shot_references_are_the_images_of_one_class_target_shots(surfaces_root, surfaces_line_b_root):
    """The k-NN/comparer rows with k shots of fold f see exactly PaDiM's k_only/recalibrated shots."""
    pair = [Domain(dataset="surfaces", root=str(surfaces_root), category="brick", name="source"),
            Domain(dataset="surfaces_line_b", root=str(surfaces_line_b_root), category="brick", name="target")]
    for k, fold, seed in ((1, 0, 0), (2, 1, 0), (2, 4, 3)):
        lodo = make(surfaces_root, domains=pair, held_out="target", references_from="target_shots", target_shots=k,
                    fold=fold, seed=seed)
        one_class = OneClassDataModule(source=Domain(dataset="surfaces", root=str(surfaces_root), category="brick"),
                                       target=Domain(dataset="surfaces_line_b", root=str(surfaces_line_b_root)),
                                       image_size=32, train_on="target_shots", target_shots=k, fold=fold, seed=seed)
        one_class.setup("fit")
        shots = [s.image_path for s in lodo.reference_dataset().samples]
        assert len(shots) == k and shots == [s.image_path for s in one_class.target_shots_dataset.samples]
        assert all(str(surfaces_line_b_root) in path for path in shots)
        assert lodo.run_tag == f"surfaces-to-surfaces_line_b-lodo-target-refs-shots-k{k}-f{fold}"
        assert lodo.describe()["references_from"] == "target_shots"
        assert (lodo.describe()["shots"], lodo.describe()["fold"]) == (k, fold)


def test_source_references_pool_the_source_domains_train_normals(surfaces_root):
    dm = make(surfaces_root, domains=DOMAINS, held_out="wood", references_from="source")
    references = dm.reference_dataset().samples
    assert {s.domain for s in references} == {"brick", "grass"}
    assert all("/train/good/" in s.image_path for s in references)
    assert len(references) == 24 and dm.reference_images().shape == (24, 3, 32, 32)
    assert dm.run_tag == "surfaces-lodo-wood-refs-source" and dm.describe()["shots"] is None
    both = make(surfaces_root, domains=DOMAINS, held_out="wood", references_from="source+target_shots",
                target_shots=2, fold=1)
    shots = make(surfaces_root, domains=DOMAINS, held_out="wood", references_from="target_shots", target_shots=2,
                 fold=1)
    assert ([s.image_path for s in both.reference_dataset().samples]
            == [s.image_path for s in references + shots.reference_dataset().samples])
    assert both.run_tag == "surfaces-lodo-wood-refs-source+shots-k2-f1"
    tags = {make(surfaces_root, domains=DOMAINS, held_out="wood").run_tag, dm.run_tag, both.run_tag, shots.run_tag}
    assert len(tags) == 4


def test_bad_reference_choices_name_the_key_and_what_is_expected(surfaces_root):
    source = Domain(dataset="surfaces", root=str(surfaces_root))
    with pytest.raises(ValueError, match="references_from must be one of source, target_shots, "
                                         "source\\+target_shots, target, got 'shots'"):
        LODODataModule(source=source, domains=DOMAINS, held_out="wood", references_from="shots")
    with pytest.raises(ValueError, match="references_from='target_shots' needs target_shots"):
        LODODataModule(source=source, domains=DOMAINS, held_out="wood", references_from="target_shots")
    with pytest.raises(ValueError, match="target_shots=5 is used only by references_from=target_shots or "
                                         "source\\+target_shots, got references_from='source'"):
        LODODataModule(source=source, domains=DOMAINS, held_out="wood", references_from="source", target_shots=5)
    with pytest.raises(ValueError, match="reference_fraction=0.5 applies to references_from=target only"):
        LODODataModule(source=source, domains=DOMAINS, held_out="wood", references_from="source",
                       reference_fraction=0.5)
    with pytest.raises(ValueError, match="fold must be in \\[0, num_folds=3\\), got 3"):
        LODODataModule(source=source, domains=DOMAINS, held_out="wood", references_from="target_shots",
                       target_shots=1, fold=3, num_folds=3)
    with pytest.raises(ValueError, match="target domain .*target_shots=12 exceeds the 11 target normals available "
                                         "in wood"):
        make(surfaces_root, domains=DOMAINS, held_out="wood", references_from="target_shots", target_shots=12)
