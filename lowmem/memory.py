"""The memory model: bytes of a training step, from shapes and dtypes only.

`predict(spec, plan)` returns a `MemoryBreakdown` of the peak of one training
step. Each term has its own function below whose docstring states the formula;
the symbols are

    N = micro_batch · seq_len   tokens in one forward/backward
    S = seq_len, h = hidden, I = intermediate, H = heads, K = kv_heads,
    d = head_dim, V = vocab, L = layers, r = LoRA rank, c = bytes of the
    compute dtype (4 on the CPU, which trains in fp32; 2 on CUDA: bf16
    base + bf16 autocast).

Where the numbers come from:

* Parameters, gradients and optimizer states are exact byte counts of the
  tensors PyTorch, bitsandbytes and our LoRA create (tests compare them with
  the real tensors).
* Activations are the tensors autograd saves for backward in a Hugging Face
  Llama block with SDPA attention (flash / memory-efficient kernels: they save
  q, k, v, the output and a log-sum-exp per head and token, never the S×S
  score matrix). The per-op list below was read off
  `torch.autograd.graph.saved_tensors_hooks` on the CPU and is checked against
  it in tests/test_memory.py. Right-padded batches pass no attention mask
  (causal); packed batches do (block-diagonal, `masked_attention`), and so does a
  sliding window no longer than the sequence (banded), which costs a mask per block
  and k, v expanded to every head (see attends_with_mask).
* Transient buffers (loss backward, dequantized weights, one block's
  backward) are upper estimates from the ops involved, stated per function.
* CUDA context and allocator overhead are constants from the literature, NOT
  measured on this project's hardware yet; see `CUDA_CONTEXT_BYTES`.

The step's peak is the largest of four moments: the loss (all activations
alive, plus the logits), the last block's backward (activations, a recomputed
block, its gradient buffers), the first block's backward (all gradients alive)
and the optimizer step (and, with per-layer GaLore and an untied head, the head's
update as backward begins). The breakdown reports the terms alive at that moment
and names it in `phase`.

Papers: QLoRA (Dettmers et al., 2023) for NF4 and double quantization; GaLore
(Zhao et al., 2024) for projected optimizer states; LoRAM (Zhang et al., 2025)
for pruned shapes; L4Q (Jeon et al., 2024) for low-bit weights with group scales.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

from lowmem.spec import BlockShape, ModelSpec

if TYPE_CHECKING:  # the planner imports this module, never the other way round
    from lowmem.planner import Plan

MiB = 2**20

# ---------------------------------------------------------------- constants
#
# Not measurable on a CPU-only machine: assumed from public reports until a GPU
# run measures them (benchmarks/ records how). How to measure each:
#   CUDA_CONTEXT_BYTES: in a fresh process, torch.cuda.init(); allocate 1 byte;
#     context = (total - free from torch.cuda.mem_get_info()) - torch.cuda.memory_reserved().
#   CUBLAS_WORKSPACE_BYTES: torch.cuda.memory_allocated() after the first bf16
#     matmul minus before it, less the matmul's output.
#   ALLOCATOR_FRAGMENTATION: torch.cuda.max_memory_reserved() /
#     torch.cuda.max_memory_allocated() - 1 over a few training steps.

#: CUDA context + loaded kernels (torch, cuBLAS, cuDNN) with lazy module loading,
#: outside the caching allocator. Reports range 300-600 MiB on A100/H100 with CUDA 12.
CUDA_CONTEXT_BYTES = 512 * MiB
#: cuBLAS workspace allocated through the caching allocator (Hopper default ~32 MiB).
CUBLAS_WORKSPACE_BYTES = 32 * MiB
#: Reserved-but-unused share of the caching allocator at peak (block rounding,
#: fragmentation). 5% is typical with `expandable_segments` (which `lowmem` turns on
#: unless PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF is set); 10-15% without.
ALLOCATOR_FRAGMENTATION = 0.05

#: NF4 (QLoRA): 64 weights per absmax block; the absmaxes are themselves
#: quantized to 8 bits in blocks of 256 under double quantization.
NF4_BLOCK = 64
NF4_NESTED_BLOCK = 256
#: bitsandbytes 8-bit optimizers: states quantized blockwise in blocks of 256;
#: tensors under 4096 elements keep 32-bit states.
ADAM8_BLOCK = 256
ADAM8_MIN_NUMEL = 4096
ADAM8_CODE_BYTES = 2 * 4 * 256

#: Activation offloading leaves saved tensors smaller than this on the device.
OFFLOAD_MIN_BYTES = 1024

_DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "int8": 1}

ADAPTER_METHODS = ("lora", "qlora", "loram", "l4q")
FULL_METHODS = ("full", "galore")


def dtype_bytes(name: str) -> int:
    try:
        return _DTYPE_BYTES[name]
    except KeyError:
        raise ValueError(f"unknown dtype '{name}'") from None


# ---------------------------------------------------------------- the breakdown

@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes alive at the peak of a training step, by what holds them."""

    weights: int        # the model's own parameters (frozen or trained), in their storage format
    adapters: int       # LoRA matrices (and L4Q step sizes)
    grads: int          # gradients alive at the peak
    optimizer: int      # optimizer states (and GaLore projections)
    activations: int    # tensors saved for backward (and a recomputed block, with checkpointing)
    logits: int         # the loss: logits, log-probabilities and their gradients
    temporaries: int    # dequantized weights, one block's backward buffers, cuBLAS workspace
    overhead: int       # CUDA context + allocator fragmentation (0 on the CPU)
    phase: str = "forward"   # when the peak happens: forward | backward | backward-end | optimizer | head update
    host: int = 0       # pinned CPU memory holding offloaded activations; not in total

    TERMS = ("weights", "adapters", "grads", "optimizer", "activations", "logits",
             "temporaries", "overhead")

    @property
    def total(self) -> int:
        return sum(getattr(self, t) for t in self.TERMS)

    @property
    def allocated(self) -> int:
        """What `torch.cuda.max_memory_allocated()` should report: total less overhead."""
        return self.total - self.overhead

    def to_dict(self) -> dict[str, Any]:
        out = {t: getattr(self, t) for t in self.TERMS}
        out.update(total=self.total, phase=self.phase, host=self.host)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MemoryBreakdown":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# ---------------------------------------------------------------- weight formats

def dense_bytes(numel: int, dtype: str) -> int:
    """numel · bytes(dtype): fp32 4, bf16/fp16 2."""
    return numel * dtype_bytes(dtype)


def int8_bytes(out_features: int, in_features: int) -> int:
    """LLM.int8 (bitsandbytes Int8Params): out·in int8 + one fp32 scale per output row.

        bytes = out·in + 4·out
    """
    return out_features * in_features + 4 * out_features


def nf4_bytes(numel: int, double_quant: bool = True) -> int:
    """NF4 (QLoRA) storage of one weight: packed 4-bit codes plus block absmaxes.

        codes        ⌈n/2⌉                                    (two 4-bit codes per byte)
        absmax       4·⌈n/64⌉                                 without double quantization
                     ⌈n/64⌉ + 4·⌈⌈n/64⌉/256⌉ + 4·256 + 4      with it: 8-bit absmaxes, an
                                                              fp32 absmax per 256 of them,
                                                              their 256-entry code and offset
        code         4·16                                     the NF4 code book

    ≈ 0.5 + 4/64 = 0.5625 B/param plain, ≈ 0.5 + 1/64 + 4/16384 = 0.5159 B/param
    double-quantized. Matches `bitsandbytes.functional.quantize_4bit` (tested).
    """
    blocks = math.ceil(numel / NF4_BLOCK)
    codes = math.ceil(numel / 2)
    if double_quant:
        absmax = blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) + 4 * 256 + 4
    else:
        absmax = 4 * blocks
    return codes + absmax + 4 * 16


