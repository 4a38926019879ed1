"""Benchmarks of surgery_kernels against plain PyTorch, torch's own linear_cross_entropy,
cut-cross-entropy, Liger-Kernel and the bare-GEMM floor.

One command: ``python -m benchmarks run [--quick | --gpu-check | --preset NAME] [--device cpu|cuda]
--output DIR`` writes ``DIR/results.json``, ``results.csv``, ``report.md`` and PNG plots.
``python -m benchmarks report DIR [--readme]`` rebuilds the report from ``results.json``.

Layout: ``cases`` (what: ops, shapes, presets, inputs), ``providers`` (who), ``measure`` (how:
timing and memory rules), ``worker`` (the measuring process), ``runner`` (plan, run, compose
rows with floor and naive ratios), ``report`` (JSON/CSV/Markdown/plots), ``test_kernels``
(the same providers as a pytest-benchmark suite).
"""
