"""Train the bundled `digits` CNN and export it to ONNX, plus its calib/test data.

Run with the separate torch venv (torch is never a graphopt run-time dependency):

    python3 -m venv /work/venv-torch
    /work/venv-torch/bin/pip install torch==2.13.0 numpy scikit-learn onnx onnxscript
    /work/venv-torch/bin/python models/digits/train.py

Writes, next to this file: digits.onnx, calib.npz, test.npz.
Check the result with onnxruntime: /work/venv/bin/python models/digits/check.py
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 0
N_TEST = 360
N_CALIB = 200
EPOCHS = 30
BATCH = 64
OPSET = 17
# Normalization: raw pixels are 0..16; x/16 -> [0, 1], then (x - 0.5) / 0.5 -> [-1, 1].
# Applied after bilinear upsampling 8x8 -> 32x32; the npz files hold already-normalized data.
NORM_MEAN = 0.5
NORM_STD = 0.5


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)


def preprocess(images: np.ndarray) -> np.ndarray:
    """[N, 8, 8] pixels 0..16 -> normalized float32 [N, 1, 32, 32]."""
    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x - NORM_MEAN) / NORM_STD
    return x.numpy().astype(np.float32)


def conv_bn_relu(cin: int, cout: int, bias: bool = False) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=bias), nn.BatchNorm2d(cout), nn.ReLU()
    )


class ResBlock(nn.Module):
    """relu(x + bn(conv(relu(bn(conv(x)))))): the residual Add graph passes must respect."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(x + y)


class DigitsNet(nn.Module):
    """1x32x32 -> 16x32x32 -> pool 16x16x16 -> 32x16x16 -> res -> pool 32x8x8 -> 32x8x8 -> pool 32x4x4
    -> Flatten 512 -> Gemm 64 -> Relu -> Gemm 10. The head is deliberately not GAP'd."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(1, 16, bias=True),  # one Conv with a bias: BN folding must merge both
            nn.MaxPool2d(2),
            conv_bn_relu(16, 32),
            ResBlock(32),
            nn.MaxPool2d(2),
            conv_bn_relu(32, 32),
            nn.MaxPool2d(2),
        )
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)
        return self.fc2(F.relu(self.fc1(x)))


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Augmentation: translate each image by up to max_shift pixels (pad with background)."""
    n = x.shape[0]
    pad = F.pad(x, (max_shift,) * 4, value=-NORM_MEAN / NORM_STD)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        out[i] = pad[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
    return out


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean())


def export(model: nn.Module, path: Path, test_acc: float) -> None:
    """Legacy TorchScript exporter, eval mode, no constant folding: BatchNormalization stays."""
    model.eval()
    dummy = torch.zeros(2, 1, 32, 32)
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        opset_version=OPSET,
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.EVAL,
        dynamo=False,
    )
    proto = onnx.load(str(path))
    proto.producer_name = "graphopt models/digits/train.py"
    proto.doc_string = (
        "Small CNN on sklearn digits upsampled to 32x32; input normalized as (x/16 - 0.5)/0.5."
    )
    for key, value in {
        "torch_test_accuracy": f"{test_acc:.6f}",
        "normalization": f"x/16, bilinear 8x8->32x32, (x-{NORM_MEAN})/{NORM_STD}",
    }.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))  # small model: one self-contained file, no external data


def main() -> None:
    seed_everything(SEED)
    digits = load_digits()
    x_all = preprocess(digits.images)
    y_all = digits.target.astype(np.int64)

    # test is disjoint from everything else; calib is drawn from the training pool.
    x_train, x_test, y_train, y_test = train_test_split(
        x_all, y_all, test_size=N_TEST, stratify=y_all, random_state=SEED
    )
    calib_idx = np.random.default_rng(SEED).choice(len(x_train), N_CALIB, replace=False)
    np.savez_compressed(HERE / "test.npz", input=x_test, labels=y_test)
    np.savez_compressed(
        HERE / "calib.npz", input=x_train[calib_idx], labels=y_train[calib_idx]
    )

    model = DigitsNet()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"train {len(x_train)}  calib {N_CALIB}  test {len(x_test)}  params {n_params}")

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = EPOCHS * ((len(x_train) + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(SEED)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), BATCH):
            idx = perm[i : i + BATCH]
            xb = random_shift(xt[idx], gen)
            loss = F.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if epoch % 5 == 4 or epoch == EPOCHS - 1:
            acc = accuracy(model, x_test, y_test)
            print(f"epoch {epoch + 1:2d}  loss {total / len(xt):.4f}  test acc {acc:.4f}")

    test_acc = accuracy(model, x_test, y_test)
    print(f"torch test accuracy {test_acc:.4f} ({round(test_acc * len(y_test))}/{len(y_test)})")
    export(model, HERE / "digits.onnx", test_acc)
    print(f"wrote {HERE / 'digits.onnx'}")


if __name__ == "__main__":
    main()