def intk_bytes(out_features: int, in_features: int, bits: int, group: int,
               symmetric: bool = False, scale_bytes: int = 2) -> int:
    """Low-bit integer weights with a step size (and offset) per group of `group`
    weights along each row: the L4Q export (lowmem.quant.intk's packed layout).

        bytes = out·⌈in·bits/8⌉ + (1 if symmetric else 2)·out·⌈in/group⌉·scale_bytes

    Rows are padded to whole bytes; steps and offsets in fp16/bf16.
    4-bit, group 128, asymmetric: 0.5 + 4/128 = 0.53 B/param.
    """
    groups = out_features * math.ceil(in_features / group)
    return out_features * math.ceil(in_features * bits / 8) + (1 if symmetric else 2) * groups * scale_bytes


def linear_weight_bytes(out_features: int, in_features: int, fmt: str, *,
                        double_quant: bool = True, bits: int | None = None,
                        group: int | None = None, scale_bytes: int = 2) -> int:
    """One frozen or trained linear weight in format `fmt` (fp32 | bf16 | int8 | nf4 | intK;
    intK with `scale_bytes` per step size and offset)."""
    n = out_features * in_features
    if fmt in ("fp32", "bf16", "fp16"):
        return dense_bytes(n, fmt)
    if fmt == "int8":
        return int8_bytes(out_features, in_features)
    if fmt == "nf4":
        return nf4_bytes(n, double_quant)
    if fmt == "int":
        return intk_bytes(out_features, in_features, bits or 4, group or 128, scale_bytes=scale_bytes)
    raise ValueError(f"unknown weight format '{fmt}'")


# ---------------------------------------------------------------- plan accessors

def _get(plan: Any, name: str, default: Any) -> Any:
    value = getattr(plan, name, default)
    return default if value is None else value


def compute_bytes(plan: Any) -> int:
    """c: 4 for float32 compute (the CPU), 2 for bfloat16 autocast (CUDA)."""
    return dtype_bytes(_get(plan, "compute_dtype", "float32"))


def dense_dtype(plan: Any) -> str:
    """The dtype of parameters that are not quantized (embeddings, norms, biases, head)."""
    fmt = _get(plan, "base_format", "fp32")
    if fmt in ("fp32", "bf16", "fp16"):
        return fmt
    return "fp32" if compute_bytes(plan) == 4 else "bf16"


def model_spec_for_plan(spec: ModelSpec, plan: Any) -> ModelSpec:
    """The shapes the run trains on: pruned by the plan's LoRAM ratio, if any."""
    ratio = _get(plan, "prune_ratio", 0.0)
    if (ratio or any(_get(plan, "prune_layer_ratios", ()))) and not spec.blocks:
        return spec.pruned(ratio, _get(plan, "prune_keep_first", 1), _get(plan, "prune_keep_last", 1),
                           _get(plan, "prune_layer_ratios", ()))
    return spec


def _targets(plan: Any) -> tuple[str, ...]:
    return tuple(_get(plan, "lora_targets", ()))


def _is_adapter(plan: Any) -> bool:
    return plan.method in ADAPTER_METHODS


def _is_full(plan: Any) -> bool:
    return plan.method in FULL_METHODS


# ---------------------------------------------------------------- parameters

def kernels_run(plan: Any) -> bool:
    """Whether lowmem.kernels' CUDA kernels replace their references in this plan's run: on
    CUDA, unless LOWMEM_KERNELS=0 or this machine's GPU cannot run them (`planning_reason`)."""
    from lowmem.kernels.runtime import planning_reason

    return _get(plan, "device", "cpu") == "cuda" and planning_reason() is None


def weight_bytes(spec: ModelSpec, plan: Any) -> int:
    """The model's own parameters in their storage format.

        Σ_blocks Σ_linears linear_weight_bytes(out, in, base_format)
        + (embeddings V·h + untied head V·h + norms (2L+1)·h + q/k/v biases) · bytes(dense dtype)

    NF4 and int-k quantize only the block linears; embeddings, head, norms and
    biases stay in the dense dtype (bf16 on CUDA, fp32 on the CPU), as in QLoRA.
    L4Q trains on a dense base (the low-bit weights exist only after export).
    """
    fmt = _get(plan, "base_format", "fp32")
    if plan.method == "l4q":
        fmt = dense_dtype(plan)
    dq = _get(plan, "double_quant", True)
    bits, group = getattr(plan, "quant_bits", None), getattr(plan, "quant_group", None)
    scale_bytes = _get(plan, "quant_scale_bytes", 2)   # an export's: 4 for an L4Q run's
    total = 0
    for count, block in spec.block_groups():
        for out_f, in_f in spec.linear_shapes(block).values():
            total += count * linear_weight_bytes(out_f, in_f, fmt, double_quant=dq, bits=bits, group=group,
                                                 scale_bytes=scale_bytes)
    dense = spec.params - spec.linear_params
    return total + dense_bytes(dense, dense_dtype(plan))


Tensors = list[tuple[tuple[int, ...], int]]   # (shape, how many tensors have it)


def lora_shapes(spec: ModelSpec, targets: Iterable[str], rank: int) -> Tensors:
    """Every adapter tensor: A (r × in) and B (out × r) per targeted linear, with counts."""
    targets = set(targets)
    shapes: Tensors = []
    for count, block in spec.block_groups():
        for name, (out_f, in_f) in spec.linear_shapes(block).items():
            if name in targets:
                shapes += [((rank, in_f), count), ((out_f, rank), count)]
    return shapes


def lora_params(spec: ModelSpec, targets: Iterable[str], rank: int) -> int:
    """Σ over targeted linears of r·(in + out)."""
    return _total_numel(lora_shapes(spec, targets, rank))


def l4q_scale_shapes(spec: ModelSpec, targets: Iterable[str], group: int) -> Tensors:
    """L4Q's learned step sizes and offsets: (out, ⌈in/group⌉) each, per targeted linear."""
    targets = set(targets)
    return [((o, math.ceil(i / group)), 2 * count)
            for count, block in spec.block_groups()
            for name, (o, i) in spec.linear_shapes(block).items() if name in targets]


def l4q_grad_scale_bytes(spec: ModelSpec, plan: Any) -> int:
    """L4Q's per-group LSQ gradient scales γ (a buffer, read in backward): 4·Σ ⌈in/group⌉."""
    if plan.method != "l4q":
        return 0
    group, targets = _get(plan, "quant_group", 128), set(_targets(plan))
    return 4 * sum(count * math.ceil(i / group) for count, block in spec.block_groups()
                   for name, (_, i) in spec.linear_shapes(block).items() if name in targets)


def adapter_bytes(spec: ModelSpec, plan: Any) -> int:
    """LoRA matrices in fp32 (lowmem.lora keeps them fp32 over any base): 4·Σ r·(in+out).

    L4Q adds its fp32 step sizes and offsets, 4·Σ 2·out·⌈in/group⌉, and the
    LSQ gradient scales (l4q_grad_scale_bytes).
    """
    if not _is_adapter(plan):
        return 0
    return 4 * _total_numel(trainable_tensors(spec, plan)) + l4q_grad_scale_bytes(spec, plan)


