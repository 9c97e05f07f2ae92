"""OCR scoring for the PP-OCR det/rec/cls models on text rendered with Pillow (bench/ocr_render.py: lines,
pages, rapidocr preprocessing, feed folders; every name of it is re-exported here, so ``ocr.make_rec_data``
keeps working).

- rec: CTC decoding uses the model's ``metadata_props['character']`` list with blank at 0 and a space appended
  (the model's 6625 classes = blank + 6623 dict chars + space); line accuracy and character error rate.
- cls: accuracy of the 0/180 orientation classifier.
- det: boxes from the probability map as rapidocr does it, restricted to axis-aligned boxes (threshold 0.3,
  2x2 dilation, mean score >= 0.5, unclip by area*1.6/perimeter); box F1 at IoU >= 0.5.
Run ``python bench/ocr.py [--out DIR]`` to score the float models and write the .npz feed folders.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import deque
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from graphopt.errors import DataError
from graphopt.runtime import make_session

if __package__:  # imported as bench.ocr: the sibling answers to its plain name too (one import below)
    from . import ocr_render

    sys.modules.setdefault("ocr_render", ocr_render)
# Re-exported (__all__): the bench scripts and tests use ocr.make_rec_data, ocr.INPUT_NAME, ...
from ocr_render import (  # noqa: E402
    Box, CLS_SHAPE, DET_LIMIT_SIDE, FONT_DIR, FONT_FILES, FONT_PACKAGE, Feed, INPUT_NAME, REC_HEIGHT,
    REC_MIN_WIDTH, WORDS, cls_preprocess, det_preprocess, det_resize_shape, make_cls_data, make_det_data,
    make_rec_data, random_line, render_line, render_page, rec_preprocess, write_feed_folder)

__all__ = [
    "Box", "CLS_SHAPE", "DET_LIMIT_SIDE", "FONT_DIR", "FONT_FILES", "FONT_PACKAGE", "Feed", "INPUT_NAME",
    "REC_HEIGHT", "REC_MIN_WIDTH", "WORDS", "cls_preprocess", "det_preprocess", "det_resize_shape", "make_cls_data",
    "make_det_data", "make_rec_data", "random_line", "render_line", "render_page", "rec_preprocess",
    "write_feed_folder",
    "CALIB_SEED", "TEST_SEED", "SIZES", "ModelArg", "DET_THRESH", "DET_BOX_THRESH", "DET_UNCLIP", "charset_of",
    "ctc_decode", "edit_distance", "cer", "recognize", "score_rec", "score_cls", "label_components",
    "boxes_from_map", "iou", "match_boxes", "score_det", "main",
]

ModelArg = ort.InferenceSession | ir.Model | onnx.ModelProto | str | os.PathLike
DET_THRESH, DET_BOX_THRESH, DET_UNCLIP = 0.3, 0.5, 1.6


# ---------------------------------------------------------------- scoring helpers

def _session(model: ModelArg) -> ort.InferenceSession:
    return model if isinstance(model, ort.InferenceSession) else make_session(model)


def charset_of(model: ModelArg) -> list[str]:
    """rapidocr's CTC label list: 'blank', the model's dictionary characters, then ' '."""
    if isinstance(model, ort.InferenceSession):
        meta = model.get_modelmeta().custom_metadata_map
    elif isinstance(model, ir.Model):
        meta = dict(model.metadata_props)
    else:
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
        meta = {p.key: p.value for p in proto.metadata_props}
    if "character" not in meta:
        raise DataError("rec model has no metadata_props['character']; pass charset= explicitly")
    return ["blank", *meta["character"].splitlines(), " "]


def ctc_decode(logits: np.ndarray, charset: Sequence[str]) -> str:
    """Greedy CTC for one TxC matrix: argmax, merge repeats, drop blank (index 0)."""
    if logits.ndim != 2 or logits.shape[1] != len(charset):
        raise DataError(f"rec output of shape {logits.shape} does not match a charset of {len(charset)} labels")
    idx = logits.argmax(axis=1)
    keep = np.ones(len(idx), dtype=bool)
    keep[1:] = idx[1:] != idx[:-1]
    keep &= idx != 0
    return "".join(charset[i] for i in idx[keep])


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit-cost insert, delete, substitute)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def cer(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Character error rate over a set: total edit distance / total reference length."""
    total = sum(len(r) for r in references)
    return sum(edit_distance(p, r) for p, r in zip(predictions, references)) / max(total, 1)


def recognize(model: ModelArg, feeds: Sequence[Feed], charset: Sequence[str] | None = None) -> list[str]:
    sess = _session(model)
    chars = list(charset) if charset is not None else charset_of(sess)
    return [ctc_decode(sess.run(None, dict(f))[0][0], chars) for f in feeds]


def score_rec(model: ModelArg, feeds: Sequence[Feed], texts: Sequence[str],
              charset: Sequence[str] | None = None) -> dict[str, float]:
    """Exact-line accuracy and character error rate of the rec model. Predictions are stripped: the crops'
    margins decode to leading/trailing spaces, which are not text."""
    preds = [p.strip() for p in recognize(model, feeds, charset)]
    return {"line_acc": float(np.mean([p == t for p, t in zip(preds, texts)])),
            "cer": cer(preds, texts), "n": len(texts)}


def score_cls(model: ModelArg, feeds: Sequence[Feed], labels: Sequence[int]) -> dict[str, float]:
    """Accuracy of the 0/180 orientation classifier."""
    sess = _session(model)
    preds = [int(sess.run(None, dict(f))[0][0].argmax()) for f in feeds]
    return {"acc": float(np.mean([p == t for p, t in zip(preds, labels)])), "n": len(labels)}


