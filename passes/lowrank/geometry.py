"""What a layer's cost depends on: its :class:`Geometry` (kind, widths, kernel, spatial sizes, rows) and the
MACs and parameters each factorization scheme costs at given ranks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.linear import LinearLayer

SCHEMES = ("svd", "spatial", "tucker", "basis")


@dataclass(frozen=True)
class Geometry:
    """Shapes a layer's cost depends on: rows are output positions (conv, batch included) or output rows (gemm)."""

    kind: str  # gemm | matmul | conv
    d_in: int
    d_out: int
    kernel: tuple[int, ...] = ()
    in_spatial: tuple[int, ...] = ()
    out_spatial: tuple[int, ...] = ()
    rows: int = 1
    batch: int = 1

    @property
    def taps(self) -> int:
        return math.prod(self.kernel) if self.kernel else 1

    @property
    def channels(self) -> int:
        return self.d_in // self.taps

    @property
    def kxk(self) -> bool:
        return self.kind == "conv" and self.taps > 1

    @property
    def macs(self) -> int:
        return self.rows * self.d_in * self.d_out

    @property
    def params(self) -> int:
        return self.d_in * self.d_out

    def schemes(self, requested: str) -> list[str]:
        """Schemes that apply to this layer; 'svd' on a k×k conv is 'basis' (the same matrix SVD)."""
        if not self.kxk:
            return ["svd"]
        spatial_ok = len(self.kernel) == 2 and min(self.kernel) > 1
        if requested == "auto":
            return ["basis", "tucker"] + (["spatial"] if spatial_ok else [])
        if requested == "spatial" and not spatial_ok:
            return []
        return ["basis" if requested == "svd" else requested]

    def cost(self, scheme: str, ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(MACs, params) of the factorized layer for ranks [K, 1] (tucker: [K, 2] = (r_in, r_out))."""
        ranks = np.asarray(ranks, dtype=np.int64).reshape(len(ranks), -1)
        r = ranks[:, 0]
        c, n, kk = self.channels, self.d_out, self.taps
        if scheme in ("svd", "basis"):
            per = r * (self.d_in + n)
            return per * self.rows, per
        if scheme == "spatial":  # k×1 runs on (H_out, W_in) positions, 1×k on (H_out, W_out)
            kh, kw = self.kernel
            mid = self.batch * self.out_spatial[0] * self.in_spatial[1]
            return r * (c * kh * mid + n * kw * self.rows), r * (c * kh + n * kw)
        r_in, r_out = ranks[:, 0], ranks[:, 1]
        in_rows = self.batch * math.prod(self.in_spatial) if self.in_spatial else self.rows
        macs = r_in * c * in_rows + (r_out * r_in * kk + n * r_out) * self.rows
        return macs, r_in * c + r_out * r_in * kk + n * r_out


def _dims(value: ir.Value, shapes: dict) -> tuple[int, ...] | None:
    dims = shapes.get(value.name)
    if dims is None and value.shape is not None:
        dims = tuple(d if isinstance(d, int) else None for d in value.shape)
    return dims if dims is not None and all(isinstance(d, int) for d in dims) else None


def layer_geometry(layer: LinearLayer, shapes: dict) -> tuple[Geometry, bool]:
    """The layer's cost geometry (batch as inferred: 1 when symbolic) and whether its shapes were known."""
    out = _dims(layer.node.outputs[0], shapes)
    if layer.kind != "conv":
        rows = math.prod(out[:-1]) if out else 1
        return Geometry(layer.kind, layer.d_in, layer.d_out, rows=max(rows, 1)), out is not None
    x = _dims(layer.input, shapes)
    nsp = len(layer.kernel)
    known = x is not None and out is not None
    in_sp, out_sp = (tuple(x[2:]), tuple(out[2:])) if known else ((1,) * nsp, (1,) * nsp)
    batch = out[0] if known else 1
    return Geometry("conv", layer.d_in, layer.d_out, layer.kernel, in_sp, out_sp,
                    max(batch * math.prod(out_sp), 1), batch), known