def trainable_tensors(spec: ModelSpec, plan: Any) -> Tensors:
    """The tensors the optimizer updates, as (shape, count)."""
    if _is_adapter(plan):
        shapes = lora_shapes(spec, _targets(plan), plan.lora_rank)
        if plan.method == "l4q":
            shapes += l4q_scale_shapes(spec, _targets(plan), _get(plan, "quant_group", 128))
        return shapes
    shapes = []
    for count, block in spec.block_groups():
        shapes += [(shape, count) for shape in spec.linear_shapes(block).values()]
        shapes.append(((spec.hidden,), 2 * count))
        if spec.attention_bias:
            d = spec.head_dim
            shapes += [((block.heads * d,), count), ((block.kv_heads * d,), 2 * count)]
    shapes += [((spec.vocab, spec.hidden), 1), ((spec.hidden,), 1)]
    if not spec.tied_embeddings:
        shapes.append(((spec.vocab, spec.hidden), 1))
    return shapes


def _total_numel(tensors: Tensors) -> int:
    return sum(math.prod(shape) * count for shape, count in tensors)


def _max_numel(tensors: Tensors) -> int:
    return max(math.prod(shape) for shape, _ in tensors)


def trainable_dtype_bytes(plan: Any) -> int:
    """Adapters are fp32; fully trained parameters keep the dense dtype."""
    return 4 if _is_adapter(plan) else dtype_bytes(dense_dtype(plan))


# ---------------------------------------------------------------- gradients

def galore_targets(spec: ModelSpec, plan: Any = None) -> Tensors:
    """2-D weights GaLore projects: every block linear, and the embeddings and an untied head
    when the plan's `galore_embeddings` is set (else those use 8-bit AdamW)."""
    targets = [(shape, count) for count, block in spec.block_groups()
               for shape in spec.linear_shapes(block).values()]
    if plan is not None and _get(plan, "galore_embeddings", False):
        embeddings = 1 if spec.tied_embeddings else 2
        targets += [((spec.vocab, spec.hidden), 1)] * embeddings   # listed as trainable_tensors lists them
    return targets


