"""lowmem: fine-tune language models on one GPU that does not have enough memory."""

import logging

__version__ = "0.1.0"


def _optional_cpu_kernel(record: logging.LogRecord) -> bool:
    # bitsandbytes, on a CPU with AVX-512 BF16, tries an optional kernel from the `kernels`
    # package and warns when it is not installed, telling users to install it: lowmem does not
    # need it (its 4-bit matmuls dequantize), so that advice would only mislead.
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_optional_cpu_kernel)
