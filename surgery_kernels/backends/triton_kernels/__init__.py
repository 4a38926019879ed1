"""Triton kernels of backend ``triton``: ``ce`` (linear cross-entropy) and ``kl`` (linear KL),
each a forward kernel (statistics only) and a backward kernel (recomputed tiles, float32
atomics), sharing the tile code in ``common``. Import only where triton is importable."""
