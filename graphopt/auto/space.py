"""The recipes `graphopt auto` searches: one Optuna trial's choices → a recipe string.

Each objective searches the families that serve it, in the order they compose (low rank, then prune before
weight sharing, sharing before int8: later passes skip the compressed forms earlier ones leave). Every pass
carries a budget, so a too-aggressive setting is rolled back by the pipeline and the candidate stays inside the
budget on the search samples. ``auto`` settings are budget-seeking: the pass measures each layer's sensitivity
and takes the most compression its budget allows (per-layer ranks, sparsities, bit widths); what Optuna
searches is how the run's budget is shared between the passes and the knobs the allocation leaves open.
Size recipes end with ``compact``: once the weights are a few kilobytes, names and notes show after lzma.
``balanced`` (half size, half latency) searches the latency knobs, which shrink both (channel pruning, low rank
by MACs, int8), plus the size-only weight knobs (pruning, weight sharing), and ends with ``compact`` too.
"""

from __future__ import annotations

from typing import Any, Protocol

from graphopt import cpu

EXACT = ["fold_batchnorm", "fuse"]  # always: free wins, and the original's exact form
# last in every size recipe (exact): short names, no declared intermediate shapes or notes. Measured on the digits
# pick (4-bit codebooks after lowrank): 15.66 kB -> 15.11 kB after lzma, outputs bit-identical
SIZE_FINISH = "compact"
# size recipes store codebooks as float16 (a Cast after the Gather; centroids rounded to 11 bits, so gated like
# any lossy step). Measured on the same pick: another 0.25 kB after lzma (11 codebooks of 16 values)
HALF_CODEBOOK = ",half_codebook=true"
# k-means centroids (and biases) refit by least squares to the float layers' outputs, layer by layer: always on, as
# it was better in every measured case. On digits (search samples, 1-point budget), relative error of the logits
# on test.npz with / without it: 4 bits 0.0012 / 0.0125, 3 bits 0.0051 / 0.0341, 2 bits 0.041 / rolled back
# (alone), and after lowrank of the classifier 0.0087 / 0.0227, 0.014 / 0.050, 0.059 / rolled back; it is what
# makes 2 bits usable (21.4x smaller after lzma with the classifier factorized, test 99.44%). About a second per
# kmeans step there
REFIT = ",refit=true"
OBJECTIVES = ("size", "latency", "balanced")
TIMED = ("latency", "balanced")  # objectives whose candidates are timed (one at a time, on timing workers)
SHARES = [0.25, 0.5, 1.0]  # the part of the run's budget a first budget-seeking pass may spend
# lowrank on every layer of at least this many weights, or only on the large ones (measured on digits: factorizing
# its convs too left kmeans less to share, 11.2x smaller after lzma against 17.4x with the classifier alone)
LOWRANK_MIN_SIZES = [4096, 16384]
CHECK_SAMPLES = 512  # budget-seeking passes judge on up to this many search samples (all, usually)
# seconds kmeans:bits=auto may spend measuring widths (its default, 120 s, covered 25 of PP-OCRv4 rec's 47 layers
# at one width: the allocation then compressed 4 of them)
SEEK_SECONDS = 300
# tried first, after the original: what a hand recipe would try first, so a search with room for only a few
# candidates on a slow model (PP-OCRv4 rec: 5-8 minutes each) starts from the strong ones; TPE takes over after
KMEANS_FIRST = {"prune": "none", "kmeans_bits": "auto", "kmeans_data_aware": True, "quantize": True}
# kmeans_bits "4/8": the best hand recipe in BENCHMARKS.md (4 bits per channel on PP-OCRv4 rec's Convs, per layer
# on its MatMul/Gemm, 8 bits on the rest: 6.15x smaller after lzma) made budget-seeking: each layer at 8, 6 or 4 bits,
# the allocation deciding which from measured sensitivity and bytes. One codebook per channel on Convs only:
# fold_batchnorm leaves each Conv channel its own scale (a codebook per layer on rec's layers of >= 8192 weights
# took line accuracy from 0.967 to 0.867), while MatMul/Gemm channels share one (a 16-value codebook per channel
# would cost half a 120-row weight's indices). With the refit, every layer at its width as in the hand recipe:
# 6.72x, but 2 lines of 150 down on held-out lines (1 on the search's): at the budget's edge, hence the seeking.
# 6 bits is the step between: a layer the budget cannot take to 4 bits goes to 6, not 8 (rec, auto's 70 search
# feeds, 300 lines: 8|4 stopped at step 45 of 62, 10 layers left float, 5.03x; 8|6|4 6.41x, held-out 0.977 vs
# float 0.973). Each width is measured alone on MIXED_MEASURE samples (the whole-model checks use all search
# samples)
MIXED = "4/8"
MIXED_LEVELS = "8|6|4"
MIXED_MEASURE = 16
# channel pruning's scope: "global" drops the channels of least normalized L1 norm anywhere; "sensitivity" gives
# each group its own ratio from measured damage per MAC saved (each group pruned alone at CHANNEL_LEVELS on
# CHANNEL_MEASURE samples), so the MACs go where time goes. PP-OCRv4 det on an AMX host (search samples, box F1 kept
# at 1.000): sensitivity 0.2 (14.1% fewer MACs, 141 s) then int8 x0.437 of float against int8 alone x0.541, timed
# interleaved (1 thread); global 0.1 then int8 had measured x0.572 in an earlier search, int8 alone x0.549 there.
# In auto (its search samples, 20 minutes) the same candidate measured x0.414 and was refused at the budget's edge:
# box F1 with the output error doubled dropped 0.0169
CHANNEL_SCOPES = ["global", "sensitivity"]
# a fixed share of the MACs, or "auto": each group's ratio the most its share of the budget allows, checked on whole
# models as the pass emits them (pruned and repaired), up to CHANNEL_MAX_MACS of the model's MACs (each check runs a
# repair: on det, uncapped, the checks had not ended after 25 minutes). PP-OCRv4 det, AMX host, search samples, half the
# budget: the path to 20% held whole in one check (16.0% fewer MACs, 241 s), then int8 x0.452 of float in the
# pipeline, box F1 and its stressed form kept at 1.000. Unrepaired checks had stopped at 4.9% of its MACs
CHANNEL_RATIOS = [0.0, 0.1, 0.2, 0.3, "auto"]
CHANNEL_MAX_MACS = 0.2
CHANNEL_LEVELS = "0.25|0.5"
CHANNEL_MEASURE = 4
# the size search's second candidate: 6 fixed bits, one codebook per layer, data-aware, refit. No measurement, so it
# is quick on any model, and near-lossless, so it survives a held-out set the budget-seeking ones fall past (their
# search at the budget's edge). On the search split (AMX host): PP-OCR mobile cls 4.49x after lzma in 21 s,
# held-out accuracy 1.000 = float (the per-channel bits=auto candidate, 6.0x, lost 3 lines of 180 there);
# PP-OCRv4 det 5.41x in 246 s, held-out box F1 1.000 (one codebook per channel on its Convs: 2.85x); PP-OCRv4 rec
# 5.46x in 355 s, held-out lines 0.970 vs float 0.973 (per channel on its Convs: 3.66x)
STEADY = {"lowrank": "none", "prune": "none", "kmeans_bits": "6", "kmeans_data_aware": True,
          "kmeans_per_channel": False, "quantize": False}
