"""The domain spec: resolution, parsing, every DataModule on two folders, and the bad-input cases."""

import logging
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cli import main
from datamodules import Domain, LODODataModule, OneClassDataModule, PairedDomainDataModule
from datamodules.domain import resolve_source, resolve_target
from datamodules.surfaces import default_embedded_root
from tests.conftest import make_folder_tree, write_image
from tests.test_data_configs import instantiate as instantiate_data

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--run.wandb", "false"]


def paths(dataset) -> list[str]:
    return [s.image_path for s in dataset.samples]


def under(root: Path, dataset) -> bool:
    return bool(dataset.samples) and all(p.startswith(str(root)) for p in paths(dataset))


def line_a(root, category="brick", **kwargs) -> Domain:
    return Domain(dataset="surfaces", root=str(root), category=category, **kwargs)


def line_b(root, **kwargs) -> Domain:
    return Domain(dataset="surfaces_line_b", root=str(root), **kwargs)


# ------------------------------------------------------------------------------------------------ resolution

def test_target_inherits_dataset_root_and_category_but_never_the_shift(tmp_path):
    source = resolve_source(Domain(dataset="folder", root=str(tmp_path / "a"), category=["pcb", "cap"], shift="gray"))
    assert (source.dataset, source.root, source.categories, source.shift) == ("folder", tmp_path / "a",
                                                                              ("pcb", "cap"), "gray")
    same = resolve_target(Domain(), source)
    assert same.same_images_as(source) and same.shift == "none"  # shift is not inherited
    assert resolve_target(Domain(shift="coljit"), source).shift == "coljit"
    other_root = resolve_target(Domain(root=str(tmp_path / "b")), source)
    assert (other_root.dataset, other_root.root, other_root.categories) == ("folder", tmp_path / "b", ("pcb", "cap"))
    assert not other_root.same_images_as(source) and other_root.folder_tag(source) == "folder_b"
    other_category = resolve_target(Domain(category="cap"), source)
    assert other_category.root == source.root and not other_category.same_images_as(source)
    assert resolve_target(Domain(root=str(tmp_path / "a" / ".." / "a")), source).same_images_as(source)


def test_a_user_folder_given_to_an_embedded_dataset_is_read_as_a_folder(surfaces_root, tmp_path):
    """The issue's command: the DANN config's surfaces source, a target root and category, no target.dataset."""
    user_folder = make_folder_tree(tmp_path / "line_b", categories=("pcb",))
    dm = PairedDomainDataModule(source=line_a(surfaces_root, "grass", shift="gray"),
                                target=Domain(root=str(user_folder), category="pcb"), image_size=32, batch_size=4)
    assert (dm.source.dataset, dm.target.dataset, dm.target.root) == ("surfaces", "folder", user_folder)
    dm.setup("fit")
    assert under(user_folder, dm.target_train) and dm.run_tag == "surfaces-grass-gray-to-folder-pcb-none-da"
    source = Domain(dataset="surfaces", root=str(user_folder), category="pcb")
    assert OneClassDataModule(source=source).source.dataset == "folder"


def test_root_is_inherited_only_within_the_same_dataset(tmp_path):
    source = resolve_source(Domain(dataset="surfaces", root=str(tmp_path / "line_a"), category="brick"))
    target = resolve_target(Domain(dataset="surfaces_line_b"), source)
    assert target.root == default_embedded_root("surfaces_line_b") and target.categories == ("brick",)
    assert target.folder_tag(source) == "surfaces_line_b"
    with pytest.raises(ValueError, match="target.dataset='mvtec' needs target.root=<folder of the dataset>"):
        resolve_target(Domain(dataset="mvtec"), source)