def galore_rank(spec: ModelSpec, plan: Any) -> int:
    """The projection rank: the plan's, else h/4 (the GaLore paper's r/d for 7B: 1024/4096)."""
    return int(_get(plan, "galore_rank", 0) or max(1, spec.hidden // 4))


def gradient_bytes(spec: ModelSpec, plan: Any) -> int:
    """Gradients alive after a full backward.

        Σ trainable numel · bytes(param dtype)          (all gradients coexist)

    GaLore with per-layer updates applies and frees each weight's gradient in
    its post-accumulate hook, so only the largest one is alive at a time:

        max numel · bytes   [+ with grad_accum > 1: accumulated projected
                             gradients 4·Σ r·max(m, n) and the other
                             parameters' full gradients]
    """
    b = trainable_dtype_bytes(plan)
    tensors = trainable_tensors(spec, plan)
    if plan.method == "galore" and _get(plan, "galore_per_layer", True):
        peak = _max_numel(tensors) * b
        if _get(plan, "grad_accum", 1) > 1:
            r = galore_rank(spec, plan)
            two_d = galore_targets(spec, plan)
            projected = sum(min(r, o, i) * max(o, i) * n for (o, i), n in two_d)
            others = _total_numel(tensors) - _total_numel(two_d)
            peak += 4 * projected + b * others
        return peak
    return _total_numel(tensors) * b


# ---------------------------------------------------------------- optimizer states

def adamw_state_bytes(numel: int, bits: int = 32, state_bytes: int = 4) -> int:
    """AdamW moments (exp_avg, exp_avg_sq) and step for one tensor.

        32/16-bit (torch.optim.AdamW, whose moments take the parameter's dtype):
                                    2·numel·state_bytes + 4   (state_bytes 4 for fp32,
                                    2 for bf16 parameters; the step is a 4-byte
                                    scalar tensor)
        8-bit (bitsandbytes AdamW8bit, blockwise): numel ≥ 4096:
                                    2·numel + 2·4·⌈numel/256⌉
                                    (uint8 states, an fp32 absmax per block of 256);
                                    smaller tensors keep 32-bit states. The two
                                    256-entry fp32 code maps are shared by all
                                    tensors: ADAM8_CODE_BYTES once per optimizer.
    """
    if bits == 8 and numel >= ADAM8_MIN_NUMEL:
        return 2 * numel + 8 * math.ceil(numel / ADAM8_BLOCK)
    if bits == 8:
        return 2 * numel * 4
    return 2 * numel * state_bytes + 4


def galore_state_bytes(out_features: int, in_features: int, rank: int, projection_bytes: int = 2) -> int:
    """8-bit GaLore states of one m×n weight (rank r, projection on the shorter side).

        moments     2·r·max(m,n) + 8·⌈r·max(m,n)/256⌉   8-bit Adam on the projected gradient
        projection  p·r·min(m,n)                        P from the gradient's SVD, kept in the
                                                        parameters' dtype (p = 2 for bf16, 4 for
                                                        fp32), as galore-torch does
    """
    r = min(rank, out_features, in_features)
    projected = r * max(out_features, in_features)
    return adamw_state_bytes(projected, 8) + projection_bytes * r * min(out_features, in_features)


def optimizer_bytes(spec: ModelSpec, plan: Any) -> int:
    """Optimizer states of every trainable tensor (see adamw_state_bytes / galore_state_bytes).

    GaLore: block linears get galore_state_bytes; embeddings, head and norms
    get 8-bit AdamW. Others: AdamW at the plan's `optimizer_state_bits`
    (32: fp32 moments; 16: bf16 moments, what torch.optim.AdamW keeps for bf16
    parameters; 8: bitsandbytes blockwise 8-bit).
    """
    tensors = trainable_tensors(spec, plan)
    if plan.method == "galore":
        r = galore_rank(spec, plan)
        two_d = galore_targets(spec, plan)
        p = trainable_dtype_bytes(plan)
        total = sum(galore_state_bytes(o, i, r, p) * n for (o, i), n in two_d)
        # The rest (norms, biases, embeddings, head): the linears are the block's
        # 2-D tensors, listed first per block group by trainable_tensors.
        rest = [t for t in tensors if t not in two_d]
        return total + sum(adamw_state_bytes(math.prod(s), 8) * n for s, n in rest) + ADAM8_CODE_BYTES
    bits = _get(plan, "optimizer_state_bits", 32)
    state = 2 if bits == 16 else 4
    total = sum(adamw_state_bytes(math.prod(s), bits, state) * n for s, n in tensors)
    if bits == 8 and _max_numel(tensors) >= ADAM8_MIN_NUMEL:
        total += ADAM8_CODE_BYTES
    return total


# ---------------------------------------------------------------- activations

def norm_saved_tensors(hidden: int, c: int, weight_trainable: bool) -> list[int]:
    """Per token, the tensors one RMSNorm saves (its output is saved by the next linear).

        4·h, 4      the input upcast to fp32 (pow, mul) and rsqrt(mean(x²)+ε)
        c·h         the normalised x, when the norm weight is trained (weight·x)
    """
    return [4 * hidden, 4] + ([c * hidden] if weight_trainable else [])


def norm_saved_bytes(hidden: int, c: int, weight_trainable: bool) -> int:
    """Per token, what one RMSNorm saves: 4·h + 4 [+ c·h] (norm_saved_tensors)."""
    return sum(norm_saved_tensors(hidden, c, weight_trainable))


def attention_saved_tensors(block: BlockShape, head_dim: int, c: int, masked_attention: bool = False) -> list[int]:
    """Per token, the tensors SDPA attention saves (flash / memory-efficient kernel).

        c·H·d, c·K·d, c·K·d, c·H·d, 4·H     q, k, v (K heads: GQA is passed to the
                                            kernel unexpanded), the output, an fp32
                                            log-sum-exp per head
        with masked attention:              k and v are expanded to H heads first
                                            (transformers only uses SDPA's GQA without
                                            a mask): K → H

    q and k are the rotated copies (RoPE makes new tensors); o_proj's input is
    the attention output itself. No S×S matrix (see mask_saved_bytes for the mask).
    """
    kv_heads = block.heads if masked_attention else block.kv_heads
    q, kv = c * block.heads * head_dim, c * kv_heads * head_dim
    return [q, kv, kv, q, 4 * block.heads]


def attends_with_mask(spec: ModelSpec, plan: Any) -> bool:
    """Whether attention takes a mask: packed batches (block-diagonal), or a sliding window
    no longer than the sequence (banded; transformers builds it from a window equal to the
    sequence up). Causal attention over right-padded batches needs none."""
    return bool(_get(plan, "masked_attention", False)) or 0 < spec.sliding_window <= plan.seq_len


def mask_saved_bytes(spec: ModelSpec, plan: Any) -> int:
    """Per block, with a mask (attends_with_mask): SDPA converts the boolean (B, 1, S, S)
    mask into an additive one in the compute dtype and saves it, c·B·S². 0 without one."""
    if not attends_with_mask(spec, plan):
        return 0
    return compute_bytes(plan) * plan.micro_batch * plan.seq_len ** 2


def mlp_saved_tensors(block: BlockShape, c: int, product_saved: bool = True) -> list[int]:
    """Per token, the tensors the gated MLP saves: gate (silu's input), silu(gate)
    and up (the product's operands), and the product itself when down_proj reads
    it for a gradient; c·I each."""
    return [c * block.intermediate] * (4 if product_saved else 3)


def lora_saved_tensors(in_features: int, rank: int, c: int, dropout: float,
                       mask_bytes: int = 1, input_needs_grad: bool = True) -> list[int]:
    """Per token, the tensors one LoRA linear adds.

        c·r                          x·Aᵀ, read by B's gradient
        c·in, m·in                   with dropout > 0: the dropped input (read by A's
                                     gradient) and the dropout mask (only when the
                                     input itself needs a gradient); m = 1 byte for
                                     CUDA's bool mask, c on the CPU, whose dropout
                                     multiplies by a mask in the input's dtype
    """
    out = [c * rank]
    if dropout > 0:
        out.append(c * in_features)
        if input_needs_grad:
            out.append(mask_bytes * in_features)
    return out


def block_saved_tensors(spec: ModelSpec, block: BlockShape, plan: Any, first: bool = False) -> list[int]:
    """Per token, each tensor one Llama block saves for backward.

        n1, [c·h], attention, n2, [c·h], mlp, lora per target

    The bracketed c·h are the norms' outputs, saved when a linear reading them
    needs them for a gradient: always in full training; with LoRA when one of
    q/k/v (resp. gate/up) has an adapter and no dropout (with dropout the
    adapters save their dropped copies instead). With adapters the embeddings
    are frozen, so the first block's n1 sees an input that needs no gradient:
    it saves nothing, and neither do the dropout masks of q/k/v.
    """
    c = compute_bytes(plan)
    h = spec.hidden
    full = _is_full(plan)
    targets = set(_targets(plan)) if _is_adapter(plan) else set()
    dropout = _get(plan, "lora_dropout", 0.0) if targets else 0.0

    def read_for_grad(names: set[str]) -> list[int]:
        return [c * h] if full or (bool(targets & names) and dropout == 0) else []

    out = [] if (first and not full) else norm_saved_tensors(h, c, full)
    out += read_for_grad({"q_proj", "k_proj", "v_proj"})
    out += attention_saved_tensors(block, spec.head_dim, c, attends_with_mask(spec, plan))
    out += norm_saved_tensors(h, c, full) + read_for_grad({"gate_proj", "up_proj"})
    out += mlp_saved_tensors(block, c, product_saved=bool(read_for_grad({"down_proj"})))
    if targets and plan.method != "l4q":  # L4Q merges B·A into the weight: no x·Aᵀ to keep
        mask = c if _get(plan, "device", "cpu") == "cpu" else 1
        for name, (_, in_f) in spec.linear_shapes(block).items():
            if name in targets:
                needs_grad = not (first and name in ("q_proj", "k_proj", "v_proj"))
                out += lora_saved_tensors(in_f, plan.lora_rank, c, dropout, mask, needs_grad)
    return out


def block_saved_bytes(spec: ModelSpec, block: BlockShape, plan: Any, first: bool = False) -> int:
    """Per token, everything one Llama block saves for backward (block_saved_tensors)."""
    return sum(block_saved_tensors(spec, block, plan, first))


def decoder_saved_tensors(spec: ModelSpec, plan: Any) -> Counter:
    """Bytes of each tensor the decoder (embeddings, blocks, final norm) saves for
    backward in one micro-batch: what activation offloading sees, as {bytes: how many
    tensors of that size} (a 70B model saves ~10^4 tensors of a few sizes).

    Without checkpointing:
        N · block_saved_tensors, for each block
        mask_saved_bytes            a block, with masked attention (packing, a short window)
        S·d·c, S·d·c                RoPE cos and sin (shared by all blocks; packed
                                    batches: B·S·d·c each, as positions differ by row)
        8·N                         token ids (embedding gradient, full training only)
        N · norm_saved_tensors      the final norm
        c·r·in, c·out·r             under bf16 compute, LoRA's copies of A and B for
                                    each targeted linear (A is saved to give x its
                                    gradient, so not in the first block's q/k/v, which
                                    read the frozen embeddings; with c = 4 `.to(float32)`
                                    of an fp32 parameter is the parameter itself)
        4·⌈in/group⌉                L4Q's gradient scales, each targeted linear
    With checkpointing only each block's input survives the forward:
        N·c·h a block, 8·N, N · norm_saved_tensors
    """
    c = compute_bytes(plan)
    n = plan.micro_batch * plan.seq_len
    h = spec.hidden
    full = _is_full(plan)
    out: Counter = Counter()

    def add(sizes: Iterable[int], times: int = 1) -> None:
        for size in sizes:
            if times > 0:
                out[size] += times

    add(n * t for t in norm_saved_tensors(h, c, full))
    add([8 * n] if full else [])
    if _get(plan, "grad_checkpointing", False):
        add([n * c * h], spec.layers)
        return out
    for i, (count, block) in enumerate(spec.block_groups()):
        if i == 0:  # the first block sees the embeddings' output
            add(n * t for t in block_saved_tensors(spec, block, plan, first=True))
            count -= 1
        add([n * t for t in block_saved_tensors(spec, block, plan)], count)
    add([mask_saved_bytes(spec, plan)], spec.layers)
    rows = plan.micro_batch if _get(plan, "masked_attention", False) else 1   # packed: positions per row
    add([rows * plan.seq_len * spec.head_dim * c], 2)
    targets = set(_targets(plan)) if _is_adapter(plan) else set()
    copies = c != 4 and plan.method != "l4q"   # `.to(float32)` of an fp32 parameter is itself
    group = _get(plan, "quant_group", 128)
    for i, (count, block) in enumerate(spec.block_groups()):
        for name, (o, in_f) in spec.linear_shapes(block).items():
            if name not in targets:
                continue
            if plan.method == "l4q":
                add([4 * math.ceil(in_f / group)], count)
            elif copies:
                # A is saved to give x its gradient, so not where x needs none
                skip_a = i == 0 and name in ("q_proj", "k_proj", "v_proj")
                add([c * plan.lora_rank * in_f], count - skip_a)
                add([c * o * plan.lora_rank], count)
    return out


def saved_layer_bytes(spec: ModelSpec, plan: Any) -> int:
    """Bytes the blocks, embeddings and final norm save for backward in one micro-batch.

        Σ decoder_saved_tensors
        + N·c·h     the final norm's output, saved by a trained LM head's matmul (a
                    chunked loss saves it itself: counted in saved_loss_bytes)
    """
    head_input = _is_full(plan) and not _get(plan, "loss_chunk", 0)
    n = plan.micro_batch * plan.seq_len
    return _total(decoder_saved_tensors(spec, plan)) + (n * compute_bytes(plan) * spec.hidden if head_input else 0)


def saved_loss_bytes(spec: ModelSpec, plan: Any) -> int:
    """Bytes the loss saves for backward.

        whole loss:            4·N·V + 8·N + 4    fp32 log-probabilities (log_softmax
                                                  output), int64 labels, the loss's
                                                  weight scalar
        whole loss, kernels:   c·N·V + 8·N        the logits in the compute dtype and
                                                  the labels (lowmem.loss.KeptLogitsCrossEntropy;
                                                  a trained head's input is counted in
                                                  saved_layer_bytes)
        chunked loss:          c·N·h + 8·N        only the final hidden states and labels;
                                                  each chunk's logits are recomputed in backward
    """
    n = plan.micro_batch * plan.seq_len
    c = compute_bytes(plan)
    if _get(plan, "loss_chunk", 0):
        return c * n * spec.hidden + 8 * n
    if kernels_run(plan):
        return c * n * spec.vocab + 8 * n
    return 4 * n * spec.vocab + 8 * n + 4


def saved_activation_bytes(spec: ModelSpec, plan: Any) -> int:
    """Everything autograd holds for backward at the end of the forward pass
    (what `saved_tensors_hooks` counts, storages deduplicated, parameters excluded)."""
    return saved_layer_bytes(spec, plan) + saved_loss_bytes(spec, plan)


def activation_bytes(spec: ModelSpec, plan: Any) -> tuple[int, int]:
    """(on the device, offloaded to the host) activation bytes at the end of the forward
    pass, the loss excluded: saved_layer_bytes, less what offloading moves.

    Offloading moves every saved storage of at least OFFLOAD_MIN_BYTES
    (offloaded_tensors) to pinned CPU memory; the widest block's worth twice
    stays on the device (the block in use and the one being brought back).
    """
    device = saved_layer_bytes(spec, plan)
    host = 0
    if offloads(plan):
        ckpt = _get(plan, "grad_checkpointing", False)
        per_block = plan.micro_batch * plan.seq_len * compute_bytes(plan) * spec.hidden if ckpt \
            else _widest_block_bytes(spec, plan)
        host = max(0, _total(offloaded_tensors(spec, plan)) - 2 * per_block)
        device -= host
    return device, host


def recomputed_block_bytes(spec: ModelSpec, plan: Any) -> int:
    """Under checkpointing, what the first block's backward adds by rebuilding that block's
    saved tensors: N·max block_saved_bytes (+ its padding mask); 0 without checkpointing."""
    return _widest_block_bytes(spec, plan) if _get(plan, "grad_checkpointing", False) else 0


def _widest_block_bytes(spec: ModelSpec, plan: Any) -> int:
    n = plan.micro_batch * plan.seq_len
    return n * max(block_saved_bytes(spec, b, plan) for _, b in spec.block_groups()) + mask_saved_bytes(spec, plan)


def offloads(plan: Any) -> bool:
    """Whether the plan's activation offloading moves anything: on a CUDA device only
    (on the CPU the host is the device, and lowmem.offload leaves tensors in place)."""
    return bool(_get(plan, "offload_activations", False)) and _get(plan, "device", "cpu") == "cuda"


def offloaded_tensors(spec: ModelSpec, plan: Any) -> Counter:
    """The storages activation offloading moves in one micro-batch, as {bytes: how many}:
    the decoder_saved_tensors of at least OFFLOAD_MIN_BYTES (smaller ones stay on the device)."""
    return Counter({b: k for b, k in decoder_saved_tensors(spec, plan).items() if b >= OFFLOAD_MIN_BYTES})


def _total(sizes: Counter) -> int:
    return sum(b * k for b, k in sizes.items())


def pinned_host_bytes(spec: ModelSpec, plan: Any) -> int:
    """Pinned host memory that activation offloading holds: Σ 2^⌈log₂ b⌉ over the
    offloaded_tensors b (each storage is copied once).

    Every such tensor of a micro-batch's forward is on the host when the forward
    ends. PyTorch's pinned-memory allocator rounds each block up to a power of two
    (ATen's CachingHostAllocator) and keeps freed blocks for reuse, so the next
    micro-batch reuses them and this is also what the process keeps pinned.
    0 without offloading, and on the CPU.
    """
    if not offloads(plan):
        return 0
    return sum(k << (b - 1).bit_length() for b, k in offloaded_tensors(spec, plan).items())


# ---------------------------------------------------------------- loss and temporaries

def logits_bytes(spec: ModelSpec, plan: Any) -> int:
    """Peak bytes of the loss computation (its saved tensors included).

        whole:           12·N·V      backward of cross-entropy holds the saved fp32
                                     log-probs, their gradient and the logits' gradient
                                     (3 × 4 bytes); the forward peak (c + 4 + 4)·N·V is lower
        whole, kernels:  saved_loss_bytes + c·N·h [+ V·h·t]
                                     the saved logits, overwritten by their gradient,
                                     the gradient of the hidden states [and, for a
                                     trained head, its gradient]
        chunked:         k·C·V + c·N·h + saved_loss_bytes [+ V·h·(t + c)]
                                     one chunk of C tokens at a time, the gradient of the
                                     hidden states, and the saved hidden [and for a trained
                                     head its gradient's sum and one chunk's share]. k = c
                                     with the CUDA kernel (lowmem.kernels.cross_entropy: the
                                     logits in the compute dtype, overwritten by their
                                     gradient); k = c + 4 + f with the reference (the
                                     logits, their fp32 log-probabilities or softmax, and
                                     f = 4 for their fp32 copy when c < 4, else 0;
                                     measured on the CPU by lowmem.measure: 8 at c = 4)
    t is the trained head's dtype size (trainable_dtype_bytes).
    """
    n = plan.micro_batch * plan.seq_len
    c = compute_bytes(plan)
    head = spec.vocab * spec.hidden if _is_full(plan) else 0
    chunk = _get(plan, "loss_chunk", 0)
    if chunk:
        chunk = min(chunk, n)
        per_logit = c if kernels_run(plan) else c + 4 + (4 if c < 4 else 0)
        return (per_logit * chunk * spec.vocab + c * n * spec.hidden + saved_loss_bytes(spec, plan)
                + head * (trainable_dtype_bytes(plan) + c))
    if kernels_run(plan):
        return saved_loss_bytes(spec, plan) + c * n * spec.hidden + head * trainable_dtype_bytes(plan)
    return 12 * n * spec.vocab + 8 * n + 4


def block_backward_bytes(spec: ModelSpec, plan: Any) -> int:
    """Gradient buffers alive inside one block's backward (an upper estimate).

        N·(3·I + 2·h)·c    in the MLP's backward the gradients of the product,
                           of silu(gate) and of up coexist (3·I), plus the
                           residual stream's gradient and the block input's (2·h)
    """
    n = plan.micro_batch * plan.seq_len
    inter = max(b.intermediate for _, b in spec.block_groups())
    return n * (3 * inter + 2 * spec.hidden) * compute_bytes(plan)


def dequant_bytes(spec: ModelSpec, plan: Any) -> int:
    """Temporary full-precision weights.

        NF4 / int8 base:  max(out·in)·c          one linear dequantized at a time
        L4Q, kernels:     max(out·in)·c          the fused kernels (lowmem.kernels.l4q, on
                                                 CUDA): Ŵ in the compute dtype, then in
                                                 backward Ŵ for ∂L/∂x, freed before
                                                 G = gradᵀx, which the kernel masks in place
        L4Q, reference:   max(out·in)·(9 + c)    the PyTorch reference (CPU, LOWMEM_KERNELS=0):
                                                 in backward, G plus W = W0 + c·BA and ∂Ŵ/∂s
                                                 in fp32, the codes and a bool mask
    """
    fmt = _get(plan, "base_format", "fp32")
    c = compute_bytes(plan)
    if plan.method == "l4q":
        return spec.max_linear_numel() * (c if kernels_run(plan) else 9 + c)
    if fmt in ("nf4", "int8", "int"):
        return spec.max_linear_numel() * c
    return 0


def svd_refresh_bytes(shape: tuple[int, int], plan: Any) -> int:
    """A GaLore projection's refresh: torch.linalg.svd of one m×n gradient (k = min(m, n)).

        fp32 copy of a 16-bit gradient    4·m·n       (none when gradients are fp32)
        the solver's copy and workspace   8·m·n + 16·k²
        U, S, Vᵀ                          4·(m·k + k + k·n)

    The solver's part is an upper estimate: on the CPU the whole refresh grew the process by
    0.72-0.88 of this count, from 16384×256 to 4096×4096 (benchmarks/svd_refresh.py). Those
    buffers are the solver's own, so `lowmem plan --measure` on the CPU, which counts tensors,
    does not see them; on CUDA the allocator serves cuSOLVER's (not yet measured there).
    """
    m, n = shape
    k = min(m, n)
    copy = 4 * m * n if trainable_dtype_bytes(plan) != 4 else 0
    return copy + 8 * m * n + 16 * k * k + 4 * (m * k + k + k * n)


def galore_workspace_bytes(spec: ModelSpec, plan: Any, embeddings: bool = True) -> int:
    """GaLore's update buffers of one weight at a time: the largest projected weight's
    gradient refresh (svd_refresh_bytes), of the block linears only unless `embeddings`.

    The back-projected update comes after the refresh, not beside it, and is smaller (in
    place; for bf16 weights fp32 rows and their noise, 8 bytes a value of 2²⁰ at a time), as
    is the 8-bit update of the moments (eight_bit_step_bytes).
    """
    if plan.method != "galore":
        return 0
    targets = galore_targets(spec, plan if embeddings else None)
    return max(svd_refresh_bytes(shape, plan) for shape, _ in targets)


#: Elements an update of bf16 weights rounded stochastically works on at once, and its
#: temporaries per element of such a chunk at most: three 4-byte copies (lowmem.optim.BF16AdamW:
#: gradient and moments, then moments and weight, then weight and the int32 rounding noise;
#: the 8-bit AdamW: gradient, weight and noise; galore.UPDATE_CHUNK is this).
BF16_STEP_CHUNK = 1 << 22
BF16_STEP_TEMPORARIES = 12

#: The same for the 8-bit update's PyTorch reference (lowmem.kernels.adam8bit; full 8-bit AdamW
#: and GaLore's moments): seven 4-byte values an element while a moment is rounded (both moments
#: in fp32, V's noise, the upper code's index, the two codes around the moment and the index of
#: one of them), and one more for a bf16 weight (its noise). The CUDA kernel needs only the noise.
EIGHT_BIT_STEP_CHUNK = 1 << 20
EIGHT_BIT_STEP_TEMPORARIES = 28
EIGHT_BIT_STEP_BF16 = 4


def eight_bit_step_bytes(spec: ModelSpec, plan: Any) -> int:
    """Temporaries of the 8-bit update of the largest tensor it steps, a chunk at a time:
    (28, or 32 for bf16 weights; 4 more under GaLore) · min(its numel, 2²⁰); the reference's,
    an upper bound for the kernel's (4 or 8)."""
    per_value = EIGHT_BIT_STEP_TEMPORARIES + (EIGHT_BIT_STEP_BF16 if dense_dtype(plan) == "bf16" else 0)
    if plan.method == "galore":
        per_value += 4      # a projected update's direction, −lr·N, an fp32 tensor of R's shape
    return per_value * min(_eight_bit_numel(spec, plan), EIGHT_BIT_STEP_CHUNK)


def _eight_bit_numel(spec: ModelSpec, plan: Any) -> int:
    """The most values one 8-bit update steps: the largest trainable tensor, or under GaLore the
    largest projected gradient R (r·max(m, n)) or unprojected tensor (the embeddings and head
    unless galore.embeddings projects them; else a norm or bias vector)."""
    if plan.method != "galore":
        return _max_numel(trainable_tensors(spec, plan))
    r = galore_rank(spec, plan)
    projected = max(min(r, *shape) * max(shape) for shape, _ in galore_targets(spec, plan))
    rest = spec.hidden if _get(plan, "galore_embeddings", False) else spec.vocab * spec.hidden
    return max(projected, rest)


def optimizer_step_bytes(spec: ModelSpec, plan: Any) -> int:
    """Temporaries of the optimizer step.

        bf16 weights, 16-bit states: 12·min(max numel, 2²²) (updated in fp32 chunks and
              rounded stochastically, lowmem.rounding)
        8-bit states: eight_bit_step_bytes (the same, moments rounded stochastically too)
        CUDA: 0 (fused AdamW works in place); GaLore: the larger of galore_workspace_bytes
              and eight_bit_step_bytes (its moments, and the unprojected tensors, are 8-bit).
        CPU:  2·max numel·4 (the single-tensor AdamW makes two temporaries per tensor).
    """
    if plan.method == "galore":
        return max(galore_workspace_bytes(spec, plan), eight_bit_step_bytes(spec, plan))
    bits = _get(plan, "optimizer_state_bits", 32)
    if bits == 8 and _is_full(plan):
        return eight_bit_step_bytes(spec, plan)
    if bits == 16:
        return BF16_STEP_TEMPORARIES * min(_max_numel(trainable_tensors(spec, plan)), BF16_STEP_CHUNK)
    if _get(plan, "device", "cpu") == "cuda":
        return 0
    return 2 * 4 * _max_numel(trainable_tensors(spec, plan))


def overhead_bytes(allocated: int, plan: Any) -> int:
    """CUDA context + allocator fragmentation: the context + 5% of the allocated peak.

    The context is the plan's `context_bytes` when a run measured it on this
    machine's GPU (lowmem.kernels.device.context_bytes), else CUDA_CONTEXT_BYTES.
    0 on the CPU, where the budget is taken to cover tensors only.
    """
    if _get(plan, "device", "cpu") != "cuda":
        return 0
    context = _get(plan, "context_bytes", None) or CUDA_CONTEXT_BYTES
    return context + int(ALLOCATOR_FRAGMENTATION * allocated)


# ---------------------------------------------------------------- the step's peak

# ---------------------------------------------------------------- LoRAM: preparing the pruned base

def loram_stream_bytes(spec: ModelSpec, plan: Any) -> int:
    """Beside the pruned model, while a LoRAM run prunes as it loads (lowmem.prune.load_pruned_model):
    one block's dense linears in the compute dtype, their cut copies (at most as large) and
    one |w| temporary: c·(2·block linears + max(out·in))."""
    block = max(sum(o * i for o, i in spec.linear_shapes(b).values()) for _, b in spec.block_groups())
    return compute_bytes(plan) * (2 * block + spec.max_linear_numel())


def _calibration_plan(plan: Any) -> Any:
    """The plan a LoRAM preparation's forward and backward on the unpruned model are sized
    with: every weight read for a gradient, nothing checkpointed or offloaded."""
    if not dataclasses.is_dataclass(plan):
        return plan
    return dataclasses.replace(plan, method="full", prune_ratio=0.0, grad_checkpointing=False,
                               offload_activations=False)


def loram_taylor_stream_bytes(spec: ModelSpec, plan: Any, batches: int) -> tuple[int, int]:
    """(on the scoring device, on the host) while Taylor importance is scored one dense block
    at a time (lowmem.prune.taylor_scores_streamed), over `batches` calibration micro-batches.

    On the device, with n_b = batches, c the compute dtype, N tokens per micro-batch:

        c·(V·h [+ V·h untied head] + h)          embeddings, head, final norm
        + n_b·(c·N·h + 2·N·d·c)                  every batch's hidden states (forward) or
                                                 gradient at the current block boundary
                                                 (backward), and its rotary cos/sin
        + the larger of
          the loss:      logits_bytes            one batch's loss and its saved hidden
                         + N·(norm_saved + c·h)  states, through the final norm
          a backward:    (2c + 4)·P_block        one dense block, its weights' .grad and
                         + N·(block_saved − 2ch) the fp32 sums over batches; one batch's
                         + block_backward_bytes  activations of that block (re-run with
                         [+ c·N·h on CUDA]       grad: full training's, but the norms'
                                                 weights are frozen) and their backward
                                                 (the input's gradient among them); on
                                                 CUDA the input's copy from the host

    On CUDA the device also holds cuBLAS's workspace, and the host the one tensor being
    read from the files (at most c·max(V·h, out·in)). The checkpoint is assumed stored in
    the compute dtype or narrower: on the CPU a wider one adds its largest tensor while
    that is converted.

    On the host, every scored block's input for every batch, kept from the forward for
    the backward: (L − keep_first)·n_b·c·N·h.
    """
    c = compute_bytes(plan)
    n = plan.micro_batch * plan.seq_len
    h = spec.hidden
    calibration = _calibration_plan(plan)
    resident = c * (spec.embedding_params + spec.head_params + h)
    per_batch = batches * (c * n * h + 2 * n * spec.head_dim * c)
    loss = logits_bytes(spec, plan) + n * (norm_saved_bytes(h, c, False) + c * h)
    # Full training's saved tensors, less the two norms' outputs their trained weights would keep.
    backward = max((2 * c + 4) * spec.block_params(block)
                   + n * (block_saved_bytes(spec, block, calibration) - 2 * c * h)
                   for _, block in spec.block_groups())
    cuda = _get(plan, "device", "cpu") == "cuda"
    backward += block_backward_bytes(spec, calibration) + (c * n * h if cuda else 0)
    kept_blocks = max(0, spec.layers - _get(plan, "prune_keep_first", 1))
    host = kept_blocks * batches * c * n * h
    if cuda:
        resident += CUBLAS_WORKSPACE_BYTES
        host += c * max(spec.embedding_params, spec.max_linear_numel())
    return resident + per_batch + max(loss, backward), host


def loram_prepare_bytes(spec: ModelSpec, plan: Any, criterion: str, align: bool = False) -> int:
    """Memory LoRAM's preparation needs before training, when it loads the whole dense model.

    `spec` is the unpruned model. Pruning works on float weights, so the whole
    dense model exists first, in the compute dtype c (QLoRAM quantizes after):

        magnitude:  c·P + c·max(out·in)              the weights, one |w| at a time
        taylor:     c·P + (4 + c)·P_linear           + fp32 gradient sums and the
                    + saved activations + loss       weights' .grad, and one calibration
                                                     micro-batch's forward/backward on the
                                                     dense model (an estimate: the
                                                     activations of full training without
                                                     checkpointing)
        align:      the larger of that and           AdamW on the pruned blocks' weights:
                    c·P' + 3·c·P'_blocks             their gradients and two moments (in the
                    + activations + loss             weights' dtype), one micro-batch
    """
    if criterion not in ("taylor", "magnitude"):
        raise ValueError(f"criterion must be 'taylor' or 'magnitude' (resolve 'auto' first), got {criterion!r}")
    c = compute_bytes(plan)
    calibration = _calibration_plan(plan)
    if criterion == "magnitude":
        need = c * spec.params + c * spec.max_linear_numel()
    else:
        need = (c * spec.params + (4 + c) * spec.linear_params + saved_layer_bytes(spec, calibration)
                + logits_bytes(spec, calibration))
    if align:
        pruned = spec.pruned(plan.prune_ratio, plan.prune_keep_first, plan.prune_keep_last,
                             _get(plan, "prune_layer_ratios", ()))
        blocks = pruned.params - pruned.embedding_params - pruned.head_params
        need = max(need, c * pruned.params + 3 * c * blocks + saved_layer_bytes(pruned, calibration)
                   + logits_bytes(pruned, calibration))
    return need


def loram_prepare_device(spec: ModelSpec, plan: Any, criterion: str, host_available: int,
                         align: bool = False) -> str | None:
    """Where a LoRAM run that loads the whole dense model prunes (and aligns): "cuda" when
    that fits the plan's budget, else "cpu" when it fits the host's available RAM, else
    None (nowhere here).

    On the CPU the pruned model then moves to the GPU one linear at a time (QLoRAM
    quantizes each there), so the GPU never holds the dense model.
    """
    on_host = None
    if dataclasses.is_dataclass(plan) and _get(plan, "device", "cpu") == "cuda":
        on_host = (loram_prepare_bytes(spec, dataclasses.replace(plan, device="cpu"), criterion, align), 0)
    return where_fits(plan, loram_prepare_bytes(spec, plan, criterion, align), host_available, on_host=on_host)


def fits_budget(plan: Any, need: int) -> bool:
    """Whether `need` allocated bytes, with the CUDA overhead on top, fit a CUDA plan's budget
    (any amount does without one)."""
    usable = _get(plan, "usable", None)
    return usable is None or need + overhead_bytes(need, plan) <= usable


def where_fits(plan: Any, need: int, host_available: int, host_need: int = 0,
               on_host: tuple[int, int] | None = None) -> str | None:
    """Where a preparation step needing `need` bytes where it computes (and `host_need` more
    on the host whatever the device) can run: "cuda" when `need` fits the plan's budget
    and `host_need` the host, else "cpu" when both fit the host's available RAM (or
    `on_host`, the (need, host_need) of the step computed on the host, when they differ
    there), else None."""
    if _get(plan, "device", "cpu") == "cuda" and host_need <= host_available and fits_budget(plan, need):
        return "cuda"
    if sum(on_host or (need, host_need)) <= host_available:
        return "cpu"
    return None


def predict(spec: ModelSpec, plan: "Plan") -> MemoryBreakdown:
    """The peak of one training step of `plan` on a model of shapes `spec`.

    The step's memory peaks at one of these moments; each is the sum of the
    terms alive then, and the largest is the step's peak:

    static      = weights + adapters + optimizer
    kept        = gradients kept from earlier micro-batches (grad_accum > 1), else 0
    forward     = static + kept + saved activations + loss peak (logits_bytes)
                  + dequant + cuBLAS                         (the loss and its backward)
    backward    = static + kept + saved activations [+ the recomputed block]
                  + one block's backward buffers + dequant + cuBLAS
                  + the head's gradient (full training; beside the kept ones when the
                  head is tied to the embeddings)            (the last block's backward)
                  [+ per-layer GaLore: a block linear's gradient and its refresh]
    backward-end= static + all gradients + one block's backward buffers + dequant
                  + cuBLAS                                   (the first block's backward)
                  [+ 2·V·h·t, trained tied embeddings: the head's gradient, which waited
                  for the embedding's, and the embedding's, beside their sum (3·V·h·t when
                  accumulating: the sum then goes onto a kept gradient); per-layer GaLore:
                  the larger of that and its refresh of the largest projected weight]
    optimizer   = static + all gradients + the step's temporaries
    head update = per-layer GaLore with an untied head: its update as backward begins
    peak        = the largest, plus overhead (CUDA context + fragmentation)

    Between `backward` and `backward-end` gradients grow as activations are
    freed, both linearly in the blocks done, so the largest value lies at one
    of the two ends.
    """
    spec = model_spec_for_plan(spec, plan)
    cuda = _get(plan, "device", "cpu") == "cuda"
    workspace = CUBLAS_WORKSPACE_BYTES if cuda else 0
    weights = weight_bytes(spec, plan)
    adapters = adapter_bytes(spec, plan)
    optimizer = optimizer_bytes(spec, plan)
    grads = gradient_bytes(spec, plan)
    saved, _ = activation_bytes(spec, plan)
    rebuilt = saved + recomputed_block_bytes(spec, plan)
    dequant = dequant_bytes(spec, plan)
    block_bwd = block_backward_bytes(spec, plan)

    kept = grads if _get(plan, "grad_accum", 1) > 1 else 0
    head_grad = spec.vocab * spec.hidden * trainable_dtype_bytes(plan) if _is_full(plan) else 0
    per_layer = plan.method == "galore" and _get(plan, "galore_per_layer", True)
    tied_sum = 0
    if head_grad and spec.tied_embeddings:
        # One parameter, two gradients in one backward: autograd holds the head's until the
        # embedding's arrives, sums them into a third tensor, then accumulates that into .grad
        # (in place onto a kept gradient). Beside all other gradients: the two and their sum,
        # of which `grads` counts one unless a kept gradient is already there.
        tied_sum = (3 if kept and not per_layer else 2) * head_grad   # per-layer: gradient_bytes holds the kept one
        backward_grads = kept + head_grad
    elif per_layer:
        head_grad = 0  # the per-layer update frees it at once; gradient_bytes holds the largest
        backward_grads = kept
    else:
        backward_grads = max(kept, head_grad)   # an untied head's gradient goes into .grad at once
    # Per-layer, the embeddings' update (a refresh's SVD, projected) runs once their gradient
    # is in .grad: after a tied weight's two gradients were summed. Else the optimizer step.
    end_update = max(tied_sum, galore_workspace_bytes(spec, plan)) if per_layer else tied_sum
    refresh = 0
    if per_layer:
        # The last block's weights complete first: each one's gradient, and on a refresh step
        # its SVD, beside everything the earlier blocks saved.
        refresh = spec.max_linear_numel() * trainable_dtype_bytes(plan) + galore_workspace_bytes(
            spec, plan, embeddings=False)
    phases = [
        ("forward", dict(grads=kept, activations=saved, logits=logits_bytes(spec, plan),
                         temporaries=dequant + workspace)),
        ("backward", dict(grads=backward_grads, activations=rebuilt, logits=0,
                          temporaries=block_bwd + dequant + workspace + refresh)),
        ("backward-end", dict(grads=grads, activations=0, logits=0,
                              temporaries=block_bwd + dequant + workspace + end_update)),
        ("optimizer", dict(grads=grads, activations=0, logits=0,
                           temporaries=optimizer_step_bytes(spec, plan))),
    ]
    if per_layer and not spec.tied_embeddings:
        # An untied head's gradient is whole first: its update runs as backward begins, beside
        # everything the forward saved and, of the loss, the hidden states' gradient and with
        # the whole loss the logits' (the chunked loss's backward has freed its chunks when the
        # head's sum lands). Projected (galore.embeddings), a refresh step factorises it first.
        head = spec.vocab * spec.hidden * trainable_dtype_bytes(plan)
        n, c = plan.micro_batch * plan.seq_len, compute_bytes(plan)
        loss = c * n * spec.hidden + (0 if _get(plan, "loss_chunk", 0) else c * n * spec.vocab)
        update = eight_bit_step_bytes(spec, plan)
        if _get(plan, "galore_embeddings", False):
            update = max(update, svd_refresh_bytes((spec.vocab, spec.hidden), plan))
        phases.append(("head update", dict(grads=kept + head, activations=saved, logits=loss,
                                           temporaries=update)))
    best = None
    for phase, terms in phases:
        allocated = weights + adapters + optimizer + sum(terms.values())
        if best is None or allocated > best[1]:
            best = (phase, allocated, terms)
    phase, allocated, terms = best
    return MemoryBreakdown(weights=weights, adapters=adapters, optimizer=optimizer,
                           overhead=overhead_bytes(allocated, plan), phase=phase,
                           host=pinned_host_bytes(spec, plan), **terms)


# ---------------------------------------------------------------- generation


def generation_bytes(spec: ModelSpec, plan: Any, prompt_tokens: int, new_tokens: int, batch: int = 1,
                     adapter_params: int = 0) -> int:
    """Peak allocated bytes of greedy generation (`lowmem generate`), without the CUDA overhead.

    `plan` says how the model is held: `base_format` of the block linears (fp32 | bf16 |
    nf4 | int with quant_bits and quant_group), `compute_dtype`, `device`. With
    T = prompt_tokens + new_tokens and B sequences:

        weights      weight_bytes(spec, plan)
        adapter      4·adapter_params                  LoRA A and B stay fp32
        KV cache     2·L·K·d·B·T·c  + one layer's        keys and values of every token; the
                                                         cache grows by concatenation, so one
                                                         layer's old and new copies coexist
        prompt pass  B·T_p·(4h + 3I)·c                   one block's activations over the prompt
                     + B·H·T_p²·c when B > 1             and, for several left-padded prompts,
                                                         the attention scores the math kernel
                                                         makes for their padding mask
        dequantized  c·max(out·in)                       an NF4 or int-k linear at a time
        logits       (4 + c)·B·V                         the last position's only, and in fp32
    """
    c = compute_bytes(plan)
    tokens = prompt_tokens + new_tokens
    kv_layer = 2 * spec.kv_heads * spec.head_dim * batch * tokens * c
    kv = spec.layers * kv_layer + kv_layer
    prompt = batch * prompt_tokens * (4 * spec.hidden + 3 * spec.intermediate) * c
    if batch > 1:
        prompt += batch * spec.heads * prompt_tokens ** 2 * c
    fmt = _get(plan, "base_format", "fp32")
    dequant = spec.max_linear_numel() * c if fmt in ("nf4", "int8", "int") else 0
    logits = (4 + c) * batch * spec.vocab
    return weight_bytes(spec, plan) + 4 * adapter_params + kv + prompt + dequant + logits
