"""Tests of graphopt.passes.channels (mirrors passes/channels/)."""