def test_domain_keys_parse_from_the_command_line_and_yaml(surfaces_root, surfaces_line_b_root, tmp_path):
    cli = main(["test", "--model", "tests.toy.ToyDetector", "--config", str(REPO / "configs/data/one_class_surfaces.yaml"),
                *QUIET, "--run.root", str(tmp_path), "--data.init_args.source.root", str(surfaces_root),
                "--data.init_args.source.shift", "null",  # jsonargparse gives the string "None" here
                "--data.init_args.target.dataset", "folder", "--data.init_args.target.root", str(surfaces_line_b_root),
                "--data.init_args.target.category", "grass", "--data.init_args.target.shift", "null",
                "--data.init_args.image_size", "32"])
    dm = cli.datamodule
    assert (dm.source.dataset, dm.source.root, dm.source.categories, dm.source.shift) == (
        "surfaces", surfaces_root, ("brick",), "none")
    assert (dm.target.dataset, dm.target.root, dm.target.categories, dm.target.shift) == (
        "folder", surfaces_line_b_root, ("grass",), "none")
    assert dm.run_tag == "surfaces-brick-none-to-folder-grass-none"
    assert dm.hparams["target"] == {"dataset": "folder", "root": str(surfaces_line_b_root), "category": "grass",
                                    "shift": None, "name": None}

    pair = instantiate_data(REPO / "configs/data/paired_surfaces_line_b.yaml",
                            f"--data.init_args.source.root={surfaces_root}",
                            f"--data.init_args.target.root={surfaces_line_b_root}")
    assert (pair.source.shift, pair.target.dataset, pair.target.root) == ("none", "surfaces_line_b",
                                                                        surfaces_line_b_root)
    assert pair.run_tag == "surfaces-brick-none-to-surfaces_line_b-brick-none-da"

    lodo = instantiate_data(REPO / "configs/data/lodo_surfaces.yaml", f"--data.init_args.source.root={surfaces_root}",
                            "--data.init_args.domains", f"[brick, grass, {{dataset: surfaces_line_b, root: "
                            f"{surfaces_line_b_root}, category: wood, name: wood_b}}]",
                            "--data.init_args.held_out", "wood_b")
    assert lodo.domains == ["brick", "grass", "wood_b"] and lodo.target.root == surfaces_line_b_root
    assert lodo.hparams["domains"][2] == {"dataset": "surfaces_line_b", "root": str(surfaces_line_b_root),
                                          "category": "wood", "shift": None, "name": "wood_b"}


# ------------------------------------------------------------------------------------------------ two folders

def test_one_class_trains_on_one_line_and_tests_both(surfaces_root, surfaces_line_b_root):
    dm = OneClassDataModule(source=line_a(surfaces_root), target=line_b(surfaces_line_b_root), image_size=32,
                            batch_size=4, target_shots=2, fold=1)
    dm.setup("fit")
    assert under(surfaces_root, dm.train_dataset) and under(surfaces_root, dm.val_dataset)
    assert under(surfaces_line_b_root, dm.test_dataset) and under(surfaces_root, dm.source_test_dataset)
    assert dm.test_dataloader_names == ("target", "source")
    target_test, source_test = dm.test_dataloader()
    assert target_test.dataset is dm.test_dataset and source_test.dataset is dm.source_test_dataset
    shots = paths(dm.target_shots_dataset)
    assert len(shots) == 2 and all(p.startswith(str(surfaces_line_b_root)) and "/train/good/" in p for p in shots)
    assert dm.run_tag == "surfaces-brick-none-to-surfaces_line_b-brick-none-k2-f1"
    described = dm.describe()
    assert (described["dataset"], described["target_dataset"], described["target_root"],
            described["target_category"]) == ("surfaces", "surfaces_line_b", str(surfaces_line_b_root), "brick")

    full = OneClassDataModule(source=line_a(surfaces_root), target=line_b(surfaces_line_b_root), image_size=32,
                              batch_size=4, train_on="target", target_shots=2, fold=1)
    full.setup("fit")
    assert under(surfaces_line_b_root, full.train_dataset) and under(surfaces_line_b_root, full.val_dataset)
    assert not set(paths(full.train_dataset)) & set(paths(full.val_dataset))
    assert set(shots) <= set(paths(full.train_dataset))  # shots come from the target's train minus its hold-out
    pooled = OneClassDataModule(source=line_a(surfaces_root), target=line_b(surfaces_line_b_root), image_size=32,
                                batch_size=4, train_on="source+target_shots", target_shots=2, fold=1)
    pooled.setup("fit")
    assert len(pooled.train_dataset) == len(dm.train_dataset) + 2


