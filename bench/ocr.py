"""OCR scoring for the PP-OCR det/rec/cls models on text rendered with Pillow (seeded, no data download).

Preprocessing follows rapidocr-onnxruntime 1.4.4 (BGR channel order, as cv2 reads images):
- rec: height 48, width by aspect ratio, padded to at least 320, (x/255-0.5)/0.5; one line per feed, so
  feed widths vary. CTC decoding uses the model's ``metadata_props['character']`` list with blank at 0
  and a space appended (the model's 6625 classes = blank + 6623 dict chars + space).
- cls: 3x48x192, the line squeezed when wider than 4:1, label 0 = upright, 1 = rotated 180.
- det: min side scaled to 736, both sides rounded to multiples of 32, (x/255-0.5)/0.5; boxes from the
  probability map as rapidocr does it, restricted to axis-aligned boxes (threshold 0.3, 2x2 dilation,
  mean score >= 0.5, unclip by area*1.6/perimeter).
Fonts: DejaVu Sans/Serif/Sans Mono, regular and bold, from Debian's ``fonts-dejavu-core``.
Run ``python bench/ocr.py [--out DIR]`` to score the float models and write the .npz feed folders.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

if TYPE_CHECKING:
    from PIL import Image
from graphopt.errors import DataError, GraphoptError
from graphopt.runtime import make_session

Feed = dict[str, np.ndarray]
ModelArg = ort.InferenceSession | ir.Model | onnx.ModelProto | str | os.PathLike
Box = tuple[float, float, float, float]  # x0, y0, x1, y1 (x1, y1 exclusive)

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
              "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf")
FONT_PACKAGE = "fonts-dejavu-core"
INPUT_NAME = "x"  # all three PP-OCR models
REC_HEIGHT, REC_MIN_WIDTH = 48, 320
CLS_SHAPE = (3, 48, 192)
DET_LIMIT_SIDE = 736
DET_THRESH, DET_BOX_THRESH, DET_UNCLIP = 0.3, 0.5, 1.6

WORDS = """the of and to in is for on with as by at from this that are was be or an not have will can
all new more one about time data page home search free information may price year order report total
date number name service account model value result test system file line text image box left right
north south city street road market office account invoice payment receipt amount balance paper
company group table chapter section figure water light power green black white paper stock energy
first second third last next open close start stop hotel coffee train ticket station airport gate
summer winter monday friday january march april june october december united states london paris
berlin tokyo public school student health design project support manager engineer network server
""".split()


# ---------------------------------------------------------------- text and rendering

def _token(rng: np.random.Generator) -> str:
    kind = rng.choice(["word", "Word", "WORD", "int", "dec", "price", "pct", "date", "time", "code"],
                      p=[0.42, 0.16, 0.05, 0.09, 0.05, 0.05, 0.04, 0.05, 0.04, 0.05])
    if kind in ("word", "Word", "WORD"):
        word = str(rng.choice(WORDS))
        word = word.capitalize() if kind == "Word" else word.upper() if kind == "WORD" else word
        if rng.random() < 0.15:
            word += str(rng.choice(list(",.:;!?")))
        elif rng.random() < 0.04:
            word = f"({word})"
        return word
    if kind == "int":
        return str(int(rng.integers(0, 10 ** int(rng.integers(1, 6)))))
    if kind == "dec":
        return f"{rng.uniform(0, 1000):.{int(rng.integers(1, 3))}f}"
    if kind == "price":
        return f"{rng.choice(['$', ''])}{rng.uniform(1, 5000):.2f}"
    if kind == "pct":
        return f"{rng.uniform(0, 100):.1f}%"
    if kind == "date":
        y, m, d = int(rng.integers(1990, 2031)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
        return f"{y}-{m:02d}-{d:02d}" if rng.random() < 0.5 else f"{d:02d}/{m:02d}/{y}"
    if kind == "time":
        return f"{int(rng.integers(0, 24)):02d}:{int(rng.integers(0, 60)):02d}"
    letters = "".join(rng.choice(list("ABCDEFGHJKLMNPRSTUVWXYZ"), int(rng.integers(1, 4))))
    return f"{letters}-{int(rng.integers(10, 99999))}"


def random_line(rng: np.random.Generator, max_chars: int = 36) -> str:
    """A realistic line of words, numbers, prices, dates and codes (single spaces, no edge spaces)."""
    tokens: list[str] = []
    for _ in range(int(rng.integers(1, 7))):
        tok = _token(rng)
        if tokens and len(" ".join(tokens + [tok])) > max_chars:
            break
        tokens.append(tok)
    return " ".join(tokens)[:max_chars].strip()


def _pil() -> tuple[Any, Any, Any]:
    """Pillow, imported on first use: scoring and decoding work without it (CI installs only [test])."""
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        raise GraphoptError("OCR data is rendered with Pillow: pip install pillow (graphopt[bench])") from None
    return Image, ImageDraw, ImageFont


def _resize(rgb: np.ndarray, width: int, height: int) -> "Image.Image":
    Image = _pil()[0]
    return Image.fromarray(rgb).resize((width, height), Image.BILINEAR)  # cv2.resize's INTER_LINEAR


def _fonts() -> list[Path]:
    paths = [FONT_DIR / name for name in FONT_FILES if (FONT_DIR / name).is_file()]
    if not paths:
        raise GraphoptError(f"no DejaVu fonts in {FONT_DIR}; install them: apt-get install -y {FONT_PACKAGE}")
    return paths


def _colors(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    bg = int(rng.integers(185, 256))
    fg = int(rng.integers(0, 80))
    jitter = lambda v: tuple(int(np.clip(v + rng.integers(-12, 13), 0, 255)) for _ in range(3))  # noqa: E731
    return jitter(fg), jitter(bg)


def _noise(img: "Image.Image", rng: np.random.Generator) -> np.ndarray:
    arr = np.asarray(img, dtype=np.float32)
    sigma = rng.uniform(0, 6)
    return np.clip(arr + rng.normal(0, sigma, arr.shape), 0, 255).astype(np.uint8)


def render_line(text: str, rng: np.random.Generator) -> np.ndarray:
    """An HxWx3 RGB uint8 crop of one text line, as a detector would cut it (font ascent to descent)."""
    Image, ImageDraw, ImageFont = _pil()
    font = ImageFont.truetype(str(_fonts()[int(rng.integers(len(_fonts())))]), int(rng.integers(22, 41)))
    ascent, descent = font.getmetrics()
    x0, _, x1, _ = font.getbbox(text)
    pad_x, pad_y = int(rng.integers(3, 13)), int(rng.integers(2, 8))
    fg, bg = _colors(rng)
    img = Image.new("RGB", (x1 - x0 + 2 * pad_x, ascent + descent + 2 * pad_y), bg)
    ImageDraw.Draw(img).text((pad_x - x0, pad_y), text, font=font, fill=fg)
    return _noise(img, rng)


# ---------------------------------------------------------------- preprocessing (rapidocr)

def _normalize_bgr(img: "Image.Image") -> np.ndarray:
    arr = np.asarray(img, dtype=np.float32)[:, :, ::-1]  # RGB -> BGR as cv2 gives rapidocr
    return ((arr / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def rec_preprocess(rgb: np.ndarray) -> np.ndarray:
    """1x3x48xW float32: resized to height 48 by aspect ratio, padded with zeros to at least 320 wide."""
    h, w = rgb.shape[:2]
    ratio = w / float(h)
    width = int(REC_HEIGHT * max(REC_MIN_WIDTH / REC_HEIGHT, ratio))
    resized_w = min(width, int(math.ceil(REC_HEIGHT * ratio)))
    img = _resize(rgb, resized_w, REC_HEIGHT)
    out = np.zeros((3, REC_HEIGHT, width), dtype=np.float32)
    out[:, :, :resized_w] = _normalize_bgr(img)
    return out[None]


def cls_preprocess(rgb: np.ndarray) -> np.ndarray:
    """1x3x48x192 float32, the line squeezed into 192 columns when wider than 4:1."""
    c, height, width = CLS_SHAPE
    h, w = rgb.shape[:2]
    resized_w = min(width, int(math.ceil(height * w / float(h))))
    img = _resize(rgb, resized_w, height)
    out = np.zeros((c, height, width), dtype=np.float32)
    out[:, :, :resized_w] = _normalize_bgr(img)
    return out[None]


def det_resize_shape(h: int, w: int, limit_side: int = DET_LIMIT_SIDE) -> tuple[int, int]:
    """rapidocr's limit_type='min': scale up so the short side is ``limit_side``, round to 32."""
    ratio = limit_side / min(h, w) if min(h, w) < limit_side else 1.0
    rh = max(32, int(round(int(h * ratio) / 32) * 32))
    rw = max(32, int(round(int(w * ratio) / 32) * 32))
    return rh, rw