# ---------------------------------------------------------------- detection boxes

def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean mask (labels 1..n), breadth-first; no scipy needed."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    h, w = mask.shape
    count = 0
    for y, x in zip(*np.nonzero(mask)):
        if labels[y, x]:
            continue
        count += 1
        labels[y, x] = count
        queue = deque([(y, x)])
        while queue:
            cy, cx = queue.popleft()
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = count
                    queue.append((ny, nx))
    return labels, count


def boxes_from_map(prob: np.ndarray) -> list[Box]:
    """Axis-aligned text boxes from an HxW probability map, following rapidocr's DB postprocess."""
    mask = prob > DET_THRESH
    dilated = mask.copy()  # cv2.dilate with a 2x2 kernel of ones
    dilated[1:, :] |= mask[:-1, :]
    dilated[:, 1:] |= mask[:, :-1]
    dilated[1:, 1:] |= mask[:-1, :-1]
    labels, count = label_components(dilated)
    if count == 0:
        return []
    h, w = prob.shape
    boxes: list[Box] = []
    ys, xs = np.nonzero(labels)
    ids = labels[ys, xs]
    order = np.argsort(ids, kind="stable")
    splits = np.cumsum(np.bincount(ids, minlength=count + 1))[:-1]
    for comp_y, comp_x in zip(np.split(ys[order], splits[1:]), np.split(xs[order], splits[1:])):
        if comp_y.size == 0:
            continue
        y0, y1, x0, x1 = comp_y.min(), comp_y.max() + 1, comp_x.min(), comp_x.max() + 1
        bw, bh = x1 - x0, y1 - y0
        if min(bw, bh) < 3 or prob[y0:y1, x0:x1].mean() < DET_BOX_THRESH:
            continue
        d = bw * bh * DET_UNCLIP / (2.0 * (bw + bh))  # pyclipper offset distance of rapidocr's unclip
        boxes.append((max(0.0, x0 - d), max(0.0, y0 - d), min(float(w), x1 + d), min(float(h), y1 + d)))
    return boxes


def iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_boxes(pred: Sequence[Box], truth: Sequence[Box], min_iou: float = 0.5) -> int:
    """True positives of a one-to-one greedy matching by descending IoU."""
    pairs = sorted(((iou(p, t), i, j) for i, p in enumerate(pred) for j, t in enumerate(truth)), reverse=True)
    used_p, used_t, tp = set(), set(), 0
    for score, i, j in pairs:
        if score < min_iou:
            break
        if i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
            tp += 1
    return tp


def _f1(tp: int, n_pred: int, n_true: int) -> dict[str, float]:
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def score_det(model: ModelArg, ref_model: ModelArg | None, feeds: Sequence[Feed],
              boxes: Sequence[Sequence[Box]]) -> dict[str, float]:
    """Box F1 against the drawn boxes (IoU >= 0.5) and the mean best IoU per drawn box; with ``ref_model``, agreement of the probability maps
    (mean/max absolute difference, fraction of pixels on the same side of the 0.3 threshold)."""
    sess = _session(model)
    ref = _session(ref_model) if ref_model is not None else None
    tp = n_pred = n_true = 0
    mae, worst, agree, best_iou = [], 0.0, [], []
    for feed, truth in zip(feeds, boxes):
        prob = sess.run(None, dict(feed))[0][0, 0]
        pred = boxes_from_map(prob)
        tp += match_boxes(pred, truth)
        best_iou += [max([iou(t, p) for p in pred], default=0.0) for t in truth]
        n_pred, n_true = n_pred + len(pred), n_true + len(truth)
        if ref is not None:
            ref_prob = ref.run(None, dict(feed))[0][0, 0]
            diff = np.abs(prob - ref_prob)
            mae.append(float(diff.mean()))
            worst = max(worst, float(diff.max()))
            agree.append(float(np.mean((prob > DET_THRESH) == (ref_prob > DET_THRESH))))
    result = {**_f1(tp, n_pred, n_true), "mean_iou": float(np.mean(best_iou)) if best_iou else 0.0,
              "n": len(feeds), "boxes": n_true}
    if ref is not None:
        result.update(map_mae=float(np.mean(mae)), map_max_abs=worst, map_agree=float(np.mean(agree)))
    return result


# ---------------------------------------------------------------- CLI

CALIB_SEED, TEST_SEED = 1, 2
SIZES = {"rec": (100, 300), "cls": (100, 300), "det": (20, 60)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Score the float PP-OCR models; write .npz feed folders.")
    parser.add_argument("--out", type=Path, help="write <out>/{rec,cls,det}_{calib,test}/NNNNN.npz")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from models.fetch import fetch_ocr_models

    paths = fetch_ocr_models()
    makers = {"rec": make_rec_data, "cls": make_cls_data, "det": make_det_data}
    for task, (n_calib, n_test) in SIZES.items():
        calib, _ = makers[task](n_calib, CALIB_SEED)
        test, truth = makers[task](n_test, TEST_SEED)
        if args.out:
            write_feed_folder(calib, args.out / f"{task}_calib")
            write_feed_folder(test, args.out / f"{task}_test")
        if task == "rec":
            scores = score_rec(paths["rec"], test, truth)
        elif task == "cls":
            scores = score_cls(paths["cls"], test, truth)
        else:
            scores = score_det(paths["det"], None, test, truth)
        print(task, " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in scores.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
