"""Outputs: nothing overwritten without --overwrite, nothing silently incomplete, and
what a killed process leaves is recognised and removed (docs/reliability.md)."""

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from maediff.benchmark import orchestration as benchmark
from maediff.benchmark import run as bench_run
from maediff.benchmark.status import is_done, mark_status
from maediff.config import get_preset
from maediff.data.io import DataError
from maediff.data.splits import read_inputs
from maediff.models import build_model
from maediff.outputs import HOST, clean_stale, partial_path, temp_path
from maediff.pipeline.detect import MANIFEST, check_output_folder, detect_files


def _dead_pid() -> int:
    """The id of a process of this host that has ended."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _thresh():
    return build_model(replace(get_preset("tiny"), model="thresh"))


@pytest.fixture
def scans(tiny_bench, tmp_path):
    """Two scans of the tiny benchmark, both named scan.nii.gz, in folders a/ and b/."""
    src = sorted((tiny_bench / "Test" / "Brats21" / "t2").iterdir())
    for folder, f in zip("ab", src):
        (tmp_path / folder).mkdir()
        shutil.copy(f, tmp_path / folder / "scan.nii.gz")
    return tmp_path


def _stamps(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()}


# ------------------------------------------------------------------ detect


def test_two_scans_with_one_name_are_refused_before_any_output(scans):
    (scans / "list.csv").write_text("image\na/scan.nii.gz\nb/scan.nii.gz\n")
    with pytest.raises(DataError, match="would write the same output"):
        detect_files(read_inputs(scans / "list.csv"), scans / "out", _thresh(), progress=False)
    assert not (scans / "out").exists()
    (scans / "list.csv").write_text("image,name\na/scan.nii.gz,a\nb/scan.nii.gz,b\n")
    report = detect_files(read_inputs(scans / "list.csv"), scans / "out", _thresh(), progress=False)
    assert report.written == ["a", "b"]


def test_an_output_that_would_replace_an_input_is_refused(scans):
    shutil.copy(scans / "a" / "scan.nii.gz", scans / "a" / "scan_score.nii.gz")
    (scans / "list.csv").write_text("image\na/scan.nii.gz\na/scan_score.nii.gz\n")
    before = _stamps(scans / "a")
    with pytest.raises(DataError, match="would replace an input"):
        detect_files(read_inputs(scans / "list.csv"), scans / "a", _thresh(), progress=False)
    assert _stamps(scans / "a") == before


def test_a_users_file_with_an_output_name_is_kept_without_overwrite(scans):
    out = scans / "out"
    out.mkdir()
    (out / "scan_score.nii.gz").write_text("mine")
    with pytest.raises(DataError, match="scan_score.nii.gz exists and was not written by"):
        detect_files(read_inputs(scans / "a"), out, _thresh(), progress=False)
    assert (out / "scan_score.nii.gz").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["scan_score.nii.gz"]
    detect_files(read_inputs(scans / "a"), out, _thresh(), overwrite=True, progress=False)
    assert (out / "scan_score.nii.gz").stat().st_size > 100


def test_a_threshold_added_to_a_finished_folder_is_refused(scans):
    out = scans / "out"
    assert detect_files(read_inputs(scans / "a"), out, _thresh(), progress=False).written
    before = _stamps(out)
    with pytest.raises(DataError, match=r"other settings.*'threshold': \(None, 0.2\)"):
        detect_files(read_inputs(scans / "a"), out, _thresh(), threshold=0.2, progress=False)
    assert _stamps(out) == before  # no map rewritten
    again = detect_files(read_inputs(scans / "a"), out, _thresh(), progress=False)
    assert again.skipped == ["scan"] and _stamps(out) == before
    detect_files(read_inputs(scans / "a"), out, _thresh(), True, 0.2, progress=False)
    assert (out / "scan_prediction.nii.gz").exists()
    # a call without a threshold leaves the prediction made with one as it is
    assert detect_files(read_inputs(scans / "a"), out, _thresh(), progress=False).skipped


def test_a_scan_interrupted_while_renaming_is_redone_without_overwrite(scans, monkeypatch):
    out = scans / "out"
    real = os.replace
    calls = []

    def cut(src, dst):  # the process dies after the first of the scan's renames into place
        if not Path(dst).name.startswith("."):
            calls.append(dst)
            if len(calls) == 2:
                raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr("maediff.pipeline.detect.os.replace", cut)
    with pytest.raises(KeyboardInterrupt):
        detect_files(read_inputs(scans / "a"), out, _thresh(), progress=False)
    monkeypatch.setattr("maediff.pipeline.detect.os.replace", real)
    assert len([p for p in out.glob("scan_*.nii.gz")]) == 1
    assert [json.loads(x)["state"] for x in (out / MANIFEST).read_text().splitlines()] == [
        "writing"
    ]
    report = detect_files(read_inputs(scans / "a"), out, _thresh(), progress=False)
    assert report.written == ["scan"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "scan_anomaly.nii.gz",
        "scan_reconstruction.nii.gz",
        "scan_score.nii.gz",
        "scores.csv",
    ]


def test_temporary_files_are_no_scans_and_a_killed_calls_are_removed(scans):
    stale = temp_path(scans / "a" / "scan_anomaly.nii.gz", ".nii.gz")
    stale = stale.with_name(stale.name.replace(f"-{os.getpid()}.", f"-{_dead_pid()}."))
    shutil.copy(scans / "a" / "scan.nii.gz", stale)
    assert [s.name for s in read_inputs(scans / "a")] == ["scan"]
    out = scans / "out"
    out.mkdir()
    shutil.copy(stale, out / stale.name)
    detect_files(read_inputs(scans / "a"), out, _thresh(), progress=False)
    assert not (out / stale.name).exists()


def test_an_output_folder_where_scans_are_read_is_refused(scans, tmp_path):
    with pytest.raises(DataError, match="is the input folder"):
        check_output_folder(scans / "a", scans / "a")
    check_output_folder(
        scans / "a", scans / "a" / "maps"
    )  # a folder is read without its subfolders
    bids = tmp_path / "ds"
    bids.mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    for bad in (bids, bids / "sub-01" / "anat", bids / "maps"):
        with pytest.raises(DataError, match="derivatives"):
            check_output_folder(bids, bad)
    check_output_folder(bids, bids / "derivatives" / "maediff")


def test_another_tools_derivatives_description_is_kept(scans, tmp_path):
    bids = tmp_path / "ds"
    (bids / "sub-01" / "anat").mkdir(parents=True)
    (bids / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    out = bids / "derivatives" / "other"
    out.mkdir(parents=True)
    theirs = '{"Name": "other", "GeneratedBy": [{"Name": "other"}]}'
    (out / "dataset_description.json").write_text(theirs)
    with pytest.raises(DataError, match="not made by maediff"):
        detect_files(read_inputs(scans / "a"), out, _thresh(), progress=False, bids_source=bids)
    assert (out / "dataset_description.json").read_text() == theirs


def test_preprocess_never_replaces_its_input_or_an_existing_output(scans, capsys):
    from maediff.cli import main

    before = _stamps(scans / "a")
    argv = ["preprocess", "-i", str(scans / "a"), "--skull-strip", "threshold", "-q"]
    assert main([*argv, "-o", str(scans / "a"), "--overwrite"]) == 2
    assert "would replace an input file" in capsys.readouterr().err
    (scans / "pre").mkdir()
    (scans / "pre" / "scan_mask.nii.gz").write_text("mine")
    assert main([*argv, "-o", str(scans / "pre")]) == 2
    assert "scan_mask.nii.gz exists; pass --overwrite" in capsys.readouterr().err
    assert _stamps(scans / "a") == before
    assert (scans / "pre" / "scan_mask.nii.gz").read_text() == "mine"


# ------------------------------------------------------------------ leftovers


def test_only_leftovers_of_dead_processes_of_this_host_are_removed(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    names = {
        f".a.nii.gz.{HOST}-{dead}.tmp.nii.gz": False,
        f".summary.json.{HOST}-{dead}.tmp": False,
        f".eval.{HOST}-{dead}.partial": False,
        f".b.nii.gz.{HOST}-{alive}.tmp.nii.gz": True,  # a live process's
        f".c.nii.gz.otherhost-{dead}.tmp.nii.gz": True,  # cannot be checked from here
        "scan.nii.gz": True,
        ".maediff-detect.jsonl": True,
    }
    for name in names:
        (tmp_path / name).mkdir() if name.endswith(".partial") else (tmp_path / name).touch()
    mine = partial_path(tmp_path / "x")
    mine.mkdir()  # this process's own
    clean_stale(tmp_path)
    kept = {p.name for p in tmp_path.iterdir()}
    assert kept == {n for n, keep in names.items() if keep} | {mine.name}


def _assert_workers_end(workers: list[int]) -> None:
    """Every worker process ends within 20 s (a worker ends when its current call
    returns); any still alive is killed before the assertion fails."""
    deadline = time.monotonic() + 20  # a worker ends when its current call returns
    while any(Path(f"/proc/{w}").exists() for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = [w for w in workers if Path(f"/proc/{w}").exists()]
    for w in alive:
        os.kill(w, signal.SIGKILL)
    assert not alive, "a worker outlived its killed parent"


def _pool_parent(queue) -> None:
    """A process that starts a pool of 2 workers, reports their ids and waits."""
    from maediff.models.maediff import MAEDiff
    from maediff.pipeline.workers import ReconstructionPool

    pool = ReconstructionPool(MAEDiff(get_preset("tiny")), 2)
    for f in [pool._pool.submit(time.sleep, 0.3) for _ in range(2)]:
        f.result()  # both workers started and initialised
    queue.put((list(pool._pool._processes), str(pool._dir)))
    time.sleep(600)


@pytest.mark.slow
def test_workers_end_when_their_parent_is_killed(tmp_path):
    from maediff.pipeline.workers import remove_stale_copies

    # the parent is spawned: a fork of this process, whose torch has run thread pools
    # in earlier tests, can hang in its first parallel region (the pool inside forks
    # from that clean parent, as evaluate does)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    parent = ctx.Process(target=_pool_parent, args=(queue,))
    parent.start()
    workers, copy = queue.get(timeout=60)
    os.kill(parent.pid, signal.SIGKILL)
    parent.join()
    _assert_workers_end(workers)
    assert Path(copy).exists()  # the killed process's weights copy: removed by the next pool
    assert Path(copy) in remove_stale_copies(Path(copy).parent)
    assert not Path(copy).exists()


def _metrics_parent() -> None:
    """A process whose post-processing pool (evaluate --jobs 2) works for a long time."""
    from maediff.evaluation.protocol import _bounded_map

    for _ in _bounded_map(time.sleep, [60] * 8, 2):
        pass


def _children(pid: int) -> list[int]:
    f = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in f.read_text().split()] if f.exists() else []


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc")
def test_post_processing_workers_end_when_their_parent_is_killed():
    parent = multiprocessing.get_context("fork").Process(target=_metrics_parent)
    parent.start()
    deadline = time.monotonic() + 30
    while len(_children(parent.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = _children(parent.pid)
    assert len(workers) == 2
    os.kill(parent.pid, signal.SIGKILL)
    parent.join()
    _assert_workers_end(workers)


# ------------------------------------------------------------------ evaluate


@pytest.mark.slow
def test_evaluate_keeps_earlier_results_and_removes_a_killed_ones_staging(tiny_bench, tmp_path):
    from maediff.pipeline.evaluate import evaluate_model

    out = tmp_path / "eval"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    stale = tmp_path / f".eval.{HOST}-{_dead_pid()}.partial"
    legacy = tmp_path / f".eval.partial-{_dead_pid()}"
    for d in (stale, legacy):
        d.mkdir()
    kw = dict(max_volumes=1, progress=False, figures=False, healthy_test=False)
    with pytest.raises(DataError, match="--overwrite"):
        evaluate_model(_thresh(), tiny_bench, out, label="Thresh", **kw)
    assert (out / "summary.json").read_text() == "{}"
    evaluate_model(_thresh(), tiny_bench, out, label="Thresh", overwrite=True, **kw)
    assert json.loads((out / "summary.json").read_text())["model"] == "Thresh"
    assert not stale.exists() and not legacy.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]


# ------------------------------------------------------------------ benchmark

BENCH = ["--models", "thresh", "--scale", "tiny", "--max-volumes", "1", "--device", "cpu", "-q"]


@pytest.mark.slow
def test_a_run_interrupted_after_its_evaluation_is_finished_by_the_rerun(
    tiny_bench, tmp_path, monkeypatch
):
    from maediff.cli import main

    argv = ["benchmark", "--data", str(tiny_bench), "-o", str(tmp_path / "b"), *BENCH]
    run = tmp_path / "b" / "runs" / "thresh" / "fold0-seed0"
    real = bench_run.save_figure_slices

    def killed(*a, **k):
        raise KeyboardInterrupt  # the process dies between the evaluation and Figure 3

    monkeypatch.setattr(bench_run, "save_figure_slices", killed)
    assert main(argv) == 130
    assert (run / "eval" / "summary.json").exists() and not is_done(run)
    evaluated = (run / "eval" / "summary.json").stat().st_mtime_ns
    monkeypatch.setattr(bench_run, "save_figure_slices", real)
    assert main(argv) == 0
    assert (run / "figure3.npz").exists() and is_done(run)
    assert (run / "eval" / "summary.json").stat().st_mtime_ns == evaluated  # not evaluated again
    assert json.loads((run / "timing.json").read_text())["evaluate_s"] >= 0  # its time kept
    assert json.loads((run / "status.json").read_text())["files"][-1] == "figure3.npz"
    (run / "figure3.npz").unlink()  # a listed file removed: the run is not finished
    assert not is_done(run)
    mark_status(run)  # ... and once taken up again, not before it is done again
    (run / "timing.json").touch()  # (newer than the summary, as in a finished old folder)
    assert not is_done(run)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "nowhere"], "pDDPM's layout"),
        (["--run-index", "3"], "--run-index"),
    ],
)
def test_a_refused_benchmark_leaves_nothing_that_refuses_the_corrected_command(
    tiny_bench, tmp_path, capsys, extra, message
):
    from maediff.cli import main

    out = tmp_path / "b"
    argv = ["benchmark", "-o", str(out), *BENCH, *extra]
    if "--data" not in extra:
        argv += ["--data", str(tiny_bench)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (out / "benchmark.json").exists()


def test_a_run_finished_while_waiting_for_its_lock_is_not_run_again(tmp_path, monkeypatch):
    plan = benchmark.BenchmarkPlan.from_args(models=["thresh"], scale="tiny")
    looks = []

    def done_on_second_look(folder):
        looks.append(folder)
        return len(looks) > 1  # another process finished it between the two looks

    def execute(*a, **k):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(benchmark, "is_done", done_on_second_look)
    monkeypatch.setattr(benchmark, "execute_run", execute)
    benchmark._run_all(plan, plan.runs(), tmp_path, tmp_path, "cpu", False)
    assert len(looks) == 2


def test_parallel_processes_generate_the_synthetic_data_once(tmp_path, monkeypatch):
    calls = []

    def generate(data, cfg, overwrite, progress):
        calls.append(data)
        time.sleep(0.3)
        data.mkdir(parents=True)
        (data / "synthetic.json").write_text("{}")

    monkeypatch.setattr(benchmark, "generate_benchmark", generate)
    plan = benchmark.BenchmarkPlan.from_args(models=["thresh"], scale="tiny")
    found = []
    jobs = [
        threading.Thread(target=lambda: found.append(benchmark.ensure_data(plan, tmp_path, False)))
        for _ in range(2)
    ]
    for j in jobs:
        j.start()
    for j in jobs:
        j.join()
    assert len(calls) == 1 and found == [tmp_path / "data"] * 2
