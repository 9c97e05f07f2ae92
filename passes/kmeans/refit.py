"""kmeans ``refit``: each shared layer's centroids (and bias) solved so its outputs match the float layer's.

Codes fixed, a layer's weight is W = Σ_k c_k·M_k (M_k: where code k sits; per channel, one codebook per output
channel), so its output o on inputs X is linear in the centroids: y_o = Σ_k c_k·(X M_k)_o + b_o. With E_o the
one-hot of column o's codes (plus a bias column), the normal equations of output o are E_oᵀ·XᵀX·E_o and
E_oᵀ·XᵀY_o: built from the layer's captured moments (graphopt.capture.layer_moments: im2col rows for a Conv,
subsampled), so their cost is d_in² per output whatever the number of rows. The centroids are a ridge solve
(graphopt.refit.ridge) towards the k-means ones, so a code no row reads keeps its value; a reserved zero code stays
exactly 0 (pruned weights stay zero). The bias is refit with them where the layer has one; none is added (a size
pass: on digits after lowrank, biases added to the first factors cost 0.18 kB after lzma, and the second factor's
bias absorbs the mean shift anyway). Only Conv (one group), Gemm and MatMul weights are refit (graphopt.linear).

:func:`refit_sequential` takes the layers in dependency waves: each is fit on the inputs that the shared, already
refit layers before it give it, against the float layer's outputs (the pass's input): that corrects the error
accumulated upstream. A refit is kept only if it also lowers the layer's output error on held-out calibration
samples (per-channel codebooks have 2^bits unknowns per channel). :class:`Independent` fits each layer on the
float model's own inputs: what ``bits=auto`` measures one layer at one width with (only that layer changed).

Cost: a wave runs the shared and the float model, each cut to what the wave needs, on ``refit_samples`` samples;
the solves are small. PP-OCRv4 rec at 4 bits, 64 samples, 33 layers in 33 waves: 103 s on one thread (the
solves 2.5 s of it; at 32 samples 58 s, and 95 s with the models uncut), output relative error on other lines
0.68 -> 0.38. Digits: about 1 s.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from graphopt.capture import Moments, layer_moments, main_values
from graphopt.data import split
from graphopt.errors import DataError, GraphoptError
from graphopt.graphs import all_nodes
from graphopt.linear import LinearLayer, as_linear
from graphopt.passbase import PassContext
from graphopt.passes.kmeans.codebook import Codebook
from graphopt.refit import dependency_waves, ridge
from graphopt.weight_targets import Target
from graphopt.weights import replace_initializer

LAM = 1e-2  # ridge λ, relative to the mean diagonal (graphopt.refit.ridge), towards the k-means centroids
HOLDOUT = 0.25  # share of the calibration samples that only judges the refits
MAX_ROWS = 50_000  # im2col rows per layer in the moments (their cost is d_in², not rows)
MAX_FLOPS = 2e10  # E_oᵀ·XᵀX·E_o over all outputs: d_in² · d_out · 2^bits; a larger layer is not refit
_CHUNK = 1 << 22  # one-hot elements built at once

# a refit codebook as it will be stored (float16 rounding), or None when it cannot be (overflows float16)
Finish = Callable[[Target, int, np.ndarray], "np.ndarray | None"]
Item = tuple[Target, int, Codebook]  # a layer, its width, its k-means codebook


@dataclasses.dataclass
class Solution:
    """A layer's refit: centroids in the layer's matrix units (a Gemm's alpha folded in) and bias, or why not."""

    codebook: np.ndarray | None  # None: not refit (``reason`` says why)
    bias: np.ndarray | None  # [d_out]; None: the layer keeps the bias it has (a MatMul without one)
    before: float = 0.0  # relative output error on the fit rows, k-means centroids / refit ones
    after: float = 0.0
    held_before: float | None = None  # the same on held-out rows
    held_after: float | None = None
    reason: str = ""

    @property
    def kept(self) -> bool:
        return self.codebook is not None

    def row(self) -> dict:
        """The pass report's fields."""
        out = {"refit": self.kept, "out_error_kmeans": round(self.before, 5)}
        if self.kept:
            out["out_error_refit"] = round(self.after, 5)
        if self.held_before is not None:
            out["held_error_kmeans"] = round(self.held_before, 5)
            out["held_error_refit"] = round(self.held_after, 5)
        if self.reason:
            out["refit_note"] = self.reason
        return out


def linear_of(t: Target, model: ir.Model, node: ir.Node | None = None) -> LinearLayer | None:
    """The target (or ``node``, its copy in ``model``) as a refittable layer of the main graph: its weight the
    layer's matrix, else None."""
    node = t.node if node is None else node
    if node.graph is not model.graph or t.index != 1:
        return None
    layer = as_linear(node)
    return layer if layer is not None and layer.weight is node.inputs[t.index] else None


def _normal(m: Moments, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output o: A_o = Ê_oᵀ·XᵀX·Ê_o [O, k+1, k+1] and r_o = Ê_oᵀ·XᵀY_o [O, k+1], Ê_o = [one-hot, bias]."""
    d, outs = codes.shape
    a, r = np.empty((outs, k + 1, k + 1)), np.empty((outs, k + 1))
    g, ones = m.xtx[:d, :d], m.xtx[:d, d]
    step = max(1, _CHUNK // (d * k))
    for s in range(0, outs, step):
        c = min(step, outs - s)
        e = np.zeros((d, c, k))
        e[np.arange(d)[:, None], np.arange(c)[None, :], codes[:, s:s + c]] = 1.0
        ge = (g @ e.reshape(d, c * k)).reshape(d, c, k)
        a[s:s + c, :k, :k] = np.matmul(e.transpose(1, 2, 0), ge.transpose(1, 0, 2))
        a[s:s + c, :k, k] = a[s:s + c, k, :k] = np.einsum("ick,i->ck", e, ones)
        a[s:s + c, k, k] = m.xtx[d, d]
        r[s:s + c, :k] = np.einsum("ick,ic->ck", e, m.xty[:d, s:s + c])
        r[s:s + c, k] = m.xty[d, s:s + c]
    return a, r


def _error(a: np.ndarray, r: np.ndarray, yy: np.ndarray, theta: np.ndarray) -> float:
    """Σ_o ||D_o θ_o - y_o||² / Σ_o ||y_o||² from the normal equations (θ_o = [centroids, bias])."""
    err = np.einsum("ok,okl,ol->", theta, a, theta) - 2.0 * np.einsum("ok,ok->", theta, r) + yy.sum()
    total = float(yy.sum())
    return max(float(err), 0.0) / total if total > 0 else 0.0


class LayerFit:
    """One layer with its codes: normal equations from moments, the ridge solve, errors."""

    def __init__(self, layer: LinearLayer, cb: Codebook) -> None:
        self.layer, self.cb = layer, cb
        self.k = cb.codebook.shape[-1]
        self.codes = np.asarray(layer.view(cb.indices), np.intp)  # [d_in, d_out]
        d_out = self.codes.shape[1]
        book = np.asarray(cb.codebook, np.float64) * layer.alpha
        self.c0 = book if cb.per_channel else np.broadcast_to(book, (d_out, self.k))
        self.b0 = layer.bias_vector()
        self.fit_bias = layer.bias is not None  # none is added (module doc)
        used = np.zeros((d_out, self.k), bool)
        used[np.arange(d_out)[None, :], self.codes] = True
        if cb.zero_code:
            used[:, 0] = False  # exactly zero, always
        self.free = used if cb.per_channel else used.any(axis=0, keepdims=True)

    def flops(self) -> float:
        return float(self.codes.shape[0]) ** 2 * self.codes.shape[1] * self.k

    def theta(self, c: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.concatenate([np.broadcast_to(c, (b.size, self.k)), b[:, None]], axis=1)

    def solve(self, m: Moments, held: Moments | None) -> Solution:
        a, r = _normal(m, self.codes, self.k)
        theta0 = self.theta(self.c0, self.b0)
        resid = r - np.einsum("okl,ol->ok", a, theta0)  # in steps from the k-means centroids
        c, b = (self._per_channel if self.cb.per_channel else self._per_layer)(a, resid)
        sol = Solution(c if self.cb.per_channel else c[0], b if self.fit_bias else None,
                       _error(a, r, m.yty, theta0), _error(a, r, m.yty, self.theta(c, b)))
        if not (np.all(np.isfinite(c)) and np.all(np.isfinite(b)) and sol.after < sol.before * (1 - 1e-9)):
            return dataclasses.replace(sol, codebook=None, bias=None, reason="the refit did not lower the error")
        if held is not None and held.rows:
            ha, hr = _normal(held, self.codes, self.k)
            sol.held_before = _error(ha, hr, held.yty, theta0)
            sol.held_after = _error(ha, hr, held.yty, self.theta(c, b))
            if not sol.held_after < sol.held_before:
                return dataclasses.replace(sol, codebook=None, bias=None,
                                           reason="the refit did not lower the error on held-out samples")
        return sol

    def _per_channel(self, a: np.ndarray, resid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, b = self.c0.copy(), self.b0.copy()
        for o in range(a.shape[0]):
            step_c, step_b = ridge(a[o], resid[o][:, None], LAM, keep=np.flatnonzero(self.free[o]),
                                   fit_bias=self.fit_bias)
            c[o] += step_c[:, 0]
            b[o] += step_b[0]
        return c, b

    def _per_layer(self, a: np.ndarray, resid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One codebook for all outputs: each output's bias step eliminated (Schur complement), then one solve."""
        k, n = self.k, a[0, self.k, self.k]
        gram, rhs = a[:, :k, :k].sum(0), resid[:, :k].sum(0)
        if self.fit_bias and n > 0:
            ones = a[:, :k, k]
            gram = gram - np.einsum("ok,ol->kl", ones, ones) / n
            rhs = rhs - np.einsum("ok,o->k", ones, resid[:, k]) / n
        padded = np.zeros((k + 1, k + 1))
        padded[:k, :k] = gram
        step, _ = ridge(padded, np.append(rhs, 0.0)[:, None], LAM, keep=np.flatnonzero(self.free[0]),
                        fit_bias=False)
        c = self.c0[:1] + step[:, 0]
        b = self.b0.copy()
        if self.fit_bias and n > 0:
            b += (resid[:, k] - a[:, k, :k] @ step[:, 0]) / n
        return c, b


def write(layer: LinearLayer, cb: Codebook, sol: Solution | None) -> None:
    """The layer's weight ← its codebook reconstruction (refit centroids and bias when ``sol`` holds them)."""
    if sol is None or not sol.kept:
        replace_initializer(layer.weight, cb.reconstruct().astype(cb.codebook.dtype))
        return
    shared = Codebook(sol.codebook, cb.indices, cb.out_axis, cb.zero_code)
    layer.set_matrix(layer.view(shared.reconstruct().astype(np.float64)), sol.bias)  # a Gemm's alpha becomes 1


def stored(sol: Solution, t: Target, bits: int, cb: Codebook, finish: Finish) -> Solution:
    """``sol`` with its centroids as they will be stored (dtype, float16 rounding)."""
    if not sol.kept:
        return sol
    book = finish(t, bits, np.asarray(sol.codebook).astype(cb.codebook.dtype))
    if book is None:
        return dataclasses.replace(sol, codebook=None, bias=None, reason="refit centroids overflow float16")
    return dataclasses.replace(sol, codebook=book)


def node_in(model: ir.Model, t: Target) -> ir.Node:
    """The node of ``model`` (a clone of the target's) that holds the target's weight: same name."""
    for node in all_nodes(model):
        value = node.inputs[t.index] if len(node.inputs) > t.index else None
        if value is not None and (node.name or value.name or "") == t.layer:
            return node
    raise GraphoptError(f"pass 'kmeans': layer {t.layer!r} not found in the copy")


def fit_data(context: PassContext, max_samples: int):
    """(fit, held-out) parts of the calibration samples; held-out None when there is one sample."""
    head = context.require_calib("kmeans").head(max_samples)
    try:
        return split(head, eval_fraction=HOLDOUT, seed=0)
    except DataError:
        return head, None


def _moments(context: PassContext, model: ir.Model, layers: list[LinearLayer], data, teacher: ir.Model | None):
    """The layers' moments: X from ``model``, Y from ``teacher`` (the same model when None), on ``data``."""
    if data is None or not layers:
        return {}
    targets = {lay.name: lay.output.name for lay in layers} if teacher is not None else None
    return layer_moments(model, layers, data, targets=targets, target_model=teacher, threads=context.threads,
                         max_samples=None, max_rows=MAX_ROWS)


def _prefix(model: ir.Model, names: list[str]) -> ir.Model | None:
    """A copy of ``model`` that computes only ``names`` and what they need: onnxruntime runs every node of a session
    whatever is fetched, and a wave only needs the model up to its layers. None when all are graph inputs."""
    copy = model.clone()
    values = main_values(copy.graph)
    wanted = [values[n] for n in dict.fromkeys(names)
              if not values[n].is_graph_input() and not values[n].is_initializer()]
    if not wanted:
        return None
    for value in wanted:
        if not value.is_graph_output():
            value.shape = None  # as graphopt.capture.exposed does: a stale annotation cannot refuse the copy
    copy.graph.outputs[:] = wanted
    RemoveUnusedNodesPass()(copy)
    return copy


def _refittable(items: list[tuple[Item, ir.Node]], model: ir.Model, notes: list[str]):
    out, skipped, large = [], [], []
    for (t, bits, cb), node in items:
        layer = linear_of(t, model, node)
        if layer is None:
            skipped.append(t.layer)
        elif LayerFit(layer, cb).flops() > MAX_FLOPS:
            large.append(t.layer)
        else:
            out.append((t, bits, cb, layer))
    if skipped:
        notes.append(f"refit: {len(skipped)} layer(s) are not a Conv (one group), Gemm or MatMul weight of the main "
                     f"graph; k-means centroids kept: {', '.join(skipped[:6])}")
    if large:
        notes.append(f"refit: {len(large)} layer(s) above {MAX_FLOPS:g} flops of normal equations (d_in² · d_out · "
                     f"2^bits); k-means centroids kept: {', '.join(large[:6])}")
    return out


def refit_sequential(context: PassContext, model: ir.Model, items: list[Item], finish: Finish, max_samples: int,
                     notes: list[str]) -> tuple[dict[str, Solution], ir.Model]:
    """Refit the items' linear layers wave by wave, each on the inputs the shared layers before it give it, against
    the float layer's output in ``model`` (left as it is). Returns layer → solution (centroids as stored) and the
    shared copy they were fit in (every item's weight its reconstruction, refit ones with their bias)."""
    work = model.clone()  # clones share tensors: weights are given new ones, never written in place
    nodes = [(item, node_in(work, item[0])) for item in items]
    for (t, _, cb), node in nodes:
        replace_initializer(node.inputs[t.index], cb.reconstruct().astype(cb.codebook.dtype))
    todo = _refittable(nodes, work, notes)
    fit, held = fit_data(context, max_samples)
    waves = dependency_waves(work, [lay.node for *_, lay in todo])
    out: dict[str, Solution] = {}
    for wave in sorted(set(waves.values())):
        chunk = [item for item in todo if waves[item[3].node] == wave]
        layers = [lay for *_, lay in chunk]
        target = _prefix(model, [lay.output.name for lay in layers])
        shared = _prefix(work, [lay.input.name for lay in layers])
        shared = target if shared is None else shared  # the wave reads graph inputs only: X is the feed
        fitted, checked = _moments(context, shared, layers, fit, target), _moments(context, shared, layers, held,
                                                                                   target)
        for t, bits, cb, lay in chunk:
            sol = stored(LayerFit(lay, cb).solve(fitted[lay.name], checked.get(lay.name)), t, bits, cb, finish)
            write(lay, cb, sol)
            out[t.layer] = sol
    summarize(out, notes, "layer by layer on the shared model's inputs")
    return out, work


class Independent:
    """Each layer refit on the float model's own inputs (one capture for all layers): what a layer changed alone
    sees, so ``bits=auto`` measures each width with its refit."""

    def __init__(self, context: PassContext, model: ir.Model, targets: list[Target], max_samples: int,
                 finish: Finish) -> None:
        self.layers = {t.layer: lay for t in targets if (lay := linear_of(t, model)) is not None}
        fit, held = fit_data(context, max_samples)
        layers = list(self.layers.values())
        self.fitted = _moments(context, model, layers, fit, None)
        self.held = _moments(context, model, layers, held, None)
        self.finish = finish
        self._solutions: dict[tuple[str, int], Solution | None] = {}

    def solution(self, t: Target, bits: int, cb: Codebook) -> Solution | None:
        key = (t.layer, bits)
        if key not in self._solutions:
            layer = self.layers.get(t.layer)
            fit = None if layer is None else LayerFit(layer, cb)
            self._solutions[key] = None if fit is None or fit.flops() > MAX_FLOPS else stored(
                fit.solve(self.fitted[layer.name], self.held.get(layer.name)), t, bits, cb, self.finish)
        return self._solutions[key]

    def editor(self, t: Target, bits: int, book: Callable[[], Codebook]) -> Callable[[ir.Model], None]:
        """An edit of a clone: the layer's weight (and bias) as this width's refit codebook gives them."""

        def apply(clone: ir.Model) -> None:
            node, cb = node_in(clone, t), book()
            layer = as_linear(node) if t.layer in self.layers else None
            if layer is None:  # not refittable: the plain reconstruction
                replace_initializer(node.inputs[t.index], cb.reconstruct().astype(cb.codebook.dtype))
                return
            write(layer, cb, self.solution(t, bits, cb))
        return apply


def summarize(out: dict[str, Solution], notes: list[str], how: str) -> None:
    if not out:
        return
    kept = [s for s in out.values() if s.kept]
    text = f"refit ({how}): {len(kept)} of {len(out)} layer(s) refit"
    if kept:
        text += (f"; mean relative output error {np.mean([s.before for s in kept]):.4f} -> "
                 f"{np.mean([s.after for s in kept]):.4f}")
        held = [s for s in kept if s.held_before is not None]
        if held:
            text += (f" (held-out {np.mean([s.held_before for s in held]):.4f} -> "
                     f"{np.mean([s.held_after for s in held]):.4f})")
    notes.append(text)
