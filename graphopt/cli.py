"""The `graphopt` command: optimize, evaluate, bench, inspect, passes.

Exit codes: 0 done (optimize: the final model meets the gate), 1 the final model misses the gate,
2 bad input or usage — one line on stderr, a traceback only with --debug.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from graphopt.cpu import TARGETS
from graphopt.errors import GraphoptError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise GraphoptError(f"{self.prog}: {message} (see --help)")


_NUMBER = r"\d+(?:\.\d+)?"
_DURATION = re.compile(rf"({_NUMBER})|(?:({_NUMBER})h)?(?:({_NUMBER})m)?(?:({_NUMBER})s)?")


def duration(text: str) -> float:
    """Seconds in ``90s``, ``20m``, ``1h``, ``1h30m`` or a bare number of seconds (an argparse type)."""
    spoken = text.strip().lower()
    match = _DURATION.fullmatch(spoken) if spoken else None
    seconds = 0.0
    if match is not None:
        bare, hours, minutes, secs = (float(g) if g else 0.0 for g in match.groups())
        seconds = bare + 3600 * hours + 60 * minutes + secs
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive duration such as 90s, 20m, 1h, 1h30m or "
                                         "a number of seconds")
    return seconds


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help=".npz (keys = input names, axis 0 = samples, optional 'labels') or a folder "
                                  "of .npz feeds; split into calibration and evaluation when --calib is absent")
    p.add_argument("--calib", help="calibration samples (same formats as --data)")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=AxBxC",
                   help="a concrete shape for an input with dynamic dimensions (synthetic inputs)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--score-output", help="the class-score output used for agreement/accuracy; an [N, C, H, W] "
                                          "map agrees per pixel (class over C, or for C=1 the side of --map-threshold)")
    p.add_argument("--map-threshold", type=float, default=0.5,
                   help="one-channel score map: pixels agree when on the same side of this value (default 0.5)")


def _add_metric_fn(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metric-fn", metavar="MODULE:FUNCTION", help="your own score: a function of an onnxruntime "
                   "session returning a number, higher is better (module importable from here, or file.py:function); "
                   "--max-drop is then in its units")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="graphopt", description="ONNX graph-level model optimizer, verified with onnxruntime")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    opt = sub.add_parser("optimize", help="run a recipe of passes on a model")
    opt.add_argument("model")
    opt.add_argument("-o", "--output", help="output model (default: <input stem>.opt.onnx in the current folder)")
    group = opt.add_mutually_exclusive_group()
    group.add_argument("--recipe", help="YAML or JSON recipe file")
    group.add_argument("--passes", help='recipe string, e.g. "fold_batchnorm; prune:sparsity=0.5; quantize"')
    _add_data_args(opt)
    opt.add_argument("--max-drop", type=float, default=0.01,
                     help="allowed drop of the gate metric, a fraction (0.01 = one point; default 0.01)")
    opt.add_argument("--metric", choices=["accuracy", "agreement", "cosine", "snr"],
                     help="gate metric (default: by what the outputs are: accuracy with labels, else agreement, on "
                          "class scores; cosine on embeddings and hidden states; else worst-channel SNR)")
    _add_metric_fn(opt)
    opt.add_argument("--min-snr", type=float, help="minimum worst-channel SNR in dB")
    opt.add_argument("--target-cpu", choices=list(TARGETS), help="the CPU the model is built for: portable "
                     "(default: right on any x86-64 with AVX2 and any ARM64), host, or a kernel family")
    opt.add_argument("--report", help="JSON report path (a Markdown report is written beside it)")
    opt.add_argument("--no-latency", action="store_true",
                     help="skip the per-pass latency measurement (and with it the latency guard)")
    opt.add_argument("--allow-slower", action="store_true",
                     help="keep passes that make the model slower (default: rolled back beyond the measured noise, "
                          "unless the pass aims at size)")
    opt.add_argument("--samples", type=int, default=8,
                     help="how many synthetic samples to verify with when no data is given (default 8)")
    opt.add_argument("--quiet", action="store_true", help="no progress bars")

    au = sub.add_parser("auto", help="search recipes for the smallest or fastest model inside the accuracy budget")
    au.add_argument("model")
    au.add_argument("-o", "--output", help="the chosen model (default: <input stem>.auto.onnx in the current folder)")
    au.add_argument("--data", help=".npz (keys = input names, axis 0 = samples, optional 'labels') or a folder of "
                    ".npz feeds: alone, split into search samples (70%%) and held-out samples (30%%); with --calib, "
                    "all held out: the pick is judged once on it")
    au.add_argument("--calib", help="the samples the search calibrates and gates candidates on (same formats); "
                    "with --data the search uses all of it, alone it is split as --data is")
    au.add_argument("--max-drop", type=float, default=0.01, help="allowed drop of the gate metric (default 0.01)")
    au.add_argument("--metric", choices=["accuracy", "agreement", "cosine", "snr"],
                    help="gate metric (default: chosen by what the outputs are, as for optimize)")
    _add_metric_fn(au)
    au.add_argument("--objective", choices=["size", "latency", "balanced"], default="size",
                    help="what to minimize: bytes after lzma, latency, or balanced: the geometric mean of the "
                    "size and latency ratios to the original, so halving either counts the same (default size)")
    au.add_argument("--trials", type=int, default=20, help="candidates to try (default 20)")
    au.add_argument("--time-budget", type=duration, metavar="DURATION", help="time for the search: 90s, 20m, 1h, "
                    "1h30m or seconds (default: no limit); running candidates finish")
    au.add_argument("--study", help="Optuna study file (SQLite): a killed or finished search goes on from it")
    au.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    au.add_argument("--workers", type=int, help="run candidates on a local Dask cluster of this many worker "
                    "processes (size searches run that many at once; latency and balanced searches time one at a "
                    "time)")
    au.add_argument("--scheduler", help="run candidates on the Dask cluster at this address (tcp://HOST:8786)")
    au.add_argument("--quiet", action="store_true", help="no progress bar")

    ev = sub.add_parser("evaluate", help="compare a candidate model with a reference model")
    ev.add_argument("reference")
    ev.add_argument("candidate")
    _add_data_args(ev)
    ev.add_argument("--json", help="write the comparison as JSON")

    be = sub.add_parser("bench", help="latency, size, params and MACs of models, interleaved")
    be.add_argument("models", nargs="+")
    _add_data_args(be)
    be.add_argument("--repeats", type=int, default=50)
    be.add_argument("--warmup", type=int, default=5)

    ins = sub.add_parser("inspect", help="op histogram, params, MACs per layer, largest initializers; for an int8 "
                                         "model, the layers that can saturate on AVX2-class CPUs")
    ins.add_argument("model")
    ins.add_argument("--shape", action="append", default=[], metavar="NAME=AxBxC",
                     help="an input's shape to count MACs at (default: batch 1, the other dynamic dimensions from "
                          "--data, else a default the report names)")
    ins.add_argument("--data", help="samples (.npz or folder): MACs at their shapes; clipped int8 pair sums counted "
                                    "and AVX2 emulated on them")
    ins.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")

    sub.add_parser("passes", help="list every pass with its options")
    return parser


def _shapes(texts: list[str]) -> dict[str, tuple[int, ...]] | None:
    from graphopt.data import parse_shape

    return dict(parse_shape(t) for t in texts) or None


def _cmd_optimize(args: argparse.Namespace) -> int:
    from graphopt.pipeline import RunOptions, optimize
    from graphopt.report import format_table

    run = RunOptions(threads=args.threads, latency=not args.no_latency, progress=not args.quiet,
                     score_output=args.score_output, map_threshold=args.map_threshold, debug=args.debug,
                     target_cpu=args.target_cpu, allow_slower=args.allow_slower)
    report = optimize(args.model, args.output, passes=args.passes, recipe=args.recipe, calib=args.calib,
                      data=args.data, shapes=_shapes(args.shape), max_drop=args.max_drop, min_snr=args.min_snr,
                      metric=args.metric, run=run, report_path=args.report, synthetic_samples=args.samples,
                      metric_fn=args.metric_fn)
    print(format_table(report))
    return 0 if report.passed else 1


def _load_eval_data(args: argparse.Namespace, model) -> object:
    from graphopt import data

    specs = data.input_specs(model)
    source = args.data or args.calib
    if source is not None:
        return data.load_data(source, specs)
    return data.synthetic(specs, _shapes(args.shape))


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from graphopt import modelio
    from graphopt.metrics import Evaluator

    ref = modelio.load_model(args.reference)
    modelio.load_proto(args.candidate)
    dataset = _load_eval_data(args, ref)
    comparison = Evaluator(modelio.to_proto(ref), dataset, threads=args.threads,
                           score_output=args.score_output, map_threshold=args.map_threshold).evaluate(args.candidate)
    if getattr(dataset, "synthetic", False):
        print("WARNING: synthetic inputs: these numbers say nothing about accuracy")
    for out in comparison.outputs:
        print(f"{out.name}: max abs {out.max_abs:.4g}, mean abs {out.mean_abs:.4g}, cosine {out.cosine:.6f}, "
              f"SNR {out.snr_db:.1f} dB, worst channel {out.worst_channel} SNR {out.worst_channel_snr_db:.1f} dB")
    print(comparison.summary())
    if args.json:
        Path(args.json).write_text(json.dumps(comparison.to_dict(), indent=2) + "\n")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from graphopt import bench, modelio

    first = modelio.load_model(args.models[0])
    for path in args.models[1:]:
        modelio.load_proto(path)
    dataset = _load_eval_data(args, first)
    rows = bench.benchmark(list(args.models), dataset.feeds[:8], threads=args.threads, warmup=args.warmup,
                           repeats=args.repeats, progress=True)
    print(bench.format_bench(rows))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from graphopt import cpu, modelio, saturation_check
    from graphopt.inspection import format_inspect, inspect_model

    model = modelio.load_model(args.model)
    data = None
    if args.data is not None:
        from graphopt import data as datamod

        data = datamod.load_data(args.data, datamod.input_specs(model))
    print(f"host CPU: {cpu.host().describe()}")
    feed = data.feeds[0] if data is not None and len(data) else None
    print(format_inspect(inspect_model(model, _shapes(args.shape), feed=feed)))
    saturation = saturation_check.check(model, data, args.threads)
    if saturation.layers:  # an int8 model: can it clip on AVX2-class kernels?
        print()
        print(saturation_check.format_report(saturation))
    return 0


def _cmd_passes(_: argparse.Namespace) -> int:
    from graphopt.options import describe_options
    from graphopt.recipe import registry

    for name, cls in registry().items():
        print(f"{name}: {cls.summary}")
        for opt, default, allowed, doc in describe_options(cls.Options):
            print(f"    {opt} = {default}  ({allowed})  {doc}")
    return 0


def _cmd_auto(args: argparse.Namespace) -> int:
    from graphopt.auto import auto, summary

    result = auto(args.model, args.output, data=args.data, calib=args.calib, max_drop=args.max_drop,
                  objective=args.objective, trials=args.trials, time_budget=args.time_budget, study=args.study,
                  metric=args.metric, metric_fn=args.metric_fn, threads=args.threads, workers=args.workers,
                  scheduler=args.scheduler, progress=not args.quiet)
    for line in summary(result)[:3]:
        print(line)
    out = Path(result.output)
    written = [out, Path(result.recipe_path), out.with_suffix(".json"), out.with_suffix(".md")]
    written += [Path(result.fronts["plot"])] if result.fronts.get("plot") else []
    print("wrote " + ", ".join(str(p) for p in written))
    return 0 if result.passed else 1


COMMANDS = {"optimize": _cmd_optimize, "auto": _cmd_auto, "evaluate": _cmd_evaluate, "bench": _cmd_bench, "inspect": _cmd_inspect,
            "passes": _cmd_passes}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args([a for a in argv if a != "--debug"])
        args.debug = debug
        if args.command is None:
            raise GraphoptError("graphopt: give a command: optimize, auto, evaluate, bench, inspect or passes "
                                    "(see --help)")
        return COMMANDS[args.command](args)
    except GraphoptError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head & co.
        return 0
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
