"""surgery_kernels: signed/weighted linear cross-entropy and linear KL computed from hidden states
and the lm_head weight, chunk by chunk or fully fused, never materializing the logits."""

from .backends import available_backends
from .functional import linear_cross_entropy, linear_kl_div
from .modules import LinearCrossEntropy, LinearKLDiv

__all__ = ["linear_cross_entropy", "linear_kl_div", "LinearCrossEntropy", "LinearKLDiv", "available_backends"]
__version__ = "0.1.0"
