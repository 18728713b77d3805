"""`python -m hessext.bench` (or `hessext-bench`): compare second-order methods on your hardware.

problems (the networks, data, references and checks), methods (hessext and its peers), timing (time
and memory of one method), report (table, markdown, plots), cli (the command line and the run), and
jax_worker (the JAX peer, in a process of its own)."""

from hessext.bench.cli import main, run
from hessext.bench.methods import METHODS, External, builders
from hessext.bench.problems import (
    PRESETS,
    QUANTITIES,
    RTOL,
    Problem,
    Skip,
    as_float64,
    check,
    flat,
    make_problem,
    mse,
    reference,
)
from hessext.bench.report import format_table, markdown, plot
from hessext.bench.timing import cpu_peak_mb, environment, measure

__all__ = [
    "METHODS",
    "PRESETS",
    "QUANTITIES",
    "RTOL",
    "External",
    "Problem",
    "Skip",
    "as_float64",
    "builders",
    "check",
    "cpu_peak_mb",
    "environment",
    "flat",
    "format_table",
    "make_problem",
    "markdown",
    "measure",
    "mse",
    "plot",
    "reference",
    "main",
    "run",
]
