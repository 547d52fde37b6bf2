"""``vlp benchmark``: standard retrieval, zero-shot, linear-probe and compositionality benchmarks from their
released file formats, over one or more checkpoints, in one comparison table (docs/benchmarks.md)."""

from vlp.benchmark.runner import BenchmarkRun, run_suite
from vlp.benchmark.suite import Suite, load_suite

__all__ = ["BenchmarkRun", "Suite", "load_suite", "run_suite"]
