"""pipeline/estimate.py: `benchmark --list` counts the jobs and states each one's time,
measured once on this machine (cached), or recorded by finished runs."""

import json

import pytest

from maediff.cli import main
from maediff.pipeline import estimate
from maediff.pipeline.benchmark import BenchmarkPlan

LIST = ["--scale", "tiny", "--steps", "2", "--max-volumes", "1", "--device", "cpu", "--list"]


def _commands(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("maediff benchmark")]


def test_list_counts_the_jobs_without_measuring(tmp_path, capsys, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("--no-estimate measured")

    monkeypatch.setattr(estimate, "measure_step", refuse)
    monkeypatch.setattr(estimate, "measure_slice", refuse)
    argv = ["benchmark", "-o", str(tmp_path / "b"), "--models", "thresh", "ae"]
    argv += ["--folds", "0", "1", "--seeds", "0", "1", "--no-estimate", *LIST]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "# 8 job(s), 0 finished" in out and "not measured (--no-estimate)" in out
    runs = [c for c in _commands(out) if "--run-index" in c]
    assert len(runs) == 8 and runs[-1].endswith("--run-index 7")
    assert out.count("train 2 steps (?)") == 4 and out.count("no training") == 4
    # --max-volumes 1: 6 protocol volumes, and Figure 3's 3 for the first run
    assert "# 0: thresh/fold0-seed0: no training, evaluate 9 volumes" in out
    assert "# 1: thresh/fold0-seed1: no training, evaluate 6 volumes" in out
    assert not (tmp_path / "b" / "estimates.json").exists()


def test_estimates_are_measured_once_and_reused(tmp_path, capsys, monkeypatch):
    out = tmp_path / "b"
    argv = ["benchmark", "-o", str(out), "--models", "thresh", "ae", "--seeds", "0", "1", *LIST]
    assert main(argv) == 0
    first = capsys.readouterr().out
    cache = json.loads((out / "estimates.json").read_text())["entries"]
    assert sorted(e["what"] for e in cache.values()) == ["ae-tiny on cpu", "thresh-tiny on cpu"]
    ae = next(e for e in cache.values() if e["what"] == "ae-tiny on cpu")
    assert ae["step_s"] > 0 and ae["validation_s"] > 0 and ae["slice_s"] > 0
    assert ae["threads"] >= 1
    assert first.count("# measuring") == 2 and "measured on this machine: cpu" in first

    def refuse(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(estimate, "measure_step", refuse)
    monkeypatch.setattr(estimate, "measure_slice", refuse)
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert "# measuring" not in second
    assert second == first.replace("# measuring thresh-tiny on cpu ...\n", "").replace(
        "# measuring ae-tiny on cpu ...\n", ""
    )


def _finished(out, key, train_s, evaluate_s):
    folder = out / "runs" / key
    folder.mkdir(parents=True)
    (folder / "timing.json").write_text(json.dumps({"train_s": train_s, "evaluate_s": evaluate_s}))
    (folder / "status.json").write_text(json.dumps({"state": "done", "files": ["timing.json"]}))


def test_finished_runs_give_their_recorded_times(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("measured although a finished run recorded its times")

    monkeypatch.setattr(estimate, "measure_step", refuse)
    monkeypatch.setattr(estimate, "measure_slice", refuse)
    out = tmp_path / "b"
    plan = BenchmarkPlan.from_args(
        models=["ae"], scale="tiny", seeds=[0, 1, 2], steps=2, max_volumes=1
    )
    _finished(out, "ae/fold0-seed1", 100.0, 20.0)
    jobs = estimate.estimate_jobs(plan, out, "cpu", say=lambda *a, **k: None)
    assert [j.source for j in jobs] == ["recorded", "done", "recorded"]
    # the first run also reconstructs Figure 3's 3 volumes: 9 against 6, 20 s per 6
    assert [j.volumes for j in jobs] == [9, 6, 6]
    assert [j.total_s for j in jobs] == pytest.approx([130.0, 120.0, 120.0])
    assert [j.left_s for j in jobs] == pytest.approx([130.0, 0.0, 120.0])
    assert estimate.split_two(jobs) == ([0], [2])
    lines = estimate.summary_lines(jobs, "cpu", measure=True)
    assert "# 3 job(s), 1 finished" in lines[0]
    assert "4 min in one process; 2 min in two processes" in lines[1]
    assert "(--run-index 0 and --run-index 2)" in lines[1]


def test_a_bad_estimates_file_is_named(tmp_path):
    (tmp_path / "estimates.json").write_text("{not json")
    with pytest.raises(ValueError, match="estimates.json is no estimates file"):
        estimate.load_cache(tmp_path)


@pytest.mark.slow
def test_with_data_the_protocols_own_time_is_measured(tiny_bench, tmp_path):
    out = tmp_path / "b"
    plan = BenchmarkPlan.from_args(
        models=["thresh"], scale="tiny", data=tiny_bench, steps=2, max_volumes=1
    )
    jobs = estimate.estimate_jobs(plan, out, "cpu", say=lambda *a, **k: None)
    cache = json.loads((out / "estimates.json").read_text())["entries"]
    protocol = next(e for e in cache.values() if e["what"].startswith("the protocol"))
    thresh = next(e for e in cache.values() if e["what"].startswith("thresh-tiny"))
    assert protocol["run_s"] + protocol["volume_s"] > 0
    (job,) = jobs
    assert job.source == "measured" and job.volumes == 9  # 6 protocol + 3 Figure 3
    reconstruction = thresh["slice_s"] * 8 * 9  # tiny volumes: 8 slices
    expected = reconstruction + protocol["run_s"] + 9 * protocol["volume_s"]
    assert job.evaluate_s == pytest.approx(expected)


def test_two_processes_share_the_jobs_by_time_and_by_count_without_times():
    def job(s, source="measured"):
        return estimate.JobEstimate(300, 10, s, 0.0 if s is not None else None, source)

    timed = [job(100.0), job(10.0), job(50.0), job(40.0), job(5.0, "done")]
    assert estimate.split_two(timed) == ([0], [1, 2, 3])  # 100 against 100; the done job out
    unknown = [job(None, "not measured") for _ in range(5)]
    a, b = estimate.split_two(unknown)
    assert sorted(a + b) == [0, 1, 2, 3, 4] and {len(a), len(b)} == {2, 3}
