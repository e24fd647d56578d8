import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cli import main
from lightning_modules.components.backbone import BackboneSpec
from lightning_modules.meta_comparer import (
    FactorisedComparer,
    KNNPatchBaseline,
    MetaComparer,
    MetaComparerModel,
)
from lightning_modules.meta_comparer.losses import attention_loss, classification_loss, ranking_loss
from lightning_modules.meta_comparer.torch_model import _flat_patches

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "meta_comparer" / "surfaces.yaml")
FAST = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--run.wandb", "false",
        "--data.init_args.domains", "[brick, grass, wood]", "--data.init_args.held_out", "wood",
        "--data.init_args.image_size", "64", "--data.init_args.batch_size", "4",
        "--model.init_args.num_query_patches", "32", "--model.init_args.num_reference_patches", "48",
        "--model.init_args.rank_pairs", "64",
        "--trainer.val_check_interval", "null", "--trainer.check_val_every_n_epoch", "1",
        "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1"]


def fast_args(surfaces_root: Path, tmp_path: Path, steps: int = 2) -> list[str]:
    return ["--config", CONFIG, *FAST, "--data.init_args.source.root", str(surfaces_root), "--run.root", str(tmp_path),
            "--trainer.max_steps", str(steps)]


# ---------------------------------------------------------------------------------------------- losses


def bce(p: float, y: float) -> float:
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_classification_loss_matches_hand_computation():
    # two scales, two queries (normal, abnormal); the loss uses max_j s_i^j at every scale
    scale1 = torch.tensor([[-1.0, 0.5, -2.0], [0.2, 1.5, -0.3]])
    scale2 = torch.tensor([[0.0, -3.0], [-0.7, -0.1]])
    labels = torch.tensor([0, 1])
    expected = ((bce(sigmoid(0.5), 0) + bce(sigmoid(1.5), 1)) / 2
                + (bce(sigmoid(0.0), 0) + bce(sigmoid(-0.1), 1)) / 2)
    assert classification_loss([scale1, scale2], labels).item() == pytest.approx(expected, rel=1e-6)


def test_attention_loss_matches_hand_computation():
    normal = torch.tensor([[0.9, 0.6], [0.8, 0.95]])  # min 0.6
    abnormal = torch.tensor([[0.7, 0.2], [0.9, 0.85]])  # min 0.2
    attention = torch.stack([normal, abnormal])
    labels = torch.tensor([0, 1])
    expected = (-math.log(0.6) - math.log(1 - 0.2)) / 2
    assert attention_loss([attention], labels).item() == pytest.approx(expected, rel=1e-6)
    # summed over scales
    assert attention_loss([attention, attention], labels).item() == pytest.approx(2 * expected, rel=1e-6)


def test_ranking_loss_matches_hand_computation():
    logits = torch.tensor([[0.0, 2.0, -1.0]])
    guidance = torch.tensor([[0.9, 0.3, 0.9]])
    scale = 0.5
    s = [sigmoid(x) for x in (0.0, 2.0, -1.0)]
    a = [0.9, 0.3, 0.9]
    total = 0.0
    for u, v in ((0, 1), (0, 2), (1, 2)):
        w = scale * (math.exp(abs(a[u] - a[v])) - 1)
        sigma = -math.copysign(1.0, a[u] - a[v]) if a[u] != a[v] else 0.0
        total += w * max(0.0, 1 - sigma * (s[u] - s[v]))
    expected = total / 3  # the mean over the pairs
    assert ranking_loss([logits], [guidance], scale=scale, num_pairs=None).item() == pytest.approx(expected, rel=1e-6)
    # the less similar patch (1) scored higher is rewarded: swapping its score up lowers the loss
    better = torch.tensor([[0.0, 4.0, -1.0]])
    assert ranking_loss([better], [guidance], scale=scale).item() < expected


def test_ranking_loss_samples_distinct_pairs():
    generator = torch.Generator().manual_seed(0)
    logits, guidance = torch.randn(2, 5), torch.rand(2, 5)
    loss = ranking_loss([logits], [guidance], num_pairs=50, generator=generator)
    assert loss.item() > 0 and torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------- comparer


