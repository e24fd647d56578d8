from pathlib import Path

import pytest
from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.pytorch import LightningDataModule

import datamodules

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "data").glob("*.yaml"))
SURFACES_CONFIGS = [c for c in CONFIGS if "surfaces" in c.name]
REAL_CONFIGS = [c for c in CONFIGS if "surfaces" not in c.name]


def instantiate(config: Path, *overrides: str) -> LightningDataModule:
    """Parse a data config the way LightningCLI does (``class_path``/``init_args`` under ``data``)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_subclass_arguments(LightningDataModule, "data", required=True)
    return parser.instantiate(parser.parse_args(["--config", str(config), *overrides])).data


def test_every_protocol_has_a_surfaces_and_a_real_config():
    names = {c.stem for c in CONFIGS}
    for protocol in ("paired", "one_class", "fewshot", "lodo"):
        assert f"{protocol}_surfaces" in names and any(n.startswith(protocol) and "surfaces" not in n for n in names)
    assert {"one_class_visa", "fewshot_visa", "paired_mvtec", "lodo_mvtec", "lodo_mvtec_to_btad"} <= names


@pytest.mark.parametrize("config", SURFACES_CONFIGS, ids=lambda c: c.stem)
def test_surfaces_configs_instantiate(config, surfaces_root):
    dm = instantiate(config, f"--data.init_args.source.root={surfaces_root}")
    assert type(dm).__name__ in datamodules.__all__
    assert dm.run_tag.startswith("surfaces-") and dm.describe()["dataset"] == "surfaces"


@pytest.mark.parametrize("config", REAL_CONFIGS, ids=lambda c: c.stem)
def test_real_configs_name_the_missing_root(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # jsonargparse (as in LightningCLI) wraps the FileNotFoundError but keeps its message.
    with pytest.raises((FileNotFoundError, ValueError), match=r"root 'data/\w+' does not exist; expected <root>/"):
        instantiate(config)

