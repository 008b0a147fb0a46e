"""Every model in the repository gives the same answers on every x86-64 CPU class.

Two checks (the argument is in ``engines.int8_agreement``): the static one — every INT8 weight is
within ±64, so no u8×s8 pair sum can saturate a 16-bit lane on any CPU — and the dynamic one — on
the CPU running this test, ONNX Runtime's INT8 outputs match the exact Q/DQ arithmetic within the
stated tolerance. The first demo models (8-bit weights) fail the static check everywhere and the
dynamic one on AVX2-only CPUs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engines.int8_agreement import SATURATION_FREE_BOUND, TOLERANCE, agreement, cpu_class, probe_inputs, weight_bound
from infer_server.stage.model_repo import ModelEntry, ModelRepository

MODELS = Path(__file__).resolve().parents[2] / "engines" / "models"
REPO = ModelRepository.load(MODELS)
ENTRIES = {e.config.name: e for e in (REPO.detector, *REPO.classifiers)}
SEEDS = range(7_100_000, 7_100_016)  # disjoint from the recipe's and the accuracy test's seeds


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_int8_weights_cannot_saturate_a_16_bit_pair_sum(name: str) -> None:
    bound = weight_bound(ENTRIES[name].onnx_path)
    assert bound <= SATURATION_FREE_BOUND, f"{name}: INT8 weights reach {bound} (7-bit weights stay within 64)"


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_onnxruntime_int8_matches_the_exact_qdq_arithmetic_on_this_cpu(name: str) -> None:
    entry: ModelEntry = ENTRIES[name]
    cfg = entry.config
    inputs = probe_inputs(cfg.kind, cfg.input.width, cfg.input.height, SEEDS)
    result = agreement(entry.onnx_path, inputs)
    summary = f"{name} on {cpu_class()}, {len(inputs)} inputs: " + "; ".join(map(str, result))
    print(summary)
    assert all(r.within(TOLERANCE) for r in result), f"{summary} (tolerance {TOLERANCE})"
