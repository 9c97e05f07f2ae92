"""Check the bundled digits model with onnx.checker and onnxruntime (no torch needed).

    /work/venv/bin/python models/digits/check.py

Prints the test/calib accuracy under onnxruntime, the op histogram, opset, parameter count and file
sizes, and fails if the ONNX accuracy differs from the torch accuracy recorded at export time.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

HERE = Path(__file__).resolve().parent


def main() -> int:
    path = HERE / "digits.onnx"
    proto = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(proto, full_check=True)
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer)
    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    ops = Counter(n.op_type for n in proto.graph.node)
    n_params = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    meta = {p.key: p.value for p in proto.metadata_props}
    print(f"opset {opsets}  nodes {len(proto.graph.node)}  initializer elements {n_params}")
    print("ops " + ", ".join(f"{k} x{v}" for k, v in sorted(ops.items())))
    print("inputs", [(i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim])
                     for i in proto.graph.input])
    print("outputs", [(o.name, [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim])
                      for o in proto.graph.output])

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    accs = {}
    for name in ("calib", "test"):
        data = np.load(HERE / f"{name}.npz")
        x, y = data["input"], data["labels"]
        assert x.dtype == np.float32 and x.shape[1:] == (1, 32, 32) and y.dtype == np.int64
        logits = sess.run(["logits"], {"input": x})[0]
        accs[name] = float((logits.argmax(1) == y).mean())
        print(f"{name}: {len(y)} samples, onnxruntime accuracy {accs[name]:.4f} "
              f"({int((logits.argmax(1) == y).sum())}/{len(y)})")
    for f in ("digits.onnx", "calib.npz", "test.npz"):
        print(f"size {f}: {(HERE / f).stat().st_size} bytes")

    torch_acc = float(meta.get("torch_test_accuracy", "nan"))
    if abs(torch_acc - accs["test"]) > 1e-6:
        print(f"MISMATCH: torch test accuracy {torch_acc} != onnxruntime {accs['test']}")
        return 1
    print(f"onnxruntime test accuracy equals torch's ({torch_acc:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