FIRST = {
    # the hand recipe's widths, budget-seeking; a steady 6 bits (STEADY); budget-seeking k-means over every width
    # then int8, the same after low rank, then the aggressive end of that ladder (3 fixed bits)
    "size": [{"lowrank": "none", "prune": "none", "kmeans_bits": MIXED, "kmeans_data_aware": True, "quantize": False},
             STEADY,
             {**KMEANS_FIRST, "lowrank": "none", "kmeans_per_channel": True},
             {**KMEANS_FIRST, "lowrank": "auto", "lowrank_share": 0.25, "lowrank_min_size": LOWRANK_MIN_SIZES[0],
              "kmeans_per_channel": False},
             {**KMEANS_FIRST, "lowrank": "auto", "lowrank_share": 0.25, "lowrank_min_size": LOWRANK_MIN_SIZES[0],
              "kmeans_per_channel": False, "kmeans_bits": "3"}],
    "latency": [{"quantize": True, "lowrank_macs": 1.0, "channel_ratio": 0.0},
                {"quantize": True, "lowrank_macs": 1.0, "channel_ratio": "auto", "channel_share": 0.5},
                {"quantize": True, "lowrank_macs": 1.0, "channel_ratio": 0.1, "channel_scope": "global"}],
    "balanced": [{**KMEANS_FIRST, "channel_ratio": 0.0, "lowrank_macs": 1.0, "kmeans_per_channel": False,
                  "quantize_target": "latency"}],
}