def test_one_class_synthetic_shift_keeps_one_split_and_adds_the_source_test(surfaces_root):
    plain = OneClassDataModule(source=line_a(surfaces_root), image_size=32)
    shifted = OneClassDataModule(source=line_a(surfaces_root), target=Domain(shift="gray"), image_size=32)
    plain.setup("fit")
    shifted.setup("fit")
    assert plain.test_dataloader_names == ("target",) and len(plain.test_dataloader()) == 1
    assert shifted.test_dataloader_names == ("target", "source")
    assert paths(shifted.source_test_dataset) == paths(shifted.test_dataset) == paths(plain.test_dataset)
    assert (shifted.test_dataset.shift.name, shifted.source_test_dataset.shift.name) == ("gray", "none")
    assert "target_dataset" not in shifted.describe() and shifted.run_tag == "surfaces-brick-none-to-gray"


def test_paired_splits_the_target_folder_on_its_own(surfaces_root, surfaces_line_b_root):
    dm = PairedDomainDataModule(source=line_a(surfaces_root, "grass"), target=line_b(surfaces_line_b_root),
                                image_size=32, batch_size=4, target_val=True)
    dm.setup("fit")
    for name in ("source_train", "source_val", "source_test"):
        assert under(surfaces_root, getattr(dm, name))
    for name in ("target_train", "target_statistics", "target_val_dataset", "target_test"):
        assert under(surfaces_line_b_root, getattr(dm, name))
    target = [paths(dm.target_train), paths(dm.target_val_dataset), paths(dm.target_test)]
    assert sum(map(len, target)) == 21 and len(set().union(*target)) == 21  # every image once, no overlap
    assert dm.target_train.hide_labels and not dm.target_test.hide_labels
    assert dm.run_tag == "surfaces-grass-none-to-surfaces_line_b-grass-none-da-oracle"
    target_test, source_test = dm.test_dataloader()
    assert target_test.dataset is dm.target_test and source_test.dataset is dm.source_test


def test_lodo_domains_may_be_full_specs_and_the_target_overrides_the_held_out_one(surfaces_root,
                                                                                 surfaces_line_b_root):
    source = Domain(dataset="surfaces", root=str(surfaces_root))
    mixed = LODODataModule(source=source, domains=["brick", Domain(category="grass", shift="gray"),
                                                   line_b(surfaces_line_b_root, category="wood", name="wood_b")],
                           held_out="wood_b", image_size=32, batch_size=4, num_references=3)
    mixed.setup("fit")
    assert mixed.domains == ["brick", "grass", "wood_b"] and mixed.test_dataloader_names == ("target",)
    assert under(surfaces_line_b_root, mixed.test_dataset) and under(surfaces_line_b_root, mixed.reference_dataset())
    assert {s.domain for s in mixed.test_dataset.samples} == {"wood_b"}
    assert (mixed.test_dataset[0]["domain_index"]) == 2
    queries = mixed.train_dataset.queries
    grass = next(i for i, s in enumerate(queries.samples) if s.domain == "grass")
    brick = next(i for i, s in enumerate(queries.samples) if s.domain == "brick")
    assert torch.equal(queries[grass]["image"][0], queries[grass]["image"][2])  # its own gray shift
    assert not torch.equal(queries[brick]["image"][0], queries[brick]["image"][2])
    assert mixed.run_tag == "surfaces-to-surfaces_line_b-lodo-wood_b-ref100"

    held = LODODataModule(source=source, domains=["brick", "grass", "wood"], held_out="wood",
                          target=line_b(surfaces_line_b_root), image_size=32, batch_size=4, num_references=3)
    held.setup("fit")
    assert under(surfaces_line_b_root, held.test_dataset) and under(surfaces_line_b_root, held.reference_dataset())
    assert all(s.domain == "wood" for s in held.test_dataset.samples)
    assert under(surfaces_root, held.train_dataset.queries)


