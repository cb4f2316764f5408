"""CUDA kernels compiled at run time through cuda-python (NVRTC), each with a PyTorch reference.

    runtime   compile (NVRTC), disk cache, load, launch on PyTorch's current stream,
              argument checks, the fallback rule (KernelUnavailable → reference + one warning)
    device    device probes: name, capability, free/total memory, CUDA context size
    l4q       L4Q fused fake quantization, forward and backward, and its references

Every kernel source is listed in SOURCES: CI compiles each one for sm_80 and sm_90.
"""

from lowmem.kernels.l4q import SOURCE as L4Q_SOURCE

SOURCES = (L4Q_SOURCE,)
