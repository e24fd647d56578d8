"""Source -> target on two real domains (two folders, or the embedded pair): per method the source-only model,
every adaptation the method has, and the full-target upper bound, with the share of the gap each adaptation
recovers.

    python benchmarks/cross_domain.py --source surfaces:brick --target surfaces_line_b:brick \\
        --shots 1 5 10 --folds 3 --methods padim csflow dann --out runs/cross_domain
    python benchmarks/cross_domain.py --dataset folder --source /data/lineA:pcb --target /data/lineB:pcb \\
        --methods padim csflow --out runs/line_a_to_b

    python benchmarks/cross_domain.py --source surfaces:brick --target surfaces:brick --target-shift coljit \
        --methods padim csflow --out runs/brick_coljit      # a synthetic shift: the same images, colour-jittered

``ROOT:CATEGORY``: ROOT is an embedded dataset (``surfaces``, ``surfaces_line_b``: built on first use) or a
folder read as ``--dataset`` (``folder``, ``mvtec``, ``visa``, ``btad``). Every job is ``python cli.py fit`` or
``test`` with the method's embedded-data config and the two domains as data keys
(``--data.init_args.source.root ...``; for ``knn`` and ``meta_comparer`` the two entries of LODO's ``domains``,
named ``source`` and ``target``, the target held out), so any two folders in MVTec layout run with the same recipe.

Settings (rows), each scored on the target's test split (the detectors report the source's test split too):

- ``padim``, ``gmm_padim`` (PaDiM with the GMM-pretrained backbone of ``--gmm-backbone``): ``source_only`` (fit
  on the source normals), ``k_only`` (statistics of the k target shots alone; k >= 2), ``source_plus_k``
  (source normals and the k shots), ``recalibrated`` (the source fit, then ShiftAD's target recalibration from
  the k shots, ``configs/padim/target_recalibration.yaml``; the table says in how many runs the safety rule
  kept the update), ``recalibrated_aligned`` (the same after moving the source Gaussians into the shots' channel
  frame, ``configs/padim/target_recalibration_aligned.yaml``), ``target_full`` (all target normals);
- ``csflow``: ``source_only`` (phase 1 on the source), ``k_only`` and ``source_plus_k`` (phase 1 on the k shots,
  on the source normals and the k shots), ``adapted`` (paper 001's phase 2 on the k target shots from the
  source-only checkpoint), ``adapted_safe`` (ShiftAD's phase 2, ``configs/csflow/adapt_regularised.yaml``:
  L2-SP, the shots' flips, source BatchNorm statistics and the safety rule), ``flow_tuned`` (ShiftAD's flow
  fine-tuning, ``configs/csflow/adapt_flow.yaml``: the flow trained on the shots' flips from its source weights,
  extractor frozen, with the safety rule), ``recalibrated`` (that checkpoint tested with its flow outputs
  standardised toward the k shots, ``configs/csflow/target_recalibration.yaml``), ``recalibrated_extractor`` (that
  checkpoint tested with its frozen extractor's BatchNorm statistics moved per scale toward the k shots, anchored to
  the training images', or, where that is declined and at k = 1, with the flow-output standardisation,
  ``configs/csflow/target_recalibration_extractor.yaml``), ``target_full`` (phase 1 on all
  target normals);
- ``densehybrid`` (Table I's row freeze none + rectangle, ``densehybrid/table1/freeze-none_rectangle.yaml``: the
  paper's freeze all + mask is at chance offline): ``source_only``, ``k_only``, ``source_plus_k``, ``recalibrated``
  (the source-only checkpoint tested after ShiftAD's AdaBN from the k shots, shrunk toward the source and checked
  layer by layer, ``configs/densehybrid/target_recalibration.yaml``), ``source_plus_k_recalibrated`` (the same
  recalibration of the ``source_plus_k`` checkpoint of that k and fold: the shots both in the fit and in the
  statistics), ``target_full``;
- ``dann``: ``source_only``, ``adabn`` (the source-only checkpoint tested with the target's BN statistics),
  ``dann``, ``dann_adabn`` (the dann job's selected checkpoint tested with AdaBN's exact target statistics,
  ``configs/dann/exact_target_statistics.yaml``), ``adda`` (unlabelled target train split), ``target_full`` (source-only
  classifier trained on the target's labelled train split);
- ``knn`` (the k-NN patch baseline, ``configs/meta_comparer/surfaces_knn.yaml``; nothing is trained, every job
  is a ``test`` that fits its memory bank on LODO's test-time references, ``references_from``):
  ``source_only`` (the source train normals), ``k_only`` (the k target shots), ``source_plus_k`` (both),
  ``target_full`` (all target train normals);
- ``meta_comparer`` (``configs/meta_comparer/surfaces.yaml``): ``source_only`` trains the comparer on the source
  (LODO with the source as the only training domain, the target held out) and tests it with source references;
  ``adapted`` (its few-shot protocol: the k target shots as references), ``source_plus_k`` (source normals and
  the k shots) and ``target_full`` (all target train normals as references) test that same checkpoint with
  other references. Its ``target_full`` is therefore the source-trained comparer with target references, not
  a fit on the target.

The k shots of fold f are the same images in every method (``draw_shots`` of the target's train normals minus
the validation hold-out, in ``OneClassDataModule`` and ``LODODataModule`` alike).

``DIR/cross_domain.json`` is the ledger (one record per job, with its metrics, wall and CPU seconds), merged
after every job; a job already there is skipped, so a cut-off sweep continues where it stopped.
``DIR/cross_domain.md`` is the table: mean ± std over the folds, and the gap recovered,
(adapted − source-only) / (target-full − source-only) in target image AUROC.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from benchmarks.runner import (  # noqa: E402
    Ledger,
    markdown_table,
    mean_std,
    relabelled_checkpoint,
    run_cli,
    tested_checkpoint,
)
from datamodules.shifts import SHIFT_NAMES  # noqa: E402
from datamodules.surfaces import EMBEDDED_DATASETS, SURFACES_CATEGORIES, default_embedded_root  # noqa: E402

FOLDER_DATASETS = ("folder", "mvtec", "visa", "btad")
CONFIGS = REPO / "configs"
TRAINER = CONFIGS / "trainer" / "default.yaml"
#: method -> its settings in table order; ``SHOT_SETTINGS`` run per k and fold
SETTINGS = {
    "padim": ("source_only", "k_only", "source_plus_k", "recalibrated", "recalibrated_aligned", "target_full"),
    "gmm_padim": ("source_only", "k_only", "source_plus_k", "recalibrated", "recalibrated_aligned", "target_full"),
    "csflow": ("source_only", "k_only", "source_plus_k", "adapted", "adapted_safe", "flow_tuned", "recalibrated",
               "recalibrated_extractor", "target_full"),
    "densehybrid": ("source_only", "k_only", "source_plus_k", "recalibrated", "source_plus_k_recalibrated",
                    "target_full"),
    "dann": ("source_only", "adabn", "dann", "dann_adabn", "adda", "target_full"),
    "knn": ("source_only", "k_only", "source_plus_k", "target_full"),
    "meta_comparer": ("source_only", "adapted", "source_plus_k", "target_full"),
}
SHOT_SETTINGS = ("k_only", "source_plus_k", "recalibrated", "recalibrated_aligned", "recalibrated_extractor",
                 "source_plus_k_recalibrated", "adapted", "adapted_safe", "flow_tuned")
BOUNDS = ("source_only", "target_full")
#: PaDiM's Gaussians need two images: k_only runs from k = 2
MIN_SHOTS = {("padim", "k_only"): 2, ("gmm_padim", "k_only"): 2}
DETECTOR_CONFIGS = {"padim": ("padim/padim_surfaces.yaml",), "gmm_padim": ("padim/padim_surfaces.yaml",),
                    "csflow": ("csflow/source_surfaces.yaml",),
                    "densehybrid": ("densehybrid/surfaces.yaml", "densehybrid/table1/freeze-none_rectangle.yaml")}
RECALIBRATION_CONFIGS = {("padim", "recalibrated"): "padim/target_recalibration.yaml",
                         ("gmm_padim", "recalibrated"): "padim/target_recalibration.yaml",
                         ("padim", "recalibrated_aligned"): "padim/target_recalibration_aligned.yaml",
                         ("gmm_padim", "recalibrated_aligned"): "padim/target_recalibration_aligned.yaml",
                         ("csflow", "recalibrated"): "csflow/target_recalibration.yaml",
                         ("csflow", "recalibrated_extractor"): "csflow/target_recalibration_extractor.yaml",
                         ("densehybrid", "recalibrated"): "densehybrid/target_recalibration.yaml",
                         ("densehybrid", "source_plus_k_recalibrated"): "densehybrid/target_recalibration.yaml"}
#: CS-Flow's phase-2 settings: their configs, in order
PHASE_2_CONFIGS = {"adapted": ("adapt_gray.yaml",), "adapted_safe": ("adapt_gray.yaml", "adapt_regularised.yaml"),
                   "flow_tuned": ("adapt_gray.yaml", "adapt_flow.yaml")}
#: whose recalibration acts at test time on a source-only checkpoint (PaDiM's is the end of its fit), and which:
#: the one the source-only job tested (CS-Flow's fit writes one, at its end, and last.ckpt the same weights)
RECALIBRATED_AT_TEST = {"csflow": "last", "densehybrid": "selected"}
#: the fit whose checkpoint a recalibration at test time starts from (a shot setting's: of the same k and fold)
RECALIBRATED_FIT = {"recalibrated": "source_only", "recalibrated_extractor": "source_only",
                    "source_plus_k_recalibrated": "source_plus_k"}
#: the images a setting fits on: OneClass's ``train_on``, LODO's ``references_from`` (the same choices)
TRAIN_ON = {"source_only": "source", "k_only": "target_shots", "source_plus_k": "source+target_shots",
            "recalibrated": "source", "recalibrated_aligned": "source", "recalibrated_extractor": "source",
            "source_plus_k_recalibrated": "source+target_shots", "adapted": "target_shots",
            "adapted_safe": "target_shots", "flow_tuned": "target_shots", "target_full": "target"}
#: the metric (in the run's metrics.csv) with the safety rule's decision, 1 kept / 0 declined
KEPT = "adapt/kept"
#: what the label-free check decided, copied from the run's metrics into its record where logged
DECISIONS = (KEPT, "adapt/aligned", "adapt/layers_kept", "adapt/extractor_kept")
#: (column, metric of the detectors, metric of the classifier); the first is the gap's metric
COLUMNS = (("target image AUROC", "target/image_auroc", "target/auroc"),
           ("target pixel AUROC", "target/pixel_auroc", None),
           ("target pixel AUPRO", "target/pixel_aupro", None),
           ("target accuracy", None, "target/accuracy"),
           ("source image AUROC", "source/image_auroc", "source/auroc"))
#: a gap narrower than this is noise: its ratio is not reported
MIN_GAP = 0.01
MAX_FOLDS = 5  # OneClassDataModule's num_folds: the shots of the folds are disjoint


@dataclass(frozen=True)
class Domain:
    """One side of the pair as given on the command line."""

    dataset: str
    root: Path | None  # None for an embedded dataset
    category: str
    shift: str = "none"  # a synthetic shift of the images (``--source-shift``/``--target-shift``)

    def __str__(self) -> str:
        shift = "" if self.shift == "none" else f"+{self.shift}"
        return f"{self.root or self.dataset}:{self.category}{shift}"

    def spec(self) -> dict[str, str]:
        """This domain as a DataModule's domain spec (an embedded dataset's root is left unset: the configs set
        none, and it is resolved from the name)."""
        root = {"root": str(self.root)} if self.root else {}
        return {"dataset": self.dataset, **root, "category": self.category, "shift": self.shift}

    def data_args(self, side: str) -> list[str]:
        """The DataModule keys that make this domain the ``side`` (source or target)."""
        return [arg for key, value in self.spec().items() for arg in (f"--data.init_args.{side}.{key}", value)]


@dataclass(frozen=True)
class Job:
    method: str
    setting: str
    k: int | None = None
    fold: int | None = None

    @property
    def key(self) -> str:
        return job_key(vars(self))


def job_key(record: dict) -> str:
    shots = f"/k{record['k']}/f{record['fold']}" if record.get("k") is not None else ""
    return f"{record['method']}/{record['setting']}{shots}"


def parse_domain(text: str, side: str, dataset: str) -> Domain:
    root, _, category = text.rpartition(":")
    if not root or not category:
        raise ValueError(f"--{side} {text!r}: expected ROOT:CATEGORY, ROOT a folder or one of "
                         f"{', '.join(EMBEDDED_DATASETS)} (e.g. surfaces_line_b:brick)")
    if root in EMBEDDED_DATASETS:
        if category not in SURFACES_CATEGORIES:
            raise ValueError(f"--{side} {text!r}: {root} has no category {category!r}; expected one of "
                             f"{', '.join(SURFACES_CATEGORIES)}")
        return Domain(root, None, category)
    folder = Path(root).expanduser().resolve()
    if not folder.is_dir():
        raise ValueError(f"--{side} {text!r}: the {side} folder {folder} does not exist (expected a {dataset} "
                         f"dataset root, or one of {', '.join(EMBEDDED_DATASETS)})")
    if not (folder / category).is_dir():
        raise ValueError(f"--{side} {text!r}: no category folder {folder / category} in the {side} root")
    return Domain(dataset, folder, category)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="ROOT:CATEGORY of the source (labelled / training) domain")
    parser.add_argument("--target", required=True, help="ROOT:CATEGORY of the target domain")
    parser.add_argument("--dataset", default="folder", choices=FOLDER_DATASETS,
                        help="layout of a ROOT that is a folder (default: folder, the MVTec layout)")
    for side in ("source", "target"):
        parser.add_argument(f"--{side}-shift", default="none", choices=SHIFT_NAMES,
                            help=f"a synthetic shift of the {side} images (default none: the images as they are; "
                                 f"a synthetic pair is the same ROOT:CATEGORY on both sides with --target-shift)")
    parser.add_argument("--methods", nargs="+", default=["padim", "csflow", "densehybrid", "dann"],
                        choices=list(SETTINGS))
    parser.add_argument("--settings", nargs="+", choices=sorted({s for v in SETTINGS.values() for s in v}),
                        help="run only these settings of each method (default: all)")
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 5, 10], help="k target normals")
    parser.add_argument("--folds", type=int, default=3, help=f"folds of the shot draw, 1 to {MAX_FOLDS}")
    parser.add_argument("--gmm-backbone", type=Path, help="backbone.pth of a GMM pre-training (method gmm_padim)")
    parser.add_argument("--image-size", type=int, help="image side for every method (default: each config's)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiplies every config's training length (max_steps, else max_epochs)")
    parser.add_argument("--max-steps", type=int, help="caps every fit at this many optimizer steps (smoke runs)")
    parser.add_argument("--seed", type=int, default=0, help="seed_everything of every job")
    parser.add_argument("--out", type=Path, required=True, help="writes DIR/cross_domain.json and .md")
    parser.add_argument("--run-root", type=Path, help="run folders of the jobs (default: DIR/runs)")
    parser.add_argument("--table-only", action="store_true", help="rewrite the table from the ledger, run nothing")
    args = parser.parse_args(argv)
    try:
        args.source_domain = replace(parse_domain(args.source, "source", args.dataset), shift=args.source_shift)
        args.target_domain = replace(parse_domain(args.target, "target", args.dataset), shift=args.target_shift)
    except ValueError as error:
        parser.error(str(error))
    if not 1 <= args.folds <= MAX_FOLDS:
        parser.error(f"--folds {args.folds}: expected 1 to {MAX_FOLDS} (the disjoint shot folds of the data)")
    if any(k < 1 for k in args.shots):
        parser.error(f"--shots {args.shots}: every k must be >= 1")
    if "gmm_padim" in args.methods and args.gmm_backbone is None:
        parser.error("method gmm_padim needs --gmm-backbone <GMM pre-training run>/backbone.pth")
    if args.gmm_backbone is not None and not args.gmm_backbone.is_file():
        parser.error(f"--gmm-backbone {args.gmm_backbone}: no such file")
    if args.scale <= 0:
        parser.error(f"--scale {args.scale}: expected > 0")
    args.run_root = args.run_root or args.out / "runs"
    return args


def settings_of(args: argparse.Namespace) -> dict:
    """What makes two sweeps' records comparable; a ledger of other settings is refused. An embedded dataset
    counts by its build folder (named by its spec's digest), so a ledger of an older build is refused too."""
    return {"source": str(args.source_domain), "target": str(args.target_domain),
            "builds": [str(default_embedded_root(d.dataset)) for d in (args.source_domain, args.target_domain)
                       if d.root is None],
            "image_size": args.image_size,
            "scale": args.scale, "max_steps": args.max_steps, "seed": args.seed,
            "gmm_backbone": str(args.gmm_backbone) if args.gmm_backbone else None}


def jobs_of(args: argparse.Namespace) -> list[Job]:
    """Every job in run order: per method the two bounds (source-only, target-full), its other settings without
    shots, then the shot settings fold-major (a sweep cut short has the gap and whole folds)."""
    jobs = []
    for method in args.methods:
        settings = [s for s in SETTINGS[method] if args.settings is None or s in args.settings]
        bounds_first = sorted(settings, key=lambda s: s not in BOUNDS)
        jobs += [Job(method, s) for s in bounds_first if s not in SHOT_SETTINGS]
        jobs += [Job(method, s, k, fold) for fold in range(args.folds) for k in args.shots
                 for s in settings if s in SHOT_SETTINGS and k >= MIN_SHOTS.get((method, s), 1)]
    return jobs


def training_length(configs: list[Path], args: argparse.Namespace) -> list[str]:
    """The configs' training length times ``--scale`` (PaDiM's one pass stays one), capped by ``--max-steps``."""
    trainer = {}
    for config in configs:
        trainer.update((yaml.safe_load(config.read_text()) or {}).get("trainer") or {})
    length = []
    if (trainer.get("max_steps") or -1) > 0:
        length = ["--trainer.max_steps", str(math.ceil(trainer["max_steps"] * args.scale))]
    elif trainer.get("max_epochs"):
        length = ["--trainer.max_epochs", str(math.ceil(trainer["max_epochs"] * args.scale))]
    if args.max_steps is not None:
        length += ["--trainer.max_steps", str(args.max_steps)]
    return length


def common_args(args: argparse.Namespace, configs: list[Path], run_root: Path) -> list[str]:
    size = [] if args.image_size is None else ["--data.init_args.image_size", str(args.image_size),
                                               "--data.init_args.resize_size", "null"]
    return [*(arg for config in [TRAINER, *configs] for arg in ("--config", str(config))), *size,
            "--seed_everything", str(args.seed), "--run.root", str(run_root), "--run.wandb", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def detector_command(job: Job, args: argparse.Namespace, records: dict) -> tuple[str, list[str]]:
    source, target = args.source_domain, args.target_domain
    configs = [CONFIGS / config for config in DETECTOR_CONFIGS[job.method]]
    model = []
    if job.method == "gmm_padim":
        model = ["--model.init_args.backbone.weights", str(args.gmm_backbone)]
    elif job.method == "csflow" and args.image_size is not None:  # the flow is built for one image size
        model = ["--model.init_args.image_size", str(args.image_size)]
    if (job.method, job.setting) in RECALIBRATION_CONFIGS:
        configs.append(CONFIGS / RECALIBRATION_CONFIGS[job.method, job.setting])
        if job.method in RECALIBRATED_AT_TEST:
            return "test", [*common_args(args, configs, run_root_of(job, args)), *source.data_args("source"),
                            *target.data_args("target"), "--data.init_args.train_on", TRAIN_ON[job.setting],
                            *shots_args(job), *model, "--ckpt_path",
                            str(source_checkpoint(job, records, RECALIBRATED_AT_TEST[job.method],
                                                  RECALIBRATED_FIT[job.setting]))]
    elif job.setting in PHASE_2_CONFIGS:  # phase 2 builds its model from the phase-1 checkpoint
        configs = [CONFIGS / "csflow" / config for config in PHASE_2_CONFIGS[job.setting]]
        model = ["--model.init_args.source_checkpoint", str(source_checkpoint(job, records, "last"))]
    length = training_length(configs, args)
    if job.method == "csflow" and job.setting not in PHASE_2_CONFIGS:
        # One checkpoint at the end and no validation: the table tests the final weights.
        steps = min(int(length[i + 1]) for i, arg in enumerate(length) if arg == "--trainer.max_steps")
        length += ["--checkpoint.every_n_train_steps", str(steps), "--trainer.limit_val_batches", "0"]
    return "fit", [*common_args(args, configs, run_root_of(job, args)), *source.data_args("source"),
                   *target.data_args("target"), "--data.init_args.train_on", TRAIN_ON[job.setting], *shots_args(job),
                   *model, *length, "--run.test_after_fit", "true"]


def shots_args(job: Job) -> list[str]:
    return [] if job.k is None else ["--data.init_args.target_shots", str(job.k), "--data.init_args.fold", str(job.fold)]


def lodo_data_args(job: Job, args: argparse.Namespace) -> list[str]:
    """The pair as LODO's two domains, named ``source`` and ``target`` (their categories may be the same), the
    target held out, with the references of ``job``'s setting. LODO's ``source`` (no category) is the source's
    dataset and folder, for the run tag."""
    source, target = args.source_domain, args.target_domain
    domains = [{**source.spec(), "name": "source"}, {**target.spec(), "name": "target"}]
    source_keys = [arg for key, value in source.spec().items() if key != "category"
                   for arg in (f"--data.init_args.source.{key}", value)]
    return [*source_keys, "--data.init_args.domains", json.dumps(domains), "--data.init_args.held_out", "target",
            "--data.init_args.references_from", TRAIN_ON[job.setting], *shots_args(job)]


def knn_command(job: Job, args: argparse.Namespace, records: dict) -> tuple[str, list[str]]:
    """k-NN patch baseline: nothing to train, a ``test`` fits its memory bank on the setting's references."""
    configs = [CONFIGS / "meta_comparer" / "surfaces_knn.yaml"]
    return "test", [*common_args(args, configs, run_root_of(job, args)), *lodo_data_args(job, args)]


def meta_comparer_command(job: Job, args: argparse.Namespace, records: dict) -> tuple[str, list[str]]:
    """The comparer is trained once, on the source (``source_only``); every other setting tests the weights that
    fit tested, with the setting's references (its config monitors nothing: the test after fit scored the final
    weights, ``last.ckpt``)."""
    configs = [CONFIGS / "meta_comparer" / "surfaces.yaml"]
    common = [*common_args(args, configs, run_root_of(job, args)), *lodo_data_args(job, args)]
    if job.setting == "source_only":
        return "fit", [*common, *training_length(configs, args), "--run.test_after_fit", "true"]
    return "test", [*common, "--ckpt_path", str(source_checkpoint(job, records, "last"))]


def dann_command(job: Job, args: argparse.Namespace, records: dict) -> tuple[str, list[str]]:
    """DANN/ADDA/AdaBN: labelled source, unlabelled target; ``target_full`` trains on the target's labels."""
    mode = {"target_full": "source_only", "dann_adabn": "dann"}.get(job.setting, job.setting)
    configs = [CONFIGS / "dann" / f"surfaces_{mode}.yaml"]
    if job.setting == "dann_adabn":
        configs.append(CONFIGS / "dann" / "exact_target_statistics.yaml")
    source = args.target_domain if job.setting == "target_full" else args.source_domain
    common = [*common_args(args, configs, run_root_of(job, args)), *source.data_args("source"),
              *args.target_domain.data_args("target")]
    if job.setting == "adabn":
        # adabn trains exactly as source_only does, so the source-only job's selected checkpoint is tested as
        # adabn (test re-estimates the BN statistics on the target).
        checkpoint = source_checkpoint(job, records, "selected")
        relabelled = relabelled_checkpoint(checkpoint, run_root_of(job, args) / "source_only_as_adabn.ckpt",
                                           mode="adabn")
        return "test", [*common, "--ckpt_path", str(relabelled)]
    if job.setting == "dann_adabn":
        return "test", [*common, "--ckpt_path", str(source_checkpoint(job, records, "selected", trained_by="dann"))]
    return "fit", [*common, *training_length(configs, args), "--run.test_after_fit", "true"]


def source_checkpoint(job: Job, records: dict, which: str, trained_by: str = "source_only") -> Path:
    """The ``trained_by`` fit's ``last`` checkpoint or the ``selected`` one it tested (on the source val split);
    a fit with shots is the one of ``job``'s k and fold."""
    shots = {"k": job.k, "fold": job.fold} if trained_by in SHOT_SETTINGS else {}
    record = records.get(job_key({"method": job.method, "setting": trained_by, **shots}))
    if record is None:
        raise RuntimeError(f"{job.key} starts from the {job.method} {trained_by} fit, which has no record: run "
                           f"the {trained_by} setting first (it is in --settings)")
    run_dir = Path(record["run_dir"])
    checkpoint = tested_checkpoint(run_dir) if which == "selected" else run_dir / "checkpoints" / "last.ckpt"
    if checkpoint is None or not checkpoint.is_file():
        raise RuntimeError(f"{job.key} starts from the {which} checkpoint of the {job.method} {trained_by} fit in "
                           f"{run_dir}, which is gone: remove that record from the ledger to fit it again")
    return checkpoint


def run_root_of(job: Job, args: argparse.Namespace) -> Path:
    return args.run_root / job.key


COMMANDS = {"dann": dann_command, "knn": knn_command, "meta_comparer": meta_comparer_command}


def run_job(job: Job, args: argparse.Namespace, records: dict) -> dict:
    command = COMMANDS.get(job.method, detector_command)
    subcommand, arguments = command(job, args, records)
    run = run_cli(subcommand, arguments, run_root_of(job, args))
    decisions = {key: logged_last(run.run_dir, key) for key in DECISIONS}
    return {**vars(job), **run.metrics, **{key: value for key, value in decisions.items() if value is not None},
            **run.cost(), "sweep": settings_of(args)}


def logged_last(run_dir: Path, key: str) -> float | None:
    """The last value of a metric in the run's metrics*.csv (Lightning's CSV logger), None if never logged."""
    value = None
    for path in sorted(Path(run_dir).glob("metrics*.csv")):
        with path.open() as handle:
            for row in csv.DictReader(handle):
                value = float(row[key]) if row.get(key) else value
    return value


def mean_of(rows: list[dict], metric: str | None) -> float | None:
    values = [r[metric] for r in rows if metric and metric in r]
    return statistics.mean(values) if values else None


def gap_recovered(adapted: float | None, source_only: float | None, target_full: float | None) -> str:
    """(adapted − source-only) / (target-full − source-only); n/a when the gap is within ``MIN_GAP``."""
    if None in (adapted, source_only, target_full):
        return "—"
    gap = target_full - source_only
    if gap <= MIN_GAP:
        return f"n/a (target-full − source-only = {gap:+.3f})"
    return f"{(adapted - source_only) / gap:+.2f}"


def table(records: list[dict]) -> str:
    """The markdown table: one row per method, setting and k; mean ± std over the folds."""
    if not records:
        return "No finished jobs yet.\n"
    settings = records[0]["sweep"]
    out = [f"Cross-domain table: source `{settings['source']}` → target `{settings['target']}` (image size "
           f"{settings['image_size'] or 'of each config'}, training length × {settings['scale']}"
           f"{', at most ' + str(settings['max_steps']) + ' steps' if settings['max_steps'] else ''}, "
           f"seed {settings['seed']}). Cells: mean ± std over the folds (n = folds); settings without shots "
           f"are one run. Gap recovered: (setting − source-only) / (target-full − source-only) in target "
           f"image AUROC.\n"]
    rows = []
    methods = [m for m in SETTINGS if any(r["method"] == m for r in records)]
    for method in methods:
        mine = [r for r in records if r["method"] == method]
        index = 2 if method == "dann" else 1
        gap_metric = COLUMNS[0][index]
        source_only = mean_of([r for r in mine if r["setting"] == "source_only"], gap_metric)
        target_full = mean_of([r for r in mine if r["setting"] == "target_full"], gap_metric)
        for setting in SETTINGS[method]:
            shots = sorted({r["k"] for r in mine if r["setting"] == setting and r["k"] is not None}) or [None]
            for k in shots:
                cell = [r for r in mine if r["setting"] == setting and r["k"] == k]
                if not cell:
                    continue
                values = [mean_std([r[c[index]] for r in cell if c[index] in r]) for c in COLUMNS]
                gap = ("—" if setting in ("source_only", "target_full")
                       else gap_recovered(mean_of(cell, gap_metric), source_only, target_full))
                decided = [r[KEPT] for r in cell if KEPT in r]
                label = f"{setting} (kept {sum(decided):.0f}/{len(decided)})" if decided else setting
                rows.append([method, label, "—" if k is None else str(k), *values, gap,
                             f"{statistics.mean(r['seconds'] for r in cell):.0f}",
                             f"{statistics.mean(r['cpu_seconds'] for r in cell):.0f}"])
    header = ["method", "setting", "k", *(c[0] for c in COLUMNS), "gap recovered", "wall s / job", "CPU s / job"]
    out += markdown_table(header, rows)
    out.append(f"\nWall time of all {len(records)} jobs: {sum(r['seconds'] for r in records):.0f} s, CPU time "
               f"{sum(r['cpu_seconds'] for r in records):.0f} s. The classifier (dann) reports the image-level "
               f"AUROC of its defect score; — is a metric the setting does not have (no masks, no classifier).")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ledger = Ledger(args.out / "cross_domain.json", job_key)
    markdown = args.out / "cross_domain.md"
    records = ledger.merge()
    settings = settings_of(args)
    other = [r for r in records if r["sweep"] != settings]
    if other:
        raise SystemExit(f"{ledger.path} holds jobs of other settings ({other[0]['sweep']}, now {settings}): "
                         f"give another --out, or move it")
    if args.table_only:
        markdown.write_text(table(records))
        print(table(records))
        return
    by_key = {job_key(r): r for r in records}
    failures = []
    for job in jobs_of(args):
        if job.key in by_key:
            continue
        current = ledger.claim(job.key)
        if current is None:
            print(f"=== {job.key}: finished or running in another sweep on {ledger.path}, skipped", flush=True)
            continue
        by_key = {job_key(r): r for r in current}  # with what other sweeps on this ledger finished
        print(f"=== {job.key}", flush=True)
        try:
            record = run_job(job, args, by_key)
        except RuntimeError as error:  # the others go on; the ledger keeps what finished
            ledger.release(job.key)
            failures.append(job.key)
            print(error, flush=True)
            continue
        by_key[job.key] = record
        records = ledger.merge([record])
        markdown.write_text(table(records))
        print(f"{job.key}: {record['seconds']:.0f} s wall, {record['cpu_seconds']:.0f} s CPU", flush=True)
    markdown.write_text(table(records))
    print(table(records))
    if failures:
        raise SystemExit(f"{len(failures)} job(s) failed ({', '.join(failures)}); rerun the same command to retry")


if __name__ == "__main__":
    main()