def naive_pooled_logits(comparer: FactorisedComparer, queries: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """MLP on every concatenated pair [q, r], then max (eq. 1) or min over the references."""
    weight = torch.cat([comparer.query_in.weight, comparer.reference_in.weight], dim=1)  # W = [W_q, W_r]
    pairs = torch.cat([queries[:, :, None].expand(-1, -1, references.shape[1], -1),
                       references[:, None].expand(-1, queries.shape[1], -1, -1)], dim=-1)
    logits = comparer.pair_head(F.linear(pairs, weight, comparer.query_in.bias)).squeeze(-1)
    return logits.amax(2) if comparer.reference_pooling == "max" else logits.amin(2)


@pytest.mark.parametrize("pooling", ["max", "min"])
@pytest.mark.parametrize("max_pair_elements", [2**25, 3 * 5 * 7])  # one chunk; chunks of one reference
def test_factorised_comparer_equals_the_concatenated_mlp(max_pair_elements, pooling):
    torch.manual_seed(0)
    comparer = FactorisedComparer(channels=6, hidden=[7, 5], max_pair_elements=max_pair_elements,
                                  reference_pooling=pooling).double()
    queries = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    references = torch.randn(3, 9, 6, dtype=torch.float64, requires_grad=True)
    fast = comparer(queries, references)
    naive = naive_pooled_logits(comparer, queries, references)
    torch.testing.assert_close(fast, naive, rtol=1e-12, atol=1e-12)
    # gradients agree too (chunks are recomputed in the backward pass)
    fast_grads = torch.autograd.grad(fast.sum(), [queries, references, comparer.query_in.weight])
    naive_grads = torch.autograd.grad(naive.sum(), [queries, references, comparer.query_in.weight])
    for fast_grad, naive_grad in zip(fast_grads, naive_grads, strict=True):
        torch.testing.assert_close(fast_grad, naive_grad, rtol=1e-10, atol=1e-12)


def test_episode_shapes_and_attention_range():
    model = MetaComparerModel(BackboneSpec(), layers=[2, 3, 4], channels=16, attention_dim=8, comparer_hidden=[8],
                              num_query_patches=10, num_reference_patches=12)
    out = model.episode(torch.rand(2, 3, 64, 64), torch.rand(2, 3, 3, 64, 64))
    # 64 px: 8x8, 4x4 and 2x2 positions; N_Q and N_R are capped by what exists
    assert [tuple(x.shape) for x in out.patch_logits] == [(2, 10), (2, 10), (2, 4)]
    assert [tuple(x.shape) for x in out.attention] == [(2, 10, 12), (2, 10, 12), (2, 4, 12)]
    for attention, guidance in zip(out.attention, out.guidance, strict=True):
        assert attention.min() >= 0 and attention.max() <= 1
        torch.testing.assert_close(guidance, attention.amax(2))


# ---------------------------------------------------------------------------------------------- inference


def test_anomaly_map_is_the_max_over_the_patches_containing_each_pixel():
    model = MetaComparerModel(BackboneSpec(), layers=[2, 3], channels=8, patch_size=3)
    # a planted abnormal patch at scale 1 (8x8 grid, stride 8 on a 64 px image), centre cell (2, 5)
    fine = torch.zeros(1, 8, 8)
    fine[0, 2, 5] = 5.0
    coarse = torch.full((1, 4, 4), 1.0)  # scale 2 (stride 16): a weaker score everywhere
    anomaly_map = model.anomaly_map([fine, coarse], (64, 64))[0]
    # the planted patch covers cells 1..3 x 4..6 = pixels 8..31 x 32..55; elsewhere scale 2's 1.0 wins
    expected = torch.ones(64, 64)
    expected[8:32, 32:56] = 5.0
    torch.testing.assert_close(anomaly_map, expected)


def test_image_score_is_the_max_of_the_anomaly_map():
    model = MetaComparerModel(BackboneSpec(), layers=[2, 3, 4], channels=16, comparer_hidden=[8])
    model.eval()
    with torch.no_grad():
        bank = model.reference_bank(torch.rand(3, 3, 64, 64), batch_size=2)
        assert [tuple(b.shape) for b in bank] == [(1, 3 * 64, 8), (1, 3 * 16, 8), (1, 3 * 4, 8)]  # every patch
        scores, maps = model(torch.rand(2, 3, 64, 64), bank)
    assert maps.shape == (2, 64, 64)
    torch.testing.assert_close(scores, maps.flatten(1).amax(1))


def test_scores_against_the_full_bank_in_chunks_equal_the_unchunked_scores():
    torch.manual_seed(0)
    model = MetaComparerModel(BackboneSpec(weights="random"), layers=[2, 3, 4], channels=16, comparer_hidden=[8])
    model.eval()
    queries = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        bank = model.reference_bank(torch.rand(5, 3, 64, 64), batch_size=2)
        # every pair of every scale at once: [B, h*w, M_i] logits, max over the bank
        whole = [model.comparer.pair_logits(model.comparer.query_in(_flat_patches(level)), references).amax(2)
                 for level, references in zip(model.encoder(queries), bank, strict=True)]
        for max_pair_elements in (2**25, 2 * 64 * 8 * 7):  # the default (CPU chunks); chunks of 7 references
            model.comparer.max_pair_elements = max_pair_elements
            chunked = model.patch_score_maps(queries, bank)
            for expected, actual in zip(whole, chunked, strict=True):
                torch.testing.assert_close(actual.flatten(1), expected)


def test_reference_bank_holds_every_patch_and_grows_with_the_reference_fraction(surfaces_root, tmp_path,
                                                                                monkeypatch):
    # the surfaces config at 128 px (16x16, 8x8, 4x4 patches per reference), tested untrained
    banks = []
    build = MetaComparerModel.reference_bank

    def recording(self, references, *args, **kwargs):
        bank = build(self, references, *args, **kwargs)
        banks.append((references.shape[0], [scale.shape[1] for scale in bank]))
        return bank

    monkeypatch.setattr(MetaComparerModel, "reference_bank", recording)
    finals = []  # the bank scored against; the ones before it are the threshold fit's halves of the references
    for fraction in ("0.25", "1.0"):
        main(["test", "--config", CONFIG, "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
              "--run.wandb", "false", "--run.root", str(tmp_path), "--data.init_args.source.root", str(surfaces_root),
              "--data.init_args.domains", "[brick, wood]", "--data.init_args.held_out", "wood",
              "--data.init_args.reference_fraction", fraction, "--trainer.limit_test_batches", "1"])
        finals.append(banks[-1])
    (few, few_bank), (all_refs, all_bank) = finals
    assert few < all_refs
    assert few_bank == [few * 256, few * 64, few * 16] and all_bank == [all_refs * 256, all_refs * 64, all_refs * 16]


def test_knn_baseline_map_peaks_on_a_planted_defect():
    torch.manual_seed(0)
    normals = 0.4 + 0.1 * torch.rand(4, 3, 64, 64)
    baseline = KNNPatchBaseline(layers=[1, 2])
    baseline.eval()
    baseline.scorer.fit(baseline.patch_features(normals).flatten(0, 2))
    query = 0.4 + 0.1 * torch.rand(1, 3, 64, 64)
    query[:, :, 40:52, 8:20] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    scores, maps = baseline.anomaly_scores(query)
    maps = F.interpolate(maps[:, None], size=(64, 64), mode="nearest")[0, 0]
    inside, outside = maps[40:52, 8:20].mean(), maps[:32, 32:].mean()
    assert inside > 2 * outside
    row, col = divmod(int(maps.argmax()), 64)
    assert 32 <= row < 60 and 0 <= col < 28
    assert scores.item() == pytest.approx(maps.max().item())


# ---------------------------------------------------------------------------------------------- arguments


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="cls_loss or rank_loss"):
        MetaComparer(cls_loss=False, rank_loss=False)
    with pytest.raises(ValueError, match="patch_size"):
        MetaComparer(patch_size=2)
    with pytest.raises(ValueError, match="num_query_patches"):
        MetaComparer(num_query_patches=0)
    with pytest.raises(ValueError, match="rank_pairs"):
        MetaComparer(rank_pairs=0)
    with pytest.raises(ValueError, match="reference_pooling"):
        MetaComparer(reference_pooling="mean")


