"""`python -m bench.serving --tiny`: the real bot process and worker (tiny model, CPU) driven through the fake Discord
from a fresh data directory, with the engine bench's rows in the same run. Correctness only: every figure was
measured and every job the benchmark sent came back; the times are figures for docs/BENCHMARKS.md, not
assertions."""
from __future__ import annotations

import json
import statistics

from bench.serving.__main__ import main


def test_tiny_serving_bench_measures_every_figure_through_the_bot_beside_the_engine(tmp_path, capsys):
    out = tmp_path / "serving.json"
    code = main(["--tiny", "--json", str(out), "--work-dir", str(tmp_path)])
    report = json.loads(out.read_text())
    assert code == 0, report["errors"]

    served = report["served"]
    assert served["train_cold_s"] > 0 and served["train_warm_s"] > 0
    assert served["imagine_first_after_ready_s"] > 0 and served["start_to_ready_s"] > 0
    assert served["imagine_alone"]["count"] == 3
    # Where /imagine alone's time went: every part measured, the engine inside the worker's part, and the parts
    # together about what the member waited (medians of each part, so not exactly).
    parts = served["imagine_alone_parts"]
    assert set(parts) == {"command_to_queued_s", "queued_to_started_s", "worker_s", "engine_s", "finished_to_posted_s"}
    assert all(value >= 0 for value in parts.values()), parts
    assert 0 < parts["engine_s"] <= parts["worker_s"]
    total = sum(value for name, value in parts.items() if name != "engine_s")
    assert abs(total - served["imagine_alone"]["p50_s"]) < 0.5 * served["imagine_alone"]["p50_s"], parts
    # Where each /train's time went: its parts add up to what the member waited (one job each, so exactly, up to
    # rounding), the engine's phases and the other members' jobs served in between inside the worker's part.
    for key in ("cold", "warm"):
        train = served[f"train_{key}_parts"]
        assert all(value >= 0 for value in train.values()), train
        assert train["engine_steps_s"] > 0 and train["engine_samples_s"] > 0, train
        inside = train["others_between_s"] + sum(v for name, v in train.items() if name.startswith("engine_"))
        assert inside <= train["worker_s"] + 0.05, train
        total = sum(train[name] for name in ("command_to_queued_s", "queued_to_started_s", "worker_s",
                                             "finished_to_posted_s"))
        assert abs(total - served[f"train_{key}_s"]) < 0.05, (train, served[f"train_{key}_s"])
    assert served["train_cold_parts"]["engine_class_images_s"] > served["train_warm_parts"].get(
        "engine_class_images_s", 0.0)  # the second training found the class images made
    assert served["train_cold_parts"]["others_between_s"] > 0  # the other member's /imagine ran in between
    assert served["imagine_with_concept"]["count"] == 3 and served["imagine_with_concept"]["first_s"] > 0
    assert served["imagine_during_training"]["count"] >= 2  # at least one during each of the two trainings
    burst = served["burst"]
    assert burst["members"] == 8 and len(burst["rounds_s"]) == 3 and burst["images_per_s_overall"] > 0
    last = burst["last_parts"]  # the last result of each round, from the round's start: its parts add up to it
    assert set(last) == set(parts) and all(value >= 0 for value in last.values()), last
    assert 0 < last["engine_s"] <= last["worker_s"]
    total = sum(value for name, value in last.items() if name != "engine_s")
    assert abs(total - statistics.median(burst["rounds_s"])) < 0.5 * statistics.median(burst["rounds_s"]), last
    mixed = served["burst_concepts"]  # the two trained concepts, shared, alternating over the members
    assert mixed["members"] == 8 and len(mixed["rounds_s"]) == 3 and mixed["first_round_s"] > 0
    assert mixed["images_per_s_overall"] > 0 and mixed["last_parts"]["engine_s"] > 0
    assert all(row["value"] is not None for row in report["served_rows"] if row["figure"] != "gpu_peak_gb"), \
        report["served_rows"]
    assert served["gpu_peak_gb"] is None  # a CPU worker reports no GPU memory to the metrics endpoint
    # A CPU worker compiles nothing ahead of time (auto: CUDA GPUs of 22 GB or more), so nothing was waited for.
    assert served["compiled_ahead"] == {"requested": 0, "in_use": 0, "refused": 0, "waited_s": 0.0}

    engine = {row["metric"]: row for row in report["engine"]["rows"]}
    assert set(engine) >= {"train_s", "imagine_s", "throughput_ips"}
    assert all(row["reference"] > 0 and row["ours"] > 0 for row in engine.values()), engine

    printed = capsys.readouterr().out
    assert json.loads(printed.splitlines()[-1]) == report  # the last line is the report
    env = report["environment"]
    assert env["gpu"] in printed and env["date"] in printed and env["torch"] in printed
    assert "| through the bot |" in printed and "| engine, same command" in printed
    assert "| where /imagine alone's time went (median) | s |" in printed
    assert "| where /train's time went | cold (s) | class images cached (s) |" in printed


def test_each_figure_is_checked_against_its_goal_in_its_direction():
    from bench.serving.report import served_rows

    rows = {row["figure"]: row for row in served_rows({
        "train_cold_s": 20.0, "train_warm_s": 16.0, "imagine_alone": {"p50_s": 0.3, "p99_s": 0.4},
        "burst": {"images_per_s_overall": 9.0}})}
    assert rows["train_cold_s"]["met"] is True and rows["train_warm_s"]["met"] is False  # <= 25 s, <= 15 s
    assert rows["imagine_alone.p50_s"]["met"] is False and rows["imagine_alone.p99_s"]["met"] is None  # no goal
    assert rows["burst.images_per_s_overall"]["met"] is True  # >= 8 images/s: more is better
    assert rows["imagine_first_after_ready_s"]["value"] is None and rows["imagine_first_after_ready_s"]["met"] is None


def test_the_shapes_compiled_ahead_are_counted_from_the_workers_lines_in_the_bots_log():
    from bench.serving.served_bot import compiled_ahead_counts

    log = ("INFO worker[12]: worker: compiling the UNet forward for 2 shape(s) in process 40 (log: /d/compile.log)\n"
           "INFO worker[12]: worker: compiled UNet forward in use for 2 rows of 64x64 latents, 77 tokens\n"
           "INFO worker[12]: worker: compiled UNet forward 3f2a9c0d11aa22bb not used: it could not be compiled\n"
           "INFO worker[12]: worker: compiling the UNet forward for 1 shape(s) in process 41 (log: /d/compile.log)\n")
    assert compiled_ahead_counts(log) == {"requested": 3, "in_use": 1, "refused": 1}
    assert compiled_ahead_counts("") == {"requested": 0, "in_use": 0, "refused": 0}


def test_the_gpu_peak_is_read_from_the_bots_metrics_as_the_largest_lanes():
    from bench.serving.served_bot import PEAK_LINE

    exposition = ("# HELP boothbot_gpu_memory_peak_bytes The most GPU memory ...\n"
                  "# TYPE boothbot_gpu_memory_peak_bytes gauge\n"
                  'boothbot_gpu_memory_peak_bytes{lane="0"} 1.5654584e+010\n'
                  'boothbot_gpu_memory_peak_bytes{lane="1"} 2.147483648e+09\n'
                  'boothbot_gpu_memory_reserved_bytes{lane="0"} 9.0e+09\n')
    assert [float(v) for v in PEAK_LINE.findall(exposition)] == [1.5654584e10, 2.147483648e9]
