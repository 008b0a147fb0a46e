"""The fps benchmark's verdicts on the data-path targets (benchmarks.report), from synthetic points."""

import pytest

from benchmarks.report import RunRecord, best, evaluate_targets, round_ratios

pytestmark = pytest.mark.unit


def _run(transport: str, k: int, fps: float, round_index: int = 0) -> RunRecord:
    return RunRecord(
        config="full", transport=transport, null_model=True, concurrency=k, mode="closed", offered_fps=None, fps=fps,
        p50_ms=1.0, p95_ms=1.0, p99_ms=1.0, image_p50_ms=1.0, image_p95_ms=1.0, image_p99_ms=1.0,
        ratio_to_bound=None, stable=True, windows_fps=[fps], images=1000, errors=0, failure="",
        cpu_ms_per_image={}, cpu_utilisation=1.0, other_cores=0.0, stage_ms={}, labels_per_image={},
        round_index=round_index,
    )  # fmt: skip


def _sweep() -> list[RunRecord]:
    return [_run("tmpfs", 1, 4000), _run("tmpfs", 4, 9000), _run("inline", 4, 2000), _run("inline", 16, 2200),
            _run("rest", 16, 850)]  # fmt: skip


def _verdicts(runs: list[RunRecord]) -> dict[str, bool | None]:
    """The verdicts on what was measured (the targets not measured are listed too, as None)."""
    return {t.name: t.passed for t in evaluate_targets(runs, {}, {}, "full") if t.passed is not None}


def test_without_rounds_the_best_points_of_the_sweep_are_compared() -> None:
    runs = _sweep()
    assert best(runs, "tmpfs", True).concurrency == 4  # type: ignore[union-attr]
    assert _verdicts(runs) == {"null model: tmpfs ≥ 4× inline": True, "null model: tmpfs ≥ 10× rest": True}


def test_rounds_decide_with_the_sweep_by_their_median() -> None:
    # The sweep passes both (9000/2200 = 4.09, 9000/850 = 10.6); two slower rounds do not.
    runs = _sweep() + [
        _run("tmpfs", 4, 7000, 1), _run("inline", 16, 2000, 1), _run("rest", 16, 800, 1),
        _run("inline", 16, 1900, 2), _run("rest", 16, 800, 2), _run("tmpfs", 4, 7600, 2),
    ]  # fmt: skip
    assert round_ratios(runs, "tmpfs", "inline") == pytest.approx([3.5, 4.0])
    assert _verdicts(runs) == {"null model: tmpfs ≥ 4× inline": True, "null model: tmpfs ≥ 10× rest": False}
    # A round's point never counts as the sweep's best, however fast.
    runs.append(_run("inline", 16, 9999, 3))
    assert best(runs, "inline", True).fps == 2200  # type: ignore[union-attr]
    assert "9999" not in next(t.measured for t in evaluate_targets(runs, {}, {}, "full") if "inline" in t.name)


def test_every_target_is_listed_when_nothing_was_measured() -> None:
    targets = evaluate_targets([], {}, {}, "full")
    assert len(targets) == 5
    assert all(t.passed is None and "not measured" in t.measured for t in targets)


def test_a_point_that_fails_is_recorded_and_the_sweep_goes_on(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A loaded machine whose clients do not start in time loses that point, not the run."""
    import json

    import numpy as np

    from benchmarks import fps
    from benchmarks.loadgen import PointResult
    from benchmarks.report import write_json

    def fake_point(workload, transport, *, concurrency, **kwargs):  # noqa: ANN001, ANN003, ANN202
        if concurrency == 2:
            raise RuntimeError("client processes did not start within 180 s")
        return PointResult(
            concurrency=concurrency, mode="closed" if kwargs.get("rate_images") is None else "paced",
            offered_fps=kwargs.get("rate_images"), fps=100.0 * concurrency, windows_fps=[100.0], stable=True,
            images=100, errors=0, failure="", batch_ms=np.ones(4), image_ms=np.ones(4), stage_ms={},
            labels_per_image={}, cpu_ms_per_image={}, cpu_utilisation=1.0, other_cores=0.0,
        )  # fmt: skip

    monkeypatch.setattr(fps, "run_point", fake_point)
    out = tmp_path / "partial.json"
    saved: list[int] = []

    def progress(bench: fps.Bench) -> None:
        saved.append(len(bench.runs) + len(bench.failed))
        write_json(out, {"runs": [r.to_json() for r in bench.runs], "failed": bench.failed})

    bench = fps.Bench("full", fps.Plan(), workload=object(), progress=progress)  # type: ignore[arg-type]
    bench.sweep(None, "127.0.0.1:1", "/dev/shm/x", "tmpfs", False, (1, 2, 4), paced=True)
    assert [(r.concurrency, r.mode) for r in bench.runs] == [(1, "closed"), (4, "closed"), (4, "paced")]
    assert bench.failed == [{"what": "tmpfs K=2 closed",
                             "reason": "RuntimeError: client processes did not start within 180 s"}]
    assert saved == [1, 2, 3, 4]  # written after every point, the failed one included
    doc = json.loads(out.read_text())
    assert len(doc["runs"]) == 3 and doc["failed"][0]["what"] == "tmpfs K=2 closed"
    assert best(bench.runs, "tmpfs", False).fps == 400  # type: ignore[union-attr]