def det_preprocess(rgb: np.ndarray, limit_side: int = DET_LIMIT_SIDE) -> np.ndarray:
    h, w = rgb.shape[:2]
    rh, rw = det_resize_shape(h, w, limit_side)
    img = _resize(rgb, rw, rh)
    return _normalize_bgr(img)[None].astype(np.float32)


# ---------------------------------------------------------------- datasets

def make_rec_data(n: int, seed: int) -> tuple[list[Feed], list[str]]:
    """``n`` rendered lines: feeds ``{'x': 1x3x48xW}`` (W varies) and their texts."""
    rng = np.random.default_rng([seed, 101])
    feeds, texts = [], []
    for _ in range(n):
        text = random_line(rng)
        feeds.append({INPUT_NAME: rec_preprocess(render_line(text, rng))})
        texts.append(text)
    return feeds, texts


def make_cls_data(n: int, seed: int) -> tuple[list[Feed], list[int]]:
    """``n`` lines, about half rotated by 180 degrees: feeds ``{'x': 1x3x48x192}`` and labels 0/1."""
    rng = np.random.default_rng([seed, 202])
    feeds, labels = [], []
    for _ in range(n):
        img = render_line(random_line(rng), rng)
        label = int(rng.random() < 0.5)
        if label:
            img = np.ascontiguousarray(img[::-1, ::-1])
        feeds.append({INPUT_NAME: cls_preprocess(img)})
        labels.append(label)
    return feeds, labels


