"""benchmarks/server_throughput.py: its arguments, statistics, and one tiny run end to end."""

from __future__ import annotations

import json

import pytest

from benchmarks import server_throughput as bench


def test_percentile_interpolates_between_closest_ranks():
    values = list(range(1, 101))  # 1..100, shuffled order must not matter
    values.reverse()
    assert bench.percentile(values, 50) == pytest.approx(50.5)
    assert bench.percentile(values, 95) == pytest.approx(95.05)
    assert bench.percentile(values, 0) == 1
    assert bench.percentile(values, 100) == 100
    assert bench.percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert bench.percentile([7.0], 95) == 7.0


def test_percentile_refuses_empty_input_and_bad_q():
    with pytest.raises(ValueError, match="no values"):
        bench.percentile([], 50)
    with pytest.raises(ValueError, match="0..100"):
        bench.percentile([1, 2], 101)


def test_summary_and_overhead():
    s = bench.summary([4.0, 1.0, 2.0, 3.0])
    assert s == {"p50": pytest.approx(2.5), "p95": pytest.approx(3.85), "max": 4.0,
                 "mean": pytest.approx(2.5)}
    o = bench.overhead(server_wall=12.0, api_wall=10.0, jobs=4)
    assert o == {"per_job_s": pytest.approx(0.5), "percent": pytest.approx(20.0)}


def _job(submitted, started, finished, received):
    return {"prompt_id": f"p{submitted}", "submitted": submitted, "started": started,
            "finished": finished, "received": received, "latency_s": received - submitted}


def test_summarize_takes_median_walls_and_pools_latencies():
    rounds = [  # API walls 4, 8, 6 -> median 6; server walls 5, 12, 7 -> median 7
        {"api_s": [1.0, 3.0], "api_wall_s": 4.0, "server_wall_s": 5.0,
         "api_cpu_s": 8.0, "server_cpu_s": 10.0,
         "jobs": [_job(0, 0, 2, 2.5), _job(0, 2, 4, 5.0)]},
        {"api_s": [4.0, 4.0], "api_wall_s": 8.0, "server_wall_s": 12.0,
         "api_cpu_s": 16.0, "server_cpu_s": 17.0,
         "jobs": [_job(10, 10, 14, 14.0), _job(10, 14, 19, 22.0)]},
        {"api_s": [3.0, 3.0], "api_wall_s": 6.0, "server_wall_s": 7.0,
         "api_cpu_s": 12.0, "server_cpu_s": 18.0,
         "jobs": [_job(20, 21, 24, 24.0), _job(20, 24, 27, 27.0)]},
    ]
    r = bench.summarize(rounds, clients=2)
    assert r["api"]["wall_s"] == 6.0 and r["server"]["wall_s"] == 7.0
    assert r["server"]["round_walls_s"] == [5.0, 12.0, 7.0]
    assert r["server"]["jobs_per_s"] == pytest.approx(2 / 7)
    # per round: +0.5 s/job (+25 %), +2 s/job (+50 %), +0.5 s/job (+16.7 %): medians of those,
    # not the difference of the median walls (+0.5 s/job, +16.7 %)
    assert r["overhead"] == {"per_job_s": pytest.approx(0.5), "percent": pytest.approx(25.0)}
    assert [o["percent"] for o in r["round_overheads"]] == pytest.approx([25, 50, 100 / 6])
    # CPU: +1 s/job (+25 %), +0.5 s/job (+6.25 %), +3 s/job (+50 %)
    assert r["cpu_overhead"] == {"per_job_s": pytest.approx(1.0), "percent": pytest.approx(25.0)}
    assert (r["api"]["cpu_s"], r["server"]["cpu_s"]) == (12.0, 17.0)
    assert r["server"]["latency"]["max"] == 12.0 and len(r["server"]["jobs"]) == 6
    assert r["server"]["queue_wait"]["max"] == 4.0  # submitted 10, started 14
    assert r["server"]["execution"]["p50"] == pytest.approx(3.0)
    assert r["server"]["return"]["max"] == pytest.approx(3.0)  # finished 19, received 22
    assert r["api"]["per_job"]["p50"] == pytest.approx(3.0)
    assert bench.server_wall(rounds[1]["jobs"]) == 12.0


def test_arguments_default_to_the_models_native_size():
    args = bench.parse_args([])
    assert (args.model, args.clients, args.workers, args.steps, args.size, args.rounds) == \
        ("default", 50, 1, 20, 128, 1)
    args = bench.parse_args(["--model", "tiny", "--clients", "3", "--steps", "1"])
    assert (args.model, args.clients, args.steps, args.size) == ("tiny", 3, 1, 64)
    assert bench.parse_args(["--model", "tiny", "--size", "32"]).size == 32


@pytest.mark.parametrize("argv", [["--clients", "0"], ["--size", "60"], ["--model", "sdxl"],
                                  ["--rounds", "0"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_cpu_seconds_counts_this_process_and_skips_dead_ones():
    import os

    before = bench.cpu_seconds([os.getpid()])
    sum(i * i for i in range(2_000_000))
    assert bench.cpu_seconds([os.getpid(), 2**22 + 12345]) > before


def test_jobs_have_the_same_settings_on_both_paths():
    args = bench.parse_args(["--model", "tiny", "--steps", "3", "--seed", "10"])
    assert bench.job_settings(args, 2) == {"prompt": bench.PROMPTS[2], "seed": 12, "steps": 3,
                                           "width": 64, "height": 64}


def test_missing_default_model_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr("noisecraft.engine.DEFAULT_MODEL_PATH", tmp_path / "none.safetensors")
    with pytest.raises(SystemExit, match="--model tiny"):
        bench.main(["--model", "default", "--out", str(tmp_path / "r.json")])


def test_tiny_run_end_to_end(tmp_path):  # ~16 s on 2 cores
    out = tmp_path / "result.json"
    result = bench.main(["--model", "tiny", "--clients", "3", "--steps", "1", "--threads", "1",
                         "--rounds", "2", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["server"]["latency"] == result["server"]["latency"]
    jobs = saved["server"]["jobs"]
    assert len(jobs) == 6 and len({j["prompt_id"] for j in jobs}) == 6
    assert len(saved["server"]["round_walls_s"]) == len(saved["api"]["round_walls_s"]) == 2
    for j in jobs:  # one clock; history keeps milliseconds
        times = [j["submitted"], j["started"], j["finished"], j["received"]]
        assert all(a <= b + 0.002 for a, b in zip(times[:-1], times[1:], strict=True)), j
    assert saved["server"]["jobs_per_s"] > 0 and saved["api"]["wall_s"] > 0
    assert "| server overhead per job (median) |" in saved["markdown"]
    assert saved["server"]["cpu_s"] > 0 and saved["api"]["cpu_s"] > 0
