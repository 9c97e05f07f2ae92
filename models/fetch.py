"""Fetch real ONNX models shipped inside PyPI wheels into a cache: PP-OCR's (``rapidocr-onnxruntime``) and
Google's Magika file-type classifier (``magika``, a tf2onnx export with int32 byte inputs).

The only network use is ``pip download --no-deps`` of one pinned wheel from PyPI; the models are unzipped from
it and checked against known SHA-256 digests, so benchmark numbers stay reproducible.
Cache: ``$GRAPHOPT_CACHE/models`` or ``~/.cache/graphopt/models``. Run ``python models/fetch.py`` to fetch
and print the paths.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from graphopt.errors import GraphoptError

# Pinned: a later wheel could ship other models and silently change every measured number.
WHEEL = "rapidocr-onnxruntime==1.4.4"
MEMBERS = {
    "det": "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
    "rec": "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
    "cls": "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
}
SHA256 = {
    "det": "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
    "rec": "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
    "cls": "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
}


# Magika's standard model and its config (the label of each output column); cached under these names
MAGIKA_WHEEL = "magika==1.0.3"
MAGIKA_MEMBERS = {
    "magika": "magika/models/standard_v3_3/model.onnx",
    "magika_config": "magika/models/standard_v3_3/config.min.json",
}
MAGIKA_NAMES = {"magika": "magika_standard_v3_3.onnx", "magika_config": "magika_standard_v3_3_config.json"}
MAGIKA_SHA256 = {
    "magika": "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c",
    "magika_config": "ae24c742205358f6ff6dfd5facb6743fb69743dbba8373e73da58ff0cbd695db",
}


class FetchError(GraphoptError):
    """The wheel could not be downloaded or did not hold the expected models."""


def cache_root() -> Path:
    """The graphopt cache folder: ``$GRAPHOPT_CACHE`` or ``~/.cache/graphopt``."""
    env = os.environ.get("GRAPHOPT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "graphopt"


def models_dir() -> Path:
    return cache_root() / "models"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cached(paths: dict[str, Path], digests: dict[str, str]) -> dict[str, Path] | None:
    if all(p.is_file() and _sha256(p) == digests[key] for key, p in paths.items()):
        return paths
    return None


def _download_wheel(tmp: Path, spec: str) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", spec, "-d", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise FetchError(f"pip download {spec} failed (exit {proc.returncode}): {last}")
    wheels = sorted(tmp.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip download {spec} produced no wheel in {tmp}")
    return wheels[0]


def _fetch(spec: str, members: dict[str, str], digests: dict[str, str], paths: dict[str, Path]) -> dict[str, Path]:
    """``members`` of the wheel ``spec`` at ``paths`` (by key), downloading the wheel unless all are cached."""
    found = _cached(paths, digests)
    if found is not None:
        return found
    next(iter(paths.values())).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="graphopt-fetch-") as tmp:
        wheel = _download_wheel(Path(tmp), spec)
        with zipfile.ZipFile(wheel) as archive:
            for key, member in members.items():
                dest = paths[key]
                part = dest.with_suffix(".part")
                try:
                    with archive.open(member) as src, open(part, "wb") as out:
                        while block := src.read(1 << 20):
                            out.write(block)
                except KeyError:
                    raise FetchError(f"{wheel.name} has no {member}") from None
                if _sha256(part) != digests[key]:
                    part.unlink()
                    raise FetchError(f"{member} in {wheel.name}: SHA-256 differs from the pinned digest")
                os.replace(part, dest)  # atomic: a killed fetch never leaves a half file under the final name
    found = _cached(paths, digests)
    assert found is not None
    return found


def fetch_ocr_models(folder: str | os.PathLike | None = None) -> dict[str, Path]:
    """Paths of the PP-OCRv4 det/rec and PP-OCR mobile cls models, downloading them once."""
    target = Path(folder) if folder is not None else models_dir()
    return _fetch(WHEEL, MEMBERS, SHA256, {key: target / Path(m).name for key, m in MEMBERS.items()})


def fetch_magika(folder: str | os.PathLike | None = None) -> dict[str, Path]:
    """Paths of Magika's standard model ("magika") and its config ("magika_config"), downloading them once."""
    target = Path(folder) if folder is not None else models_dir()
    return _fetch(MAGIKA_WHEEL, MAGIKA_MEMBERS, MAGIKA_SHA256,
                  {key: target / MAGIKA_NAMES[key] for key in MAGIKA_MEMBERS})


def main() -> int:
    try:
        paths = fetch_ocr_models() | fetch_magika()
    except FetchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for key, path in paths.items():
        print(f"{key}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
