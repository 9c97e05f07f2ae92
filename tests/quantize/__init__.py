"""Tests of graphopt.passes.quantize (mirrors passes/quantize/)."""
