"""Text lines and pages rendered with Pillow (seeded, no data download) and rapidocr's preprocessing for the
PP-OCR det/rec/cls models; the scoring side is bench/ocr.py, which re-exports everything here.

Preprocessing follows rapidocr-onnxruntime 1.4.4 (BGR channel order, as cv2 reads images):
- rec: height 48, width by aspect ratio, padded to at least 320, (x/255-0.5)/0.5; one line per feed, so
  feed widths vary.
- cls: 3x48x192, the line squeezed when wider than 4:1, label 0 = upright, 1 = rotated 180.
- det: min side scaled to 736, both sides rounded to multiples of 32, (x/255-0.5)/0.5.
Fonts: DejaVu Sans/Serif/Sans Mono, regular and bold, from Debian's ``fonts-dejavu-core``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    from PIL import Image
from graphopt.errors import GraphoptError

Feed = dict[str, np.ndarray]
Box = tuple[float, float, float, float]  # x0, y0, x1, y1 (x1, y1 exclusive)

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
              "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf")
FONT_PACKAGE = "fonts-dejavu-core"
INPUT_NAME = "x"  # all three PP-OCR models
REC_HEIGHT, REC_MIN_WIDTH = 48, 320
CLS_SHAPE = (3, 48, 192)
DET_LIMIT_SIDE = 736

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
