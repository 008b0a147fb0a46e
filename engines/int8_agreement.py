"""Does ONNX Runtime's INT8 arithmetic on *this* CPU give the answers the Q/DQ graph defines?

An INT8 Q/DQ model defines its arithmetic exactly: integer products summed in 32 bits, then
requantized. ONNX Runtime's x86 kernels do not all honour that. Its u8s8 GEMM on CPUs without VNNI
(AVX2, AVX-512 without VNNI) multiplies with ``vpmaddubsw``, which adds each *pair* of u8×s8
products into a signed 16-bit lane and saturates at ±32767. With 8-bit weights a pair reaches
2·255·127 = 64770, so on those CPUs some sums are clipped and the model's outputs move — by up to
0.47 in coverage on the first demo detector — while VNNI/AMX kernels (32-bit accumulation) are
exact. The same model then answered differently per CPU class.

The recipe quantizes weights to 7 bits (``reduce_range``: symmetric, [-64, 64], still INT8 with
zero point 0 for TensorRT). A pair then reaches at most 2·255·64 = 32640 < 32767, so no kernel
saturates on any x86-64 class. This module checks both halves of that argument:

* ``weight_bound(path)``: the largest |q| of any INT8 weight — the static condition, CPU-independent.
* ``agreement(path, inputs)``: ONNX Runtime's INT8 output on the CPU it runs on against the exact
  reference (``session.disable_quant_qdq``: the same Q/DQ graph with every quantize/dequantize done
  in float32), in units of each output's own quantization step (LSB).

**Tolerance** (``TOLERANCE``). Exact kernels and the float reference still differ by rounding: an
accumulator that lands on a .5 tie, or float32 summation order, flips an intermediate activation by
one step, which later layers carry on. Measured on AVX-512-VNNI/AMX (exact kernels) with three
detectors built by the recipe: the largest single difference 5–7 LSB (coverage) and 2 LSB (bbox,
logits); the 99.9th percentile 1–2 LSB on the 16 probe scenes of the test, 3.6 LSB on 2 scenes
(there it is the fifth-largest of 5408 values). With saturation (the first, 8-bit detector under an
AVX2-only CPU model, 2 scenes): the 99.9th percentile was 21–40 LSB and the maximum 37–51 LSB. So a
model agrees when its 99.9th percentile is within 4 LSB and no value is more than 12 LSB away: above
every rounding-noise figure, at most a third of the smallest saturation error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

SATURATION_FREE_BOUND = 64  # 2 * 255 * 64 = 32640 <= 32767: a u8*s8 pair sum fits in int16


@dataclass(frozen=True)
class Tolerance:
    p999_lsb: float = 4.0
    max_lsb: float = 12.0


TOLERANCE = Tolerance()


@dataclass(frozen=True)
class OutputAgreement:
    name: str
    lsb: float  # the output's quantization step (scale of its final DequantizeLinear)
    max_lsb: float
    p999_lsb: float

    def within(self, tol: Tolerance = TOLERANCE) -> bool:
        return self.max_lsb <= tol.max_lsb and self.p999_lsb <= tol.p999_lsb

    def __str__(self) -> str:
        return f"{self.name}: max {self.max_lsb:.1f} LSB, p99.9 {self.p999_lsb:.1f} LSB (LSB {self.lsb:.4g})"


def cpu_class() -> str:
    """The x86 class that decides which INT8 kernels ONNX Runtime picks here."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        return "unknown"
    if "amx_int8" in flags:
        return "AMX-INT8 + AVX-512-VNNI"
    if "avx512_vnni" in flags:
        return "AVX-512-VNNI"
    if "avx_vnni" in flags:
        return "AVX-VNNI"
    if "avx512bw" in flags:
        return "AVX-512 (no VNNI)"
    if "avx2" in flags:
        return "AVX2 (no AVX-512, no VNNI)"
    return "pre-AVX2"


def weight_bound(path: Path) -> int:
    """Largest |q| over the model's INT8 weight tensors (initializers of rank > 1)."""
    model = onnx.load(str(path))
    bound = 0
    for t in model.graph.initializer:
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1:
            bound = max(bound, int(np.abs(numpy_helper.to_array(t).astype(np.int32)).max()))
    return bound