@pytest.fixture
def unusual_target(tmp_path) -> Path:
    """A user folder unlike the source: other sizes, gray and RGB files mixed, no ground_truth/, other counts."""
    root = make_folder_tree(tmp_path / "line_b", categories=("brick",), train=9, test_good=3,
                            defects={"dent": 3}, with_masks=False)
    for index, path in enumerate(sorted(root.rglob("*.png"))):
        if index % 2:
            gray = np.random.default_rng(index).integers(0, 256, (70, 50), dtype=np.uint8)
            assert cv2.imwrite(str(path), gray)
    write_image(root / "brick" / "train" / "good" / "big.png", 99, size=(120, 90))
    return root


def test_unusual_target_folders_are_handled(surfaces_root, unusual_target):
    one_class = OneClassDataModule(source=line_a(surfaces_root), target=Domain(dataset="folder", root=str(unusual_target)),
                                   image_size=32, batch_size=16, target_shots=2, num_folds=2)
    one_class.setup("fit")
    target_test, source_test = one_class.test_dataloader()
    target_batch, source_batch = next(iter(target_test)), next(iter(source_test))
    assert target_batch["image"].shape == (6, 3, 32, 32) and not target_batch["has_mask"].any()
    assert set(target_batch["label"].tolist()) == {0, 1} and source_batch["has_mask"].all()
    assert next(iter(one_class.target_train_dataloader()))["image"].shape == (2, 3, 32, 32)

    paired = PairedDomainDataModule(source=line_a(surfaces_root, shift=None),
                                    target=Domain(dataset="folder", root=str(unusual_target)), image_size=32,
                                    batch_size=2)
    paired.setup("fit")
    assert len(paired.source_train) != len(paired.target_train)
    loaders = paired.train_dataloader()
    assert next(iter(loaders["source"]))["image"].shape == (2, 3, 32, 32)
    target = next(iter(loaders["target"]))
    assert target["image"].shape == (2, 3, 32, 32) and (target["label"] == -1).all()


