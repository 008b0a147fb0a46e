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
    return {t.name: t.passed for t in evaluate_targets(runs, {}, {}, "full")}


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
