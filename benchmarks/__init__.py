"""Reproducible speed comparisons of varlen_compile, run from the repository root as
``python -m benchmarks <command>`` (``python -m benchmarks --help`` lists the commands;
``benchmarks/README.md`` says how to run each, ``benchmarks/results/README.md`` what each result
file shows)."""