def test_loss_switches_and_frozen_co_attention():
    model = MetaComparer(att_loss=False, channels=16, attention_dim=8, comparer_hidden=[8],
                         num_query_patches=8, num_reference_patches=8)
    assert not any(p.requires_grad for p in model.model.co_attention.parameters())
    batch = {"query": {"image": torch.rand(2, 3, 64, 64), "label": torch.tensor([0, 1])},
             "references": torch.rand(2, 2, 3, 64, 64)}
    assert set(model.loss_terms(batch)) == {"cls", "rank"}
    assert not any(p.requires_grad for p in model.model.encoder.extractor.parameters())


# ---------------------------------------------------------------------------------------------- CLI


def read_metrics(run_dir: Path) -> set[str]:
    return set((run_dir / "metrics.csv").read_text().splitlines()[0].split(","))


def test_tiny_lodo_fit_test_and_resume_through_the_cli(surfaces_root, tmp_path):
    main(["fit", *fast_args(surfaces_root, tmp_path, steps=2), "--trainer.val_check_interval", "2",
          "--run.test_after_fit", "true"])
    run_dir = tmp_path / "meta_comparer" / "surfaces-lodo-wood-ref100" / "version_0"
    results = json.loads((run_dir / "results.json").read_text())["metrics"]
    assert {"test/target/image_auroc", "test/target/pixel_auroc"} <= set(results)
    assert {"train/cls", "train/att", "train/rank", "train/loss", "val/cls"} <= read_metrics(run_dir)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2

    main(["fit", *fast_args(surfaces_root, tmp_path, steps=4), "--ckpt_path", "last"])
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    assert not (run_dir.parent / "version_1").exists()

    # a 10 % reference test of the resumed weights, no fine-tuning
    main(["test", *fast_args(surfaces_root, tmp_path), "--data.init_args.reference_fraction", "0.1",
          "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")])
    # filed under both data tags (trained at 100 %, tested at 10 %), not among runs trained at 10 %
    tested = tmp_path / "meta_comparer" / "surfaces-lodo-wood-ref100__on__surfaces-lodo-wood-ref10" / "version_0"
    assert "test/target/image_auroc" in json.loads((tested / "results.json").read_text())["metrics"]