def render_page(rng: np.random.Generator, size: tuple[int, int] = (480, 640)) -> tuple[np.ndarray, list[Box]]:
    """An HxWx3 page with 3-8 text lines in separate rows, and the box of each line."""
    h, w = size
    Image, ImageDraw, ImageFont = _pil()
    fg, bg = _colors(rng)
    page = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(page)
    boxes: list[Box] = []
    y = int(rng.integers(8, 40))
    for _ in range(int(rng.integers(3, 9))):
        font = ImageFont.truetype(str(_fonts()[int(rng.integers(len(_fonts())))]), int(rng.integers(16, 37)))
        text = random_line(rng, max_chars=28)
        x0, _, x1, _ = draw.textbbox((0, 0), text, font=font)
        ascent, descent = font.getmetrics()
        y1 = ascent + descent
        if y + y1 + 8 > h or x1 - x0 + 16 > w:
            break
        x = int(rng.integers(8, w - (x1 - x0) - 8 + 1)) - x0
        draw.text((x, y), text, font=font, fill=fg)
        # The ink's horizontal extent and the font's line height: how text lines are annotated.
        boxes.append((float(x + x0), float(y), float(x + x1), float(y + y1)))
        y += y1 + int(rng.integers(int(0.4 * y1) + 6, 2 * y1 + 12))
    return _noise(page, rng), boxes


def make_det_data(n: int, seed: int, size: tuple[int, int] = (480, 640),
                  limit_side: int = DET_LIMIT_SIDE) -> tuple[list[Feed], list[list[Box]]]:
    """``n`` pages: feeds ``{'x': 1x3xHxW}`` and the drawn text boxes in feed (resized) coordinates."""
    rng = np.random.default_rng([seed, 303])
    feeds, all_boxes = [], []
    for _ in range(n):
        page, boxes = render_page(rng, size)
        feed = det_preprocess(page, limit_side)
        sy, sx = feed.shape[2] / page.shape[0], feed.shape[3] / page.shape[1]
        feeds.append({INPUT_NAME: feed})
        all_boxes.append([(x0 * sx, y0 * sy, x1 * sx, y1 * sy) for x0, y0, x1, y1 in boxes])
    return feeds, all_boxes


def write_feed_folder(feeds: Sequence[Mapping[str, np.ndarray]], folder: str | os.PathLike) -> Path:
    """One complete feed per ``NNNNN.npz`` (keys = input names): graphopt's folder-data format.
    Compressed: images made from 8-bit pixels shrink ~14x (a det page: 8.4 MB -> 0.6 MB)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for i, feed in enumerate(feeds):
        np.savez_compressed(out / f"{i:05d}.npz", **{k: np.asarray(v) for k, v in feed.items()})
    return out


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