def output_steps(path: Path) -> dict[str, float]:
    """Each graph output's quantization step: the scale of the DequantizeLinear that produces it."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    steps = {}
    for out in model.graph.output:
        node = producer.get(out.name)
        if node is None or node.op_type != "DequantizeLinear" or node.input[1] not in inits:
            raise ValueError(f"{path}: output {out.name} is not produced by a DequantizeLinear with a constant scale")
        steps[out.name] = float(np.max(inits[node.input[1]]))
    return steps


def ort_session(path: Path, exact: bool) -> ort.InferenceSession:
    """One-thread CPU session of ``path``: its INT8 kernels, or (``exact``) the Q/DQ arithmetic in float."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if exact:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run(path: Path, inputs: np.ndarray, exact: bool, batch: int = 8) -> dict[str, np.ndarray]:
    """Outputs of ``path`` on float32 NCHW ``inputs``: INT8 kernels, or the exact float reference."""
    sess = ort_session(path, exact)
    name = sess.get_inputs()[0].name
    outs = [o.name for o in sess.get_outputs()]
    parts = [sess.run(outs, {name: inputs[i : i + batch]}) for i in range(0, len(inputs), batch)]
    return {o: np.concatenate([p[k] for p in parts]) for k, o in enumerate(outs)}


def compare(path: Path, int8: dict[str, np.ndarray], exact: dict[str, np.ndarray]) -> list[OutputAgreement]:
    steps = output_steps(path)
    result = []
    for name, ref in exact.items():
        diff = np.abs(int8[name].astype(np.float64) - ref.astype(np.float64)) / steps[name]
        result.append(OutputAgreement(name, steps[name], float(diff.max()), float(np.quantile(diff, 0.999))))
    return result


def agreement(path: Path, inputs: np.ndarray) -> list[OutputAgreement]:
    """Per output, how far this CPU's INT8 kernels are from the exact Q/DQ arithmetic."""
    return compare(path, run(path, inputs, exact=False), run(path, inputs, exact=True))


def probe_inputs(kind: str, width: int, height: int, seeds: range) -> np.ndarray:
    """Float32 NCHW × 1/255 inputs like the server's: whole scenes for a detector, object crops for
    a classifier (the recipe's data, from seeds no recipe step uses)."""
    import cv2

    from engines.data import crop_box
    from engines.scenes import generate_scene

    images = []
    for seed in seeds:
        scene = generate_scene(seed)
        rgb = scene.decode_rgb()
        if kind == "detector":
            images.append(cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA))
        else:
            images += [cv2.resize(crop_box(rgb, o.box, 0.05), (width, height), interpolation=cv2.INTER_AREA)
                       for o in scene.objects]
    x = np.stack(images).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, np.float32) / np.float32(255.0)


def main() -> None:
    import argparse

    from infer_server.stage.model_repo import ModelRepository

    p = argparse.ArgumentParser(description="ONNX Runtime INT8 on this CPU vs the exact Q/DQ arithmetic.")
    p.add_argument("--models", type=Path, default=Path(__file__).resolve().parent / "models")
    p.add_argument("--scenes", type=int, default=16)
    p.add_argument("--save", type=Path, help="write inputs and both outputs to this .npz per model (DIR)")
    p.add_argument("--load", type=Path, help="take inputs and exact outputs from --save's files (DIR)")
    args = p.parse_args()
    repo = ModelRepository.load(args.models)
    print(f"CPU class: {cpu_class()}")
    for entry in (repo.detector, *repo.classifiers):
        cfg = entry.config
        if args.load:
            z = np.load(args.load / f"{cfg.name}.npz")
            x = z["input"]
            exact = {k[len("exact/"):]: z[k] for k in z.files if k.startswith("exact/")}
        else:
            x = probe_inputs(cfg.kind, cfg.input.width, cfg.input.height, range(7_100_000, 7_100_000 + args.scenes))
            exact = run(entry.onnx_path, x, exact=True)
        int8 = run(entry.onnx_path, x, exact=False)
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            np.savez(args.save / f"{cfg.name}.npz", input=x, **{f"exact/{k}": v for k, v in exact.items()})
        res = compare(entry.onnx_path, int8, exact)
        verdict = "agrees" if all(r.within() for r in res) else "DISAGREES"
        print(f"{cfg.name}: |q| <= {weight_bound(entry.onnx_path)}, {len(x)} inputs, {verdict}; "
              + "; ".join(map(str, res)), flush=True)


if __name__ == "__main__":
    main()
