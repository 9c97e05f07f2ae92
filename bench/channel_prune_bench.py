"""channel_prune benchmark: groups and MACs on the light zoo, ResNet-50 latency, digits accuracy vs MACs.

    python bench/channel_prune_bench.py [--skip-zoo] [--skip-latency] [--skip-digits] [--models a,b]

Prints markdown tables; the digits curve goes to bench/results/channel_prune_digits.png (+ .md tables).
Sections that were not run keep their previous text in bench/results/channel_prune.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from graphopt import bench, costs, data as datamod, formatting, modelio  # noqa: E402
from graphopt.options import build_options  # noqa: E402
from graphopt.passbase import PassContext  # noqa: E402
from graphopt.passes.channels import ChannelPrune, analyze  # noqa: E402
from graphopt.runtime import make_session  # noqa: E402

ZOO = ("resnet50", "densenet121", "inception_v1", "inception_v2", "shufflenet", "squeezenet", "vgg19")
RESULTS = ROOT / "bench" / "results"


def prune(model, context=None, **raw):
    opts = build_options(ChannelPrune.Options, raw, "channel_prune")
    return ChannelPrune(opts, context)(model)


def zoo(names: list[str]) -> str:
    from models.light import build_light

    rows = []
    for name in names:
        model = modelio.load_model(build_light(name))
        _, groups = analyze(model, costs.value_dims(model))
        ok = [g for g in groups if g.prunable]
        before = costs.count_macs(model)
        start = time.perf_counter()
        prune(model, ratio=0.3, scope="global")
        seconds = time.perf_counter() - start
        make_session(modelio.to_proto(model))  # onnxruntime loads the result
        after = costs.count_macs(model)
        rows.append([name, str(len(groups)), str(len(ok)), str(sum(len(g.producers) > 1 for g in ok)),
                     str(sum(g.unit_sizes is not None for g in ok)),
                     formatting.human(before), formatting.human(after), f"{1 - after / before:.1%}", f"{seconds:.1f}"])
    return ("`python bench/channel_prune_bench.py --skip-digits --skip-latency` (ratio 0.3, scope global, l1, no "
            "data; seeded random weights; MACs at the model's input shape). *grouped*: groups whose removal units "
            "are channel sets (grouped convs / channel shuffle: equal counts per conv group).\n\n"
            + formatting.table(["model", "groups", "prunable", "coupled (>1 producer)", "grouped", "MACs before",
                           "MACs after", "MACs removed", "pass s"], rows))


def latency(ratio: float = 0.3, round_to: int = 8) -> str:
    from models.light import build_light

    path = build_light("resnet50")
    model = modelio.load_model(path)
    prune(model, ratio=ratio, scope="global", round_to=round_to)
    out = RESULTS / "resnet50_pruned.onnx"
    modelio.save_model(model, out)
    feeds = [{"gpu_0/data_0": np.random.default_rng(i).standard_normal((1, 3, 224, 224)).astype(np.float32)}
             for i in range(2)]
    rows = bench.benchmark([str(path), str(out)], feeds, threads=1, warmup=2, repeats=15,
                           labels=["resnet50", f"pruned {ratio:.0%} global, round_to {round_to}"])
    out.unlink()
    return bench.format_bench(rows) + f"\n\nspeed-up: {rows[0].median_ms / rows[1].median_ms:.2f}x at 1 thread"


def digits(ratios=(0.1, 0.2, 0.3, 0.4, 0.5)) -> str:
    folder = ROOT / "models" / "digits"
    model = modelio.load_model(folder / "digits.onnx")
    calib = datamod.load_npz(folder / "calib.npz", datamod.input_specs(model))
    test = np.load(folder / "test.npz")

    def accuracy(m) -> float:
        out = make_session(modelio.to_proto(m)).run(None, {"input": test["input"]})[0]
        return float(np.mean(out.argmax(1) == test["labels"]))

    base_macs, base_acc = costs.count_macs(model), accuracy(model)
    rows, curve = [], {False: [], True: []}
    for ratio in ratios:
        for repair in (False, True):
            m = model.clone()
            prune(m, PassContext(calib=calib, teacher=model.clone()), ratio=ratio, scope="global", repair=repair)
            removed = 1 - costs.count_macs(m) / base_macs
            acc = accuracy(m)
            curve[repair].append((removed, acc))
            rows.append([f"{ratio:g}", "yes" if repair else "no", f"{removed:.1%}", f"{acc:.4f}",
                         f"{(base_acc - acc) * 100:+.2f}"])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for repair, points in curve.items():
            xs, ys = zip(*points)
            ax.plot([100 * x for x in xs], [100 * y for y in ys], "o-", label="repair" if repair else "no repair")
        ax.axhline(100 * base_acc, color="gray", ls=":", label="original")
        ax.set_xlabel("MACs removed (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("digits: channel_prune (global, l1)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "channel_prune_digits.png", dpi=120)
    except ImportError:
        pass
    return (f"original accuracy {base_acc:.4f}, {formatting.human(base_macs)} MACs\n\n"
            + formatting.table(["ratio", "repair", "MACs removed", "test acc", "loss (points)"], rows))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-zoo", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--models", default=",".join(ZOO))
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    parts = []
    if not args.skip_digits:
        parts.append("## digits: accuracy vs MACs removed\n\n" + digits())
    if not args.skip_zoo:
        parts.append("## light zoo at 30% global\n\n" + zoo(args.models.split(",")))
    if not args.skip_latency:
        parts.append("## ResNet-50 fp32 latency\n\n" + latency())
    text = "\n\n".join(parts)
    print(text)
    path = RESULTS / "channel_prune.md"
    (path).write_text(merge_sections(path.read_text() if path.exists() else "", parts) + "\n")
    return 0


def merge_sections(old: str, new: list[str]) -> str:
    """``old`` with each section (``## title`` ...) replaced by the new one of the same title; new titles
    are appended."""
    def split(text: str) -> list[str]:
        return ["## " + p.strip() for p in ("\n" + text).split("\n## ")[1:]]

    sections = split(old)
    titles = [s.splitlines()[0] for s in sections]
    for part in new:
        title = part.splitlines()[0]
        if title in titles:
            sections[titles.index(title)] = part.strip()
        else:
            sections.append(part.strip())
    return "\n\n".join(sections)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