class Suggest(Protocol):
    def suggest_categorical(self, name: str, choices: list) -> Any: ...


def original(objective: str) -> dict[str, Any]:
    """The choices that give the original model back (exact passes only): always the first candidate."""
    if objective == "size":
        return {"lowrank": "none", "prune": "none", "kmeans_bits": "none", "quantize": False}
    if objective == "balanced":
        return {"channel_ratio": 0.0, "lowrank_macs": 1.0, "prune": "none", "kmeans_bits": "none", "quantize": False}
    return {"quantize": False, "lowrank_macs": 1.0, "channel_ratio": 0.0}


def first(objective: str) -> list[dict[str, Any]]:
    """The choices tried right after the original, in this order (see FIRST)."""
    return [dict(c) for c in FIRST.get(objective, [])]


def suggest(trial: Suggest, objective: str) -> dict[str, Any]:
    """The knobs of one candidate."""
    if objective == "latency":
        return _channels(trial, {"quantize": trial.suggest_categorical("quantize", [False, True]),
                                 "lowrank_macs": trial.suggest_categorical("lowrank_macs", [1.0, 0.8, 0.6])})
    if objective == "size":
        choices = {"lowrank": trial.suggest_categorical("lowrank", ["none", "auto"])}
    else:  # balanced: the structural knobs cut bytes and MACs alike
        choices = _channels(trial, {"lowrank_macs": trial.suggest_categorical("lowrank_macs", [1.0, 0.8, 0.6])})
    choices |= {"prune": trial.suggest_categorical("prune", ["none", "auto", "0.5", "0.7"]),
                "kmeans_bits": trial.suggest_categorical("kmeans_bits", ["none", "auto", MIXED, "8", "6", "4", "3", "2"]),
                "quantize": trial.suggest_categorical("quantize", [False, True])}
    if choices.get("lowrank") == "auto":
        choices["lowrank_share"] = trial.suggest_categorical("lowrank_share", SHARES[:2])
        choices["lowrank_min_size"] = trial.suggest_categorical("lowrank_min_size", LOWRANK_MIN_SIZES)
    if choices["prune"] == "auto":
        choices["prune_share"] = trial.suggest_categorical("prune_share", SHARES)
    if choices["kmeans_bits"] != "none":
        choices["kmeans_data_aware"] = trial.suggest_categorical("kmeans_data_aware", [False, True])
    if choices["kmeans_bits"] not in ("none", MIXED):  # the mixed widths set their own layout
        choices["kmeans_per_channel"] = trial.suggest_categorical("kmeans_per_channel", [False, True])
    if objective == "balanced" and choices["quantize"]:  # int8 only where faster, or every op that can be
        choices["quantize_target"] = trial.suggest_categorical("quantize_target", ["latency", "size"])
    return choices


def _channels(trial: Suggest, choices: dict[str, Any]) -> dict[str, Any]:
    """The channel-pruning knobs: a ratio, and (when pruning) its scope."""
    choices["channel_ratio"] = trial.suggest_categorical("channel_ratio", CHANNEL_RATIOS)
    if choices["channel_ratio"] == "auto":
        choices["channel_share"] = trial.suggest_categorical("channel_share", SHARES)
    elif choices["channel_ratio"]:
        choices["channel_scope"] = trial.suggest_categorical("channel_scope", CHANNEL_SCOPES)
    return choices


