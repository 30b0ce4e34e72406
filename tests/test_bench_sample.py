"""bench_sample.py's GPU-idle analysis on hand-made profiler traces (CPU): the union of busy intervals, the gaps
between them and the steady-state window between the renders."""

from __future__ import annotations

import pytest

from tiny_weights import load_script

bench_sample = load_script("bench_sample", folder="bench")


def test_gaps_between_merges_overlapping_and_nested_intervals():
    busy, gaps = bench_sample.gaps_between([
        (10.0, 20.0, "c"), (0.0, 5.0, "a"), (3.0, 8.0, "b"),  # a and b overlap: busy 0-8
        (12.0, 15.0, "nested"),  # inside c: busy 10-20
        (26.0, 30.0, "d"),
    ])
    assert busy == pytest.approx(8 + 10 + 4)
    assert gaps == [(6.0, "c", "d"), (2.0, "b", "c")]  # longest first, named by the work on either side


def test_gaps_between_of_touching_or_no_intervals():
    assert bench_sample.gaps_between([(0.0, 1.0, "a"), (1.0, 2.0, "b")]) == (2.0, [])
    assert bench_sample.gaps_between([]) == (0.0, [])


def _event(ts: float, dur: float, name: str, cat: str = "kernel") -> dict:
    return {"ts": ts, "dur": dur, "name": name, "cat": cat}


def test_steady_state_idle_counts_only_the_steps_between_the_renders():
    events = [
        _event(0, 50, "set-up kernel"),  # before the first render: left out
        _event(100, 10, "projection"), _event(110, 60, "conv"), _event(180, 5, "x", cat="gpu_memcpy"),  # step 1
        _event(200, 10, "projection"), _event(230, 70, "conv"),  # step 2: idle 210-230
        _event(300, 10, "projection"), _event(400, 100, "final pass"),  # last render: the window ends at its start
        {"ph": "X", "ts": 120, "dur": 500, "name": "cpu op", "cat": "cpu_op"},  # CPU events are ignored
    ]
    idle = bench_sample.steady_state_idle(events)
    assert idle["steps"] == 2
    assert idle["ms_per_step"] == pytest.approx(0.1)  # 200 us over 2 steps
    assert idle["busy_ms_per_step"] == pytest.approx((10 + 60 + 5 + 10 + 70) / 2 / 1e3)
    assert idle["idle_ms_per_step"] == pytest.approx((10 + 15 + 20) / 2 / 1e3)  # 170-180, 185-200, 210-230
    assert idle["largest_gaps_us"][0] == (20.0, "projection", "conv")
    assert idle["long_gaps_per_step"] == 0.5  # the 20 us gap: 20 us or more
    assert idle["long_gap_ms_per_step"] == pytest.approx(20 / 2 / 1e3)
    assert idle["short_gaps_per_step"] == 1.0  # the 10 and 15 us gaps
    finer = bench_sample.steady_state_idle(events, long_gap_us=10.0)
    assert finer["long_gap_ms_per_step"] == pytest.approx((10 + 15 + 20) / 2 / 1e3)
    assert finer["short_gaps_per_step"] == 0


def test_steady_state_idle_needs_two_renders():
    with pytest.raises(ValueError, match="projection"):
        bench_sample.steady_state_idle([_event(0, 10, "projection"), _event(20, 10, "conv")])
