"""benchmarks/cross_domain.py: its arguments, the gap-recovered arithmetic, the table, resume, and one real run."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import cross_domain
from benchmarks.cross_domain import Domain, gap_recovered, jobs_of, parse_args, settings_of, table
from benchmarks.runner import Ledger
from tests.conftest import make_folder_tree

SWEEP = {"source": "surfaces:brick", "target": "surfaces_line_b:brick", "image_size": None, "scale": 1.0,
         "max_steps": None, "seed": 0, "gmm_backbone": None}


def parse_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_embedded_names_and_folders_parse_to_domains(tmp_path):
    make_folder_tree(tmp_path / "lineB", categories=("pcb",))
    args = parse_args(["--source", "surfaces:brick", "--target", f"{tmp_path / 'lineB'}:pcb", "--dataset", "mvtec",
                       "--out", str(tmp_path / "out")])
    assert args.source_domain == Domain("surfaces", None, "brick")
    assert args.target_domain == Domain("mvtec", tmp_path / "lineB", "pcb")
    assert args.target_domain.data_args("target") == [
        "--data.init_args.target.dataset", "mvtec", "--data.init_args.target.root", str(tmp_path / "lineB"),
        "--data.init_args.target.category", "pcb", "--data.init_args.target.shift", "none"]
    assert args.run_root == tmp_path / "out" / "runs"


def test_a_synthetic_pair_is_one_root_with_a_target_shift(tmp_path):
    args = parse_args(["--source", "surfaces:brick", "--target", "surfaces:brick", "--target-shift", "coljit",
                       "--out", str(tmp_path)])
    assert str(args.target_domain) == "surfaces:brick+coljit" and str(args.source_domain) == "surfaces:brick"
    assert args.target_domain.data_args("target")[-2:] == ["--data.init_args.target.shift", "coljit"]
    assert args.source_domain.data_args("source")[-2:] == ["--data.init_args.source.shift", "none"]
    assert cross_domain.settings_of(args)["target"] == "surfaces:brick+coljit"  # a ledger per shift


@pytest.mark.parametrize("source, expected", [
    ("surfaces", "--source 'surfaces': expected ROOT:CATEGORY"),
    ("surfaces:", "--source 'surfaces:': expected ROOT:CATEGORY"),
    ("surfaces:pcb", "surfaces has no category 'pcb'; expected one of brick"),
])
def test_a_bad_root_category_is_refused_by_name(capsys, tmp_path, source, expected):
    err = parse_error(capsys, ["--source", source, "--target", "surfaces_line_b:brick", "--out", str(tmp_path)])
    assert expected in err


def test_a_missing_folder_or_category_folder_is_named(capsys, tmp_path):
    missing = tmp_path / "lineB"
    err = parse_error(capsys, ["--source", "surfaces:brick", "--target", f"{missing}:pcb", "--out", str(tmp_path)])
    assert f"the target folder {missing} does not exist" in err
    make_folder_tree(missing, categories=("bottle",))
    err = parse_error(capsys, ["--source", "surfaces:brick", "--target", f"{missing}:pcb", "--out", str(tmp_path)])
    assert f"no category folder {missing / 'pcb'} in the target root" in err


def test_unknown_method_and_gmm_padim_without_its_backbone_are_refused(capsys, tmp_path):
    pair = ["--source", "surfaces:brick", "--target", "surfaces_line_b:brick", "--out", str(tmp_path)]
    assert "invalid choice: 'patchcore'" in parse_error(capsys, [*pair, "--methods", "patchcore"])
    assert "gmm_padim needs --gmm-backbone" in parse_error(capsys, [*pair, "--methods", "gmm_padim"])
    assert "--folds 6: expected 1 to 5" in parse_error(capsys, [*pair, "--folds", "6"])


def test_jobs_run_each_method_without_shots_first_then_fold_major_and_padim_k_only_from_two_shots(tmp_path):
    args = parse_args(["--source", "surfaces:brick", "--target", "surfaces_line_b:brick", "--out", str(tmp_path),
                       "--methods", "padim", "csflow", "--shots", "1", "5", "--folds", "2"])
    keys = [job.key for job in jobs_of(args)]
    assert keys[:2] == ["padim/source_only", "padim/target_full"]
    recalibrations = ("recalibrated", "recalibrated_aligned")
    assert keys[2:11] == ["padim/source_plus_k/k1/f0", *(f"padim/{s}/k1/f0" for s in recalibrations),
                          "padim/k_only/k5/f0", "padim/source_plus_k/k5/f0", *(f"padim/{s}/k5/f0" for s in recalibrations),
                          "padim/source_plus_k/k1/f1", "padim/recalibrated/k1/f1"]
    assert "padim/k_only/k1/f0" not in keys  # one image gives PaDiM no covariance
    shot_settings = ("k_only", "source_plus_k", "adapted", "adapted_safe", "flow_tuned", "recalibrated",
                     "recalibrated_extractor")
    assert keys[-30:] == ["csflow/source_only", "csflow/target_full", *(
        f"csflow/{setting}/k{k}/f{fold}" for fold in (0, 1) for k in (1, 5) for setting in shot_settings)]
    args.methods = ["dann"]  # the two bounds first: a sweep cut short still has the gap
    assert [job.key for job in jobs_of(args)] == ["dann/source_only", "dann/target_full", "dann/adabn", "dann/dann",
                                                  "dann/dann_adabn", "dann/adda"]
    args.methods = ["knn", "meta_comparer"]  # k-NN k_only runs from one shot (a memory bank of one image)
    assert [job.key for job in jobs_of(args)] == [
        "knn/source_only", "knn/target_full", "knn/k_only/k1/f0", "knn/source_plus_k/k1/f0", "knn/k_only/k5/f0",
        "knn/source_plus_k/k5/f0", "knn/k_only/k1/f1", "knn/source_plus_k/k1/f1", "knn/k_only/k5/f1",
        "knn/source_plus_k/k5/f1",
        "meta_comparer/source_only", "meta_comparer/target_full", "meta_comparer/adapted/k1/f0",
        "meta_comparer/source_plus_k/k1/f0", "meta_comparer/adapted/k5/f0", "meta_comparer/source_plus_k/k5/f0",
        "meta_comparer/adapted/k1/f1", "meta_comparer/source_plus_k/k1/f1", "meta_comparer/adapted/k5/f1",
        "meta_comparer/source_plus_k/k5/f1"]


def test_knn_and_meta_comparer_jobs_are_lodo_runs_whose_references_are_the_setting(tmp_path):
    args = parse_args(["--source", "surfaces:brick", "--target", "surfaces_line_b:brick", "--out", str(tmp_path),
                       "--methods", "knn", "meta_comparer", "--scale", "0.5"])
    domains = json.dumps([{"dataset": "surfaces", "category": "brick", "shift": "none", "name": "source"},
                          {"dataset": "surfaces_line_b", "category": "brick", "shift": "none", "name": "target"}])

    def command(method, setting, k=None, fold=None, records=None):
        job = cross_domain.Job(method, setting, k, fold)
        subcommand, arguments = cross_domain.COMMANDS[method](job, args, records or {})
        return subcommand, " ".join(arguments)

    for setting, references in (("source_only", "source"), ("target_full", "target")):
        subcommand, line = command("knn", setting)
        assert subcommand == "test" and "meta_comparer/surfaces_knn.yaml" in line
        assert line.endswith(f"--data.init_args.references_from {references}")
        assert f"--data.init_args.domains {domains} --data.init_args.held_out target" in line
        assert "--data.init_args.source.dataset surfaces --data.init_args.source.shift none" in line
    subcommand, line = command("knn", "source_plus_k", 5, 2)
    assert line.endswith("--data.init_args.references_from source+target_shots --data.init_args.target_shots 5 "
                         "--data.init_args.fold 2")
    subcommand, line = command("meta_comparer", "source_only")
    assert subcommand == "fit" and "meta_comparer/surfaces.yaml" in line
    assert "--data.init_args.references_from source " in line and "--trainer.max_steps 750" in line
    assert line.endswith("--run.test_after_fit true")
    with pytest.raises(RuntimeError, match="meta_comparer/adapted/k1/f0 starts from the meta_comparer source_only fit"):
        command("meta_comparer", "adapted", 1, 0)
    run_dir = tmp_path / "source_only_run"
    (run_dir / "checkpoints").mkdir(parents=True)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"  # no monitor: the fit's test scored the final weights
    checkpoint.write_bytes(b"")
    (run_dir / "results.json").write_text(json.dumps({"checkpoint": None, "metrics": {}}))
    records = {"meta_comparer/source_only": {"run_dir": str(run_dir)}}
    for setting, references in (("adapted", "target_shots"), ("source_plus_k", "source+target_shots")):
        subcommand, line = command("meta_comparer", setting, 1, 0, records)
        assert subcommand == "test" and "max_steps" not in line
        assert line.endswith(f"--data.init_args.references_from {references} --data.init_args.target_shots 1 "
                             f"--data.init_args.fold 0 --ckpt_path {checkpoint}")
    subcommand, line = command("meta_comparer", "target_full", records=records)
    assert subcommand == "test" and line.endswith(f"--data.init_args.references_from target --ckpt_path {checkpoint}")


def test_gap_recovered_is_the_share_of_the_source_to_target_gap():
    assert gap_recovered(0.7, 0.6, 0.9) == "+0.33"
    assert gap_recovered(0.5, 0.6, 0.9) == "-0.33"
    assert gap_recovered(0.9, 0.6, 0.9) == "+1.00"
    assert gap_recovered(0.7, 0.6, 0.605) == "n/a (target-full − source-only = +0.005)"
    assert gap_recovered(0.7, 0.6, 0.5) == "n/a (target-full − source-only = -0.100)"
    assert gap_recovered(None, 0.6, 0.9) == "—"


def record(method: str, setting: str, value: float, k: int | None = None, fold: int | None = None,
           **metrics: float) -> dict:
    metric = "target/auroc" if method == "dann" else "target/image_auroc"
    return {"method": method, "setting": setting, "k": k, "fold": fold, metric: value, **metrics,
            "seconds": 10.0, "cpu_seconds": 8.0, "sweep": SWEEP}


def rows(markdown: str) -> dict[str, list[str]]:
    cells = [line.strip("|").split(" | ") for line in markdown.splitlines()
             if line.startswith("| ") and not line.startswith("| ---")][1:]
    return {" ".join(c.strip() for c in cell[:3]): [c.strip() for c in cell[3:]] for cell in cells}


def test_table_averages_folds_and_reports_the_gap_per_method_and_k():
    records = [record("padim", "source_only", 0.6, **{"source/image_auroc": 0.95, "target/pixel_auroc": 0.7}),
               record("padim", "target_full", 0.9),
               record("padim", "source_plus_k", 0.7, 5, 0), record("padim", "source_plus_k", 0.8, 5, 1),
               record("dann", "source_only", 0.5), record("dann", "target_full", 0.505),
               record("dann", "dann", 0.6, **{"target/accuracy": 0.75})]
    table_rows = rows(table(records))
    assert table_rows["padim source_only —"] == ["0.600 (n=1)", "0.700 (n=1)", "—", "—", "0.950 (n=1)", "—", "10", "8"]
    assert table_rows["padim source_plus_k 5"][0] == "0.750 ± 0.071 (n=2)"
    assert table_rows["padim source_plus_k 5"][5] == "+0.50"  # (0.75 - 0.6) / (0.9 - 0.6)
    assert table_rows["dann dann —"][3] == "0.750 (n=1)"
    assert table_rows["dann dann —"][5] == "n/a (target-full − source-only = +0.005)"
    assert "surfaces:brick` → target `surfaces_line_b:brick" in table(records)


def test_resume_skips_finished_jobs_and_refuses_a_ledger_of_other_settings(tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = ["--source", "surfaces:brick", "--target", "surfaces_line_b:brick", "--out", str(out),
            "--methods", "densehybrid", "dann", "--settings", "source_only", "target_full"]
    sweep = settings_of(parse_args(argv))
    out.mkdir()
    done = {**record("densehybrid", "source_only", 0.6), "sweep": sweep}
    (out / "cross_domain.json").write_text(json.dumps({"records": [done]}))
    calls = []

    def fake_run_job(job, args, records):
        calls.append(job.key)
        if job.key == "dann/source_only":
            raise RuntimeError("dann/source_only failed")
        return {**record(job.method, job.setting, 0.8), "sweep": settings_of(args)}

    monkeypatch.setattr(cross_domain, "run_job", fake_run_job)
    with pytest.raises(SystemExit, match=r"1 job\(s\) failed \(dann/source_only\)"):
        cross_domain.main(argv)
    assert calls == ["densehybrid/target_full", "dann/source_only", "dann/target_full"]
    ledger = json.loads((out / "cross_domain.json").read_text())["records"]
    assert sorted(cross_domain.job_key(r) for r in ledger) == [
        "dann/target_full", "densehybrid/source_only", "densehybrid/target_full"]
    calls.clear()
    with pytest.raises(SystemExit, match="1 job"):
        cross_domain.main(argv)
    assert calls == ["dann/source_only"]  # only what has no record yet
    with pytest.raises(SystemExit, match="holds jobs of other settings"):
        cross_domain.main([*argv, "--image-size", "64"])
    # Another build of an embedded dataset (its spec changed) is other data too.
    monkeypatch.setattr(cross_domain, "default_embedded_root", lambda dataset: tmp_path / "cache" / dataset / "new")
    with pytest.raises(SystemExit, match="holds jobs of other settings"):
        cross_domain.main(argv)
    assert calls == ["dann/source_only"]


def test_csflow_recalibrated_tests_the_source_only_checkpoint_with_the_shots(tmp_path):
    args = parse_args(["--source", "surfaces:brick", "--target", "surfaces_line_b:brick", "--out", str(tmp_path),
                       "--methods", "csflow", "--image-size", "128"])
    job = cross_domain.Job("csflow", "recalibrated", 5, 1)
    with pytest.raises(RuntimeError, match="csflow/recalibrated/k5/f1 starts from the csflow source_only fit"):
        cross_domain.detector_command(job, args, {})
    checkpoint = tmp_path / "source_only_run" / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"")
    subcommand, arguments = cross_domain.detector_command(
        job, args, {"csflow/source_only": {"run_dir": str(checkpoint.parents[1])}})
    line = " ".join(arguments)
    assert subcommand == "test" and "max_steps" not in line
    assert "csflow/source_surfaces.yaml --config " in line and "csflow/target_recalibration.yaml" in line
    # the checkpoint's flow size, which the config's image_size (160) would contradict
    assert line.endswith(f"--data.init_args.train_on source --data.init_args.target_shots 5 --data.init_args.fold 1 "
                         f"--model.init_args.image_size 128 --ckpt_path {checkpoint}")


def test_densehybrid_rows_train_end_to_end_and_recalibrated_tests_the_checkpoint_source_only_tested(tmp_path):
    args = parse_args(["--source", "surfaces:brick", "--target", "surfaces_line_b:brick", "--out", str(tmp_path),
                       "--methods", "densehybrid", "--shots", "1", "--folds", "1"])
    assert [job.key for job in jobs_of(args)] == [
        "densehybrid/source_only", "densehybrid/target_full", "densehybrid/k_only/k1/f0",
        "densehybrid/source_plus_k/k1/f0", "densehybrid/recalibrated/k1/f0",
        "densehybrid/source_plus_k_recalibrated/k1/f0"]
    run_dir = tmp_path / "source_only_run"
    last = run_dir / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"")
    (run_dir / "results.json").write_text(json.dumps({"checkpoint": None}))  # it tested the weights it ended with
    records = {"densehybrid/source_only": {"run_dir": str(run_dir)}}
    job = cross_domain.Job("densehybrid", "recalibrated", 1, 0)
    subcommand, arguments = cross_domain.detector_command(job, args, records)
    line = " ".join(arguments)
    assert subcommand == "test" and "table1/freeze-none_rectangle.yaml --config " in line
    assert "densehybrid/target_recalibration.yaml" in line and line.endswith(f"--ckpt_path {last}")
    selected = last.with_name("epoch=2.ckpt")
    selected.write_bytes(b"")
    (run_dir / "results.json").write_text(json.dumps({"checkpoint": str(selected)}))
    assert cross_domain.detector_command(job, args, records)[1][-1] == str(selected)
    subcommand, arguments = cross_domain.detector_command(cross_domain.Job("densehybrid", "k_only", 1, 0), args, {})
    assert subcommand == "fit" and "table1/freeze-none_rectangle.yaml" in " ".join(arguments)
    # pooled, then recalibrated: the source_plus_k fit of the same k and fold
    pooled = cross_domain.Job("densehybrid", "source_plus_k_recalibrated", 1, 0)
    with pytest.raises(RuntimeError, match="starts from the densehybrid source_plus_k fit, which has no record"):
        cross_domain.detector_command(pooled, args, records)
    records["densehybrid/source_plus_k/k1/f0"] = {"run_dir": str(run_dir)}
    arguments = cross_domain.detector_command(pooled, args, records)[1]
    assert arguments[-1] == str(selected) and "--data.init_args.train_on source+target_shots" in " ".join(arguments)


def test_dann_adabn_tests_the_dann_fits_selected_checkpoint_with_exact_target_statistics(tmp_path):
    args = parse_args(["--source", "surfaces:brick", "--target", "surfaces_line_b:brick", "--out", str(tmp_path),
                       "--methods", "dann"])
    job = cross_domain.Job("dann", "dann_adabn")
    with pytest.raises(RuntimeError, match="dann/dann_adabn starts from the dann dann fit, which has no record"):
        cross_domain.dann_command(job, args, {})
    run_dir = tmp_path / "dann_run"
    selected = run_dir / "checkpoints" / "epoch=3.ckpt"
    selected.parent.mkdir(parents=True)
    selected.write_bytes(b"")
    (run_dir / "results.json").write_text(json.dumps({"checkpoint": str(selected)}))
    subcommand, arguments = cross_domain.dann_command(job, args, {"dann/dann": {"run_dir": str(run_dir)}})
    line = " ".join(arguments)
    assert subcommand == "test" and "dann/surfaces_dann.yaml --config " in line
    assert "dann/exact_target_statistics.yaml" in line and line.endswith(f"--ckpt_path {selected}")


def run_on_two_user_folders(tmp_path: Path, *runner_args: str) -> tuple[dict, Path]:
    """The runner on two tiny user folders (line B without masks): (its records by job key, its output folder)."""
    make_folder_tree(tmp_path / "lineA", categories=("bottle",), train=8)
    make_folder_tree(tmp_path / "lineB", categories=("bottle",), train=10, test_good=2, with_masks=False)
    out = tmp_path / "out"
    cross_domain.main(["--source", f"{tmp_path / 'lineA'}:bottle", "--target", f"{tmp_path / 'lineB'}:bottle",
                       "--dataset", "folder", "--folds", "1", *runner_args, "--out", str(out)])
    records = {cross_domain.job_key(r): r for r in json.loads((out / "cross_domain.json").read_text())["records"]}
    return records, out


def test_two_user_folders_end_to_end(tmp_path):
    """Four real cli.py jobs of PaDiM at 32 px: source-only, source + 1 target shot, the source fit recalibrated
    on that shot, full target."""
    records, out = run_on_two_user_folders(tmp_path, "--methods", "padim", "--settings", "source_only", "source_plus_k",
                                           "recalibrated", "target_full", "--shots", "1", "--image-size", "32")
    assert sorted(records) == ["padim/recalibrated/k1/f0", "padim/source_only", "padim/source_plus_k/k1/f0",
                               "padim/target_full"]
    for record_ in records.values():
        assert 0 <= record_["target/image_auroc"] <= 1 and 0 <= record_["source/image_auroc"] <= 1
        assert "target/pixel_auroc" not in record_  # line B has no ground_truth/
        assert "source/pixel_auroc" in record_
        assert record_["seconds"] > 0 and record_["cpu_seconds"] > 0
    assert "--data.init_args.train_on source+target_shots" in records["padim/source_plus_k/k1/f0"]["command"]
    assert "padim | source_plus_k | 1 |" in (out / "cross_domain.md").read_text()
    recalibrated = records["padim/recalibrated/k1/f0"]
    assert "padim/target_recalibration.yaml" in recalibrated["command"] and recalibrated["adapt/kept"] in (0, 1)
    assert f"padim | recalibrated (kept {recalibrated['adapt/kept']:.0f}/1) | 1 |" in (out / "cross_domain.md").read_text()


def test_knn_on_two_user_folders_end_to_end(tmp_path):
    """Four real cli.py test jobs of the k-NN baseline at 32 px, one per setting, references from one shot."""
    records, out = run_on_two_user_folders(tmp_path, "--methods", "knn", "--shots", "1", "--image-size", "32")
    assert sorted(records) == ["knn/k_only/k1/f0", "knn/source_only", "knn/source_plus_k/k1/f0", "knn/target_full"]
    for record_ in records.values():
        assert 0 <= record_["target/image_auroc"] <= 1 and "source/image_auroc" not in record_
        assert record_["command"].startswith("cli.py test ")
    tags = {key: Path(r["run_dir"]).parent.name for key, r in records.items()}
    assert tags == {"knn/source_only": "folder-to-folder_lineB-lodo-target-refs-source",
                    "knn/target_full": "folder-to-folder_lineB-lodo-target-ref100",
                    "knn/k_only/k1/f0": "folder-to-folder_lineB-lodo-target-refs-shots-k1-f0",
                    "knn/source_plus_k/k1/f0": "folder-to-folder_lineB-lodo-target-refs-source+shots-k1-f0"}
    assert "knn | k_only | 1 |" in (out / "cross_domain.md").read_text()


def test_meta_comparer_shot_job_tests_the_source_fit_end_to_end(tmp_path):
    """A 2-step comparer fit on one user folder, then its checkpoint tested with one target shot as references."""
    records, out = run_on_two_user_folders(tmp_path, "--methods", "meta_comparer", "--settings", "source_only",
                                           "adapted", "--shots", "1", "--image-size", "64", "--max-steps", "2")
    assert sorted(records) == ["meta_comparer/adapted/k1/f0", "meta_comparer/source_only"]
    source_fit = Path(records["meta_comparer/source_only"]["run_dir"])
    assert records["meta_comparer/adapted/k1/f0"]["command"].endswith(
        f"--ckpt_path {source_fit / 'checkpoints' / 'last.ckpt'}")
    assert all(0 <= r["target/image_auroc"] <= 1 for r in records.values())


def test_summary_over_pairs_counts_each_job_once_and_compares_with_the_better_trivial_row(tmp_path, capsys):
    from benchmarks import cross_domain_summary

    def ledger(name: str, target: str, figures: dict, seed: int = 0) -> Path:
        sweep = {"source": "surfaces:brick", "target": target, "seed": seed}
        records = [{"method": "padim", "setting": setting, "k": k, "fold": fold, "sweep": sweep,
                    "target/image_auroc": value}
                   for (setting, k, fold), value in figures.items()]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"records": records}))
        return path

    first = ledger("a", "surfaces:brick+gray", {("source_only", None, None): 0.6, ("target_full", None, None): 0.8,
                                                  ("source_plus_k", 5, 0): 0.65, ("k_only", 5, 0): 0.7,
                                                  ("recalibrated", 5, 0): 0.5, ("recalibrated", 5, 1): 0.7})
    second = ledger("b", "surfaces_line_b:brick", {("source_only", None, None): 0.7, ("target_full", None, None): 0.9,
                                                     ("source_plus_k", 5, 0): 0.72, ("recalibrated", 5, 0): 0.86})
    rerun = ledger("c", "surfaces:brick+gray", {("recalibrated", 5, 0): 0.74})  # replaces fold 0 of the first
    seed_1 = ledger("d", "surfaces_line_b:brick", {("source_only", None, None): 0.5}, seed=1)  # another run
    out = tmp_path / "summary"
    cross_domain_summary.main([str(first), str(second), str(rerun), str(seed_1), "--out", str(out)])
    assert "c.json: 1 job(s) replace the same jobs of" in capsys.readouterr().out
    rows = {(r["setting"], r["k"]): r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    recalibrated = rows[("recalibrated", 5)]
    # gray: folds 0.74 and 0.70 -> 0.72; line B: 0.86
    assert recalibrated["pairs"] == 2 and recalibrated["mean_auroc"] == pytest.approx((0.72 + 0.86) / 2)
    # line B's source-only is the mean of its two seeds, 0.6
    assert recalibrated["gap_recovered"] == pytest.approx(((0.72 - 0.6) / 0.2 + (0.86 - 0.6) / 0.3) / 2)
    assert recalibrated["worst_minus_source_only"] == pytest.approx(0.12)
    # the better trivial row: k_only 0.70 on gray, source_plus_k 0.72 on line B (no k_only there)
    assert recalibrated["minus_better_trivial"] == pytest.approx(((0.72 - 0.7) + (0.86 - 0.72)) / 2)
    assert "| padim | recalibrated | 5 | 2 | 0.790 |" in out.with_suffix(".md").read_text()


def test_summary_names_a_file_that_is_not_a_ledger(tmp_path, capsys):
    from benchmarks import cross_domain_summary

    broken, other = tmp_path / "broken.json", tmp_path / "other.json"
    broken.write_text('{"records": [')
    other.write_text('{"rows": []}')
    for path in (broken, other, tmp_path / "missing.json"):
        with pytest.raises(SystemExit):
            cross_domain_summary.main([str(path), "--out", str(tmp_path / "summary")])
        assert str(path) in capsys.readouterr().err



def test_a_job_claimed_by_a_live_sweep_is_not_run_twice_and_a_dead_sweeps_claim_is_void(tmp_path):
    path, key = tmp_path / "ledger.json", lambda record: record["key"]
    here = socket.gethostname()
    mine = Ledger(path, key)
    parent = Ledger(path, key, owner=(here, os.getppid()))  # another live process on this host
    assert mine.claim("a") == [] and mine.claim("a") == []  # a process may claim its own job again
    assert parent.claim("a") is None
    assert parent.claim("b") == [] and mine.claim("b") is None
    parent.release("b")
    assert mine.claim("b") == []
    mine.merge([{"key": "a", "value": 1}])
    assert parent.claim("a") is None  # finished
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    assert Ledger(path, key, owner=(here, int(finished.stdout))).claim("c") == [{"key": "a", "value": 1}]
    assert mine.claim("c") is not None  # its claimant is gone
    assert Ledger(path, key, owner=("another-host", 1)).claim("d") == [{"key": "a", "value": 1}]
    assert mine.claim("d") is None  # a process on another host cannot be checked: its claim stands
    assert Ledger(path, key, is_current=lambda record: False).claim("a") is not None  # a stale record is rerun
    mine.claims_path.write_text("{truncated")
    with pytest.raises(SystemExit, match=r"job claims .*ledger.claims.json are unreadable .* delete it once no sweep"):
        mine.claim("e")


def test_a_sweep_skips_the_job_another_sweep_on_its_ledger_runs(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = ["--source", "surfaces:brick", "--target", "surfaces_line_b:brick", "--out", str(out),
            "--methods", "densehybrid", "--settings", "source_only", "target_full"]
    Ledger(out / "cross_domain.json", cross_domain.job_key, owner=(socket.gethostname(), os.getppid())).claim(
        "densehybrid/target_full")
    calls = []

    def fake_run_job(job, args, records):
        calls.append(job.key)
        return {**record(job.method, job.setting, 0.8), "sweep": settings_of(args)}

    monkeypatch.setattr(cross_domain, "run_job", fake_run_job)
    cross_domain.main(argv)
    assert calls == ["densehybrid/source_only"]
    assert "densehybrid/target_full: finished or running in another sweep" in capsys.readouterr().out