def recipe(choices: dict[str, Any], objective: str, max_drop: float, channel_block: int | None = None) -> str:
    """The recipe string (`graphopt optimize --passes` grammar) for ``choices``: the steps in composing order
    (channels, low rank, pruning, sharing, int8); an objective's space only sets its own knobs. Pruned channel
    widths are kept multiples of ``channel_block`` (default: this machine's NCHWc block; auto passes its timing
    workers')."""
    steps = list(EXACT)
    budget = f"max_drop={max_drop:g}"
    prune, bits = str(choices.get("prune", "none")), str(choices.get("kmeans_bits", "none"))
    steps += _channel_steps(choices, max_drop, channel_block or cpu.host().channel_block)
    if choices.get("lowrank", "none") == "auto":
        share = f"max_drop={max_drop * choices.get('lowrank_share', 0.5):g}"
        steps.append(f"lowrank:ratio=auto,ratio_of=params,data_aware=true,"
                     f"min_size={choices.get('lowrank_min_size', LOWRANK_MIN_SIZES[0])},"
                     f"max_samples={CHECK_SAMPLES},{share}")
    if choices.get("lowrank_macs", 1.0) < 1.0:
        steps.append(f"lowrank:macs={choices['lowrank_macs']:g},{budget}")
    if prune == "auto":
        share = f"max_drop={max_drop * choices.get('prune_share', 1.0):g}"
        steps.append(f"prune:sparsity=auto,max_samples={CHECK_SAMPLES},{share}")
    elif prune != "none":
        steps.append(f"prune:sparsity={prune},scope=global,{budget}")
    if bits == MIXED:
        steps += _mixed_kmeans(",data_aware=true" if choices.get("kmeans_data_aware") else "", budget)
    elif bits != "none":
        aware = ",data_aware=true" if choices.get("kmeans_data_aware") else ""
        aware += ",per_channel=true" if choices.get("kmeans_per_channel") else ""
        seek = f",max_samples={CHECK_SAMPLES},time_budget={SEEK_SECONDS}" if bits == "auto" else ""
        steps.append(f"kmeans:bits={bits}{aware}{REFIT}{seek}{HALF_CODEBOOK},{budget}")
    if choices.get("quantize"):
        target = choices.get("quantize_target", "size" if objective == "size" else "latency")
        steps.append(f"quantize:target=size,{budget}" if target == "size" else f"quantize:{budget}")
    return "; ".join(steps if objective == "latency" else [*steps, SIZE_FINISH])


def _channel_steps(choices: dict[str, Any], max_drop: float, block: int) -> list[str]:
    """channel_prune at a fixed ratio (global or by sensitivity), or seeking its share of the budget."""
    ratio = choices.get("channel_ratio")
    if not ratio:
        return []
    measured = f",levels={CHANNEL_LEVELS},sensitivity_samples={CHANNEL_MEASURE}"
    if ratio == "auto":
        return [f"channel_prune:ratio=auto,round_to={block}{measured},max_macs={CHANNEL_MAX_MACS:g},"
                f"max_samples={CHECK_SAMPLES},max_drop={max_drop * choices.get('channel_share', 1.0):g}"]
    scope = choices.get("channel_scope", "global")
    return [f"channel_prune:ratio={ratio:g},scope={scope},round_to={block}"
            f"{measured if scope == 'sensitivity' else ''},max_drop={max_drop:g}"]


def _mixed_kmeans(aware: str, budget: str) -> list[str]:
    """kmeans_bits "4/8" (see MIXED): each layer at 8, 6 or 4 bits inside the budget, Convs per channel."""
    return [f"kmeans:bits=auto,levels={MIXED_LEVELS},per_channel=Conv|ConvTranspose{aware}{REFIT},"
            f"max_samples={CHECK_SAMPLES},measure_samples={MIXED_MEASURE},time_budget={SEEK_SECONDS}"
            f"{HALF_CODEBOOK},{budget}"]