def test_aggregate_and_knn_baselines_through_the_cli(surfaces_root, tmp_path):
    main(["fit", *fast_args(surfaces_root, tmp_path, steps=2), "--config",
          str(REPO / "configs" / "meta_comparer" / "surfaces_aggregate.yaml"), "--run.test_after_fit", "true"])
    run_dir = tmp_path / "meta_comparer_aggregate" / "surfaces-lodo-wood-ref100" / "version_0"
    logged = read_metrics(run_dir)
    assert "train/cls" in logged and "train/att" not in logged and "train/rank" not in logged
    assert "test/target/image_auroc" in json.loads((run_dir / "results.json").read_text())["metrics"]

    main(["test", "--config", str(REPO / "configs" / "meta_comparer" / "surfaces_knn.yaml"),
          "--data.init_args.source.root", str(surfaces_root), "--data.init_args.domains", "[brick, grass, wood]",
          "--data.init_args.image_size", "64", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar",
          "false", "--run.wandb", "false", "--run.root", str(tmp_path)])
    knn = json.loads((tmp_path / "knn_patch" / "surfaces-lodo-wood-ref100" / "version_0" / "results.json").read_text())
    assert {"test/target/image_auroc", "test/target/pixel_auroc"} <= set(knn["metrics"])


def test_padim_baseline_is_fitted_on_exactly_the_references(surfaces_root, tmp_path):
    cli = main(["test", "--config", str(REPO / "configs" / "meta_comparer" / "surfaces_padim.yaml"),
                "--data.init_args.source.root", str(surfaces_root), "--data.init_args.domains", "[brick, grass, wood]",
                "--data.init_args.image_size", "64", "--data.init_args.reference_fraction", "0.5",
                "--model.init_args.num_features", "24", "--trainer.accelerator", "cpu",
                "--trainer.enable_progress_bar", "false", "--run.wandb", "false", "--run.root", str(tmp_path)])
    references = cli.datamodule.reference_images()
    assert int(cli.model.model.count) == references.shape[0] < len(cli.datamodule.test_dataset)
    padim = json.loads((tmp_path / "padim_reference" / "surfaces-lodo-wood-ref50" / "version_0" / "results.json")
                       .read_text())
    assert {"test/target/image_auroc", "test/target/pixel_auroc"} <= set(padim["metrics"])
