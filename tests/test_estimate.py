"""benchmark/estimate.py: `benchmark --list` counts the jobs and states each one's time,
measured once on this machine (cached), or recorded by finished runs."""

import json
from pathlib import Path

import pytest

from maediff.benchmark import BenchmarkPlan, estimate
from maediff.cli import main

READ_CPU_SECONDS = estimate.cpu_seconds  # before the fixture replaces it

LIST = ["--scale", "tiny", "--steps", "2", "--max-volumes", "1", "--device", "cpu", "--list"]


@pytest.fixture(autouse=True)
def idle_machine(monkeypatch):
    """Measurements here do not depend on what else the machine runs (the busy
    check is tested on its own, with counters given)."""
    monkeypatch.setattr(estimate, "cpu_seconds", lambda: None)


def test_a_measurement_on_a_busy_cpu_serves_the_listing_but_is_not_kept(tmp_path, monkeypatch):
    readings = iter([(100.0, 1.0), (106.0, 3.0)])  # 6 CPU s in all, 2 of them ours
    clock = iter([10.0, 12.0])  # over 2 s: others used 2 cores
    monkeypatch.setattr(estimate, "cpu_seconds", lambda: next(readings))
    monkeypatch.setattr(estimate.time, "perf_counter", lambda: next(clock))
    said: list[str] = []
    cache: dict = {}

    def say(text, **k):
        said.append(text)

    entry = estimate.cached(tmp_path, cache, "k", lambda: {"step_s": 9.0}, say, "m", "cpu")
    assert entry["step_s"] == 9.0 and entry["busy"] == 2.0 and "k" in cache
    assert "other processes used 2.0 of" in said[-1] and "not kept" in said[-1]
    assert json.loads((tmp_path / "estimates.json").read_text())["entries"] == {}
    # on an idle machine the same measurement is kept
    readings = iter([(100.0, 1.0), (102.2, 3.0)])
    clock = iter([10.0, 12.0])
    entry = estimate.cached(tmp_path, {}, "k", lambda: {"step_s": 1.0}, say, "m", "cpu")
    kept = json.loads((tmp_path / "estimates.json").read_text())["entries"]
    assert "busy" not in entry and kept["k"]["step_s"] == 1.0


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads /proc/stat (Linux)")
def test_cpu_seconds_counts_this_process_within_the_machine():
    before = READ_CPU_SECONDS()
    x = 0
    for i in range(3_000_000):  # about a CPU second of our own
        x += i
    after = READ_CPU_SECONDS()
    ours = after[1] - before[1]
    assert ours > 0.05
    assert after[0] - before[0] >= ours - 0.05  # the machine's count includes ours


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
