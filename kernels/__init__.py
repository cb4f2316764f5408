"""CUDA kernels compiled at run time through cuda-python (NVRTC), each with a PyTorch reference.

    runtime        compile (NVRTC), disk cache, load, launch on PyTorch's current stream,
                   argument checks, the fallback rule (KernelUnavailable → reference + one warning)
    device         device probes: name, capability, free/total memory, CUDA context size
    l4q            L4Q fused fake quantization, forward and backward, and its references
    cross_entropy  the chunked loss's cross-entropy over logits in place, and its references
    adam8bit       one fused step of blockwise 8-bit AdamW (V rounded stochastically), and its reference

Every kernel source is listed in SOURCES: CI compiles each one for sm_80 and sm_90.
A source holds the kernels of one dtype (or dtype pair), so a run compiles only what it uses.
"""

from lowmem.kernels import adam8bit, cross_entropy, l4q

SOURCES = (*l4q.SOURCES, *cross_entropy.SOURCES, *adam8bit.SOURCES)