def test_checkpoint_stores_plain_domain_hyperparameters(surfaces_root, surfaces_line_b_root, tmp_path):
    """fit -> checkpoint -> test --ckpt_path: the DataModule's hyperparameters load with weights_only."""
    args = ["--model", "tests.toy.ToyDetector", "--config", str(REPO / "configs/data/one_class_surfaces_line_b.yaml"),
            *QUIET, "--run.root", str(tmp_path), f"--data.init_args.source.root={surfaces_root}",
            f"--data.init_args.target.root={surfaces_line_b_root}", "--data.init_args.image_size", "32",
            "--data.init_args.batch_size", "4"]
    main(["fit", *args, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1"])
    (checkpoint,) = tmp_path.glob("toy/*/version_0/checkpoints/last.ckpt")
    stored = torch.load(checkpoint, weights_only=True)["datamodule_hyper_parameters"]
    assert stored["source"] == {"dataset": "surfaces", "root": str(surfaces_root), "category": "brick", "shift": None,
                                "name": None}
    assert stored["target"]["root"] == str(surfaces_line_b_root)
    again = OneClassDataModule(**{k: v for k, v in stored.items() if not k.startswith("_")})
    assert again.run_tag == "surfaces-brick-none-to-surfaces_line_b-brick-none"
    main(["test", *args, "--ckpt_path", str(checkpoint)])
    assert list(tmp_path.glob("toy/*/version_1/results.json"))
    built_in_python = OneClassDataModule(source=line_a(surfaces_root), target=line_b(surfaces_line_b_root))
    torch.save(dict(built_in_python.hparams_initial), tmp_path / "hparams.pt")
    assert torch.load(tmp_path / "hparams.pt", weights_only=True)["target"]["dataset"] == "surfaces_line_b"


# ------------------------------------------------------------------------------------------------ bad input

def test_a_missing_or_empty_target_root_names_the_target_and_the_folder(surfaces_root, tmp_path):
    source = line_a(surfaces_root)
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=f"^target domain: folder root '{missing}' does not exist"):
        OneClassDataModule(source=source, target=Domain(dataset="folder", root=str(missing)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"^target domain: the folder '{empty}' is empty; expected its "
                                                "categories in it \\(brick\\)"):
        PairedDomainDataModule(source=source, target=Domain(dataset="folder", root=str(empty)))


def test_a_category_missing_in_the_target_root(surfaces_root, surfaces_line_b_root):
    with pytest.raises(FileNotFoundError, match="^target domain: folder category 'marble' not found under "
                                                f"'{surfaces_line_b_root}'; available: brick, grass"):
        OneClassDataModule(source=line_a(surfaces_root),
                           target=Domain(dataset="folder", root=str(surfaces_line_b_root), category="marble"))


def test_a_target_category_without_train_normals_where_shots_are_asked(surfaces_root, tmp_path):
    root = make_folder_tree(tmp_path / "b", categories=("brick",), train=0)
    dm = OneClassDataModule(source=line_a(surfaces_root), target=Domain(dataset="folder", root=str(root)),
                            image_size=32, target_shots=1, train_on="target_shots")
    with pytest.raises(FileNotFoundError, match=f"^target domain: missing folder '{root / 'brick' / 'train' / 'good'}'"):
        dm.setup("fit")


def test_more_shots_than_the_target_has(surfaces_root, surfaces_line_b_root):
    dm = OneClassDataModule(source=line_a(surfaces_root), target=line_b(surfaces_line_b_root), image_size=32,
                            target_shots=12, num_folds=1)
    with pytest.raises(ValueError, match=f"^target domain \\(surfaces_line_b at '{surfaces_line_b_root}'\\): "
                                         "target_shots=12 exceeds the 11 target normals available in brick"):
        dm.setup("fit")


def test_a_shift_on_a_target_folder_that_already_differs_is_said_once(surfaces_root, surfaces_line_b_root, caplog):
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
            OneClassDataModule(source=line_a(surfaces_root), target=line_b(surfaces_line_b_root, shift="gray"))
    finally:
        logger.removeHandler(caplog.handler)
    said = list({id(r): r.getMessage() for r in caplog.records if "applied on top of a target" in r.getMessage()}.values())
    assert len(said) == 1 and "gray" in said[0] and str(surfaces_line_b_root) in said[0]


def test_the_same_images_without_a_shift_warn_only_when_a_target_is_given(surfaces_root):
    with pytest.warns(UserWarning, match="same images .* there is no domain shift"):
        OneClassDataModule(source=line_a(surfaces_root), target=Domain(root=str(surfaces_root)))
    with pytest.warns(UserWarning, match="there is no domain shift"):
        PairedDomainDataModule(source=line_a(surfaces_root, "grass"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OneClassDataModule(source=line_a(surfaces_root))  # one domain: nothing to say


def test_bad_domain_values(surfaces_root, surfaces_line_b_root, tmp_path):
    with pytest.raises(ValueError, match="^target.dataset: unknown dataset 'mvtecad'"):
        OneClassDataModule(source=line_a(surfaces_root), target=Domain(dataset="mvtecad", root=str(tmp_path)))
    with pytest.raises(ValueError, match="^source.category is not set"):
        OneClassDataModule(source=Domain(dataset="surfaces", root=str(surfaces_root)))
    with pytest.raises(ValueError, match="^source: needs exactly one category, got \\['brick', 'grass'\\]"):
        PairedDomainDataModule(source=line_a(surfaces_root, ["brick", "grass"]))
    with pytest.raises(ValueError, match="^target domain: dataset='surfaces' expects a build of surfaces line 'a' but "
                                         f"'{surfaces_line_b_root}' holds line 'b'"):
        OneClassDataModule(source=line_a(surfaces_root), target=Domain(root=str(surfaces_line_b_root)))
    with pytest.raises(ValueError, match="LODO takes its domains from domains=\\[...\\], not source.category"):
        LODODataModule(source=line_a(surfaces_root))
