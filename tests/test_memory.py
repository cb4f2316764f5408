"""The memory model against real tensors: predicted bytes vs bytes counted on the CPU.

What is counted, on tiny Llama models built from a config (random weights,
SDPA attention) and on the embedded model's shapes:
  parameters   unique storages of model.parameters()
  gradients    .grad of the trainable parameters after backward
  optimizer    AdamW state tensors after one step
  saved        tensors autograd saves for backward, seen through
               torch.autograd.graph.saved_tensors_hooks, storages deduplicated,
               parameters excluded (they are counted above)
The forward is the trainer's: model.model(ids, attention_mask) -> causal_lm_loss(hidden, W,
labels), on a right-padded batch (the padding mask changes what attention saves).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowmem import memory
from lowmem.config import LoraConfig, RunConfig
from lowmem.lora import apply_lora
from lowmem.loss import causal_lm_loss
from lowmem.memory import MemoryBreakdown, predict
from lowmem.model import checkpointing as enable_checkpointing, prepare_for_training
from lowmem.planner import Plan, plan_from_config
from lowmem.spec import builtin_spec, from_hf_config

TOLERANCE = 0.05  # the bar; on these shapes the model is exact (see benchmarks/results/planner.md)


def tiny_config(tied: bool) -> LlamaConfig:
    return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                       max_position_embeddings=256, attn_implementation="sdpa")


def cpu_plan(method: str, *, micro_batch: int, seq_len: int, ckpt: bool = False,
             rank: int = 8, dropout: float = 0.0, bf16: bool = False) -> Plan:
    config = RunConfig(method=method, device="cpu", micro_batch=micro_batch, seq_len=seq_len,
                       grad_checkpointing=ckpt, lora=LoraConfig(rank=rank, alpha=16.0, dropout=dropout))
    plan = plan_from_config(config)
    if bf16:  # bf16 weights + bf16 autocast: the CUDA recipe, run on the CPU
        plan = dataclasses.replace(plan, base_format="bf16", compute_dtype="bfloat16",
                                   optimizer_state_bits=16 if method == "full" else 32)
    return plan


def count_step(model: torch.nn.Module, plan: Plan, seed: int = 0) -> dict[str, int]:
    """Bytes of parameters (with quantization buffers), gradients, optimizer states and
    saved tensors of one real step."""
    torch.manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (plan.micro_batch, plan.seq_len))
    labels = ids.clone()
    inputs = {"input_ids": ids}
    if plan.masked_attention:  # packed rows, as the trainer's collate makes them: a second example from S/3
        cut = plan.seq_len // 3
        positions = torch.cat([torch.arange(cut), torch.arange(plan.seq_len - cut)])
        inputs["position_ids"] = positions.repeat(plan.micro_batch, 1)
        labels[:, cut] = -100
    param_storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in param_storages:
            saved.setdefault(key, t.untyped_storage().nbytes())
        return t

    bf16 = plan.compute_dtype == "bfloat16"
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        hidden = model.model(**inputs).last_hidden_state
        chunk = {"chunk_size": plan.loss_chunk} if plan.loss_chunk else {}
        # As the trainer calls it: summed, then divided by the number of targets.
        loss = causal_lm_loss(hidden, model.lm_head.weight, labels, reduction="sum", **chunk) / 100
    saved_bytes = sum(saved.values())
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    optimizer.step()
    states = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
              for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)}
    # Quantization statistics (NF4 absmaxes, L4Q's gradient scales) are buffers; the
    # rotary tables are the only other ones, and belong to no memory term.
    buffers = sum(b.untyped_storage().nbytes() for n, b in model.named_buffers() if "rotary" not in n)
    return {"parameters": sum(param_storages.values()) + buffers,
            "gradients": sum(p.grad.nbytes for p in trainable),
            "optimizer": sum(states.values()),
            "saved": saved_bytes}


def predicted(spec, plan: Plan) -> dict[str, int]:
    return {"parameters": memory.weight_bytes(spec, plan) + memory.adapter_bytes(spec, plan),
            "gradients": memory.gradient_bytes(spec, plan),
            "optimizer": memory.optimizer_bytes(spec, plan),
            "saved": memory.saved_activation_bytes(spec, plan)}


def assert_close(pred: dict[str, int], counted: dict[str, int]) -> None:
    errors = {k: (pred[k] - counted[k]) / counted[k] for k in counted}
    assert all(abs(e) <= TOLERANCE for e in errors.values()), (
        "predicted vs counted: " + ", ".join(f"{k} {pred[k]} vs {counted[k]} ({100 * e:+.2f}%)"
                                             for k, e in errors.items()))


def build(config: LlamaConfig, plan: Plan) -> torch.nn.Module:
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if plan.base_format == "bf16":
        model.to(torch.bfloat16)
    prepare_for_training(model, plan)  # the trainer's own: adapters, frozen base, checkpointing
    return model


# ---------------------------------------------------------------- tiny models: full and LoRA

@pytest.mark.parametrize("method,ckpt,tied", list(itertools.product(["full", "lora"], [False, True], [False, True])))
def test_fp32_prediction_matches_counted_bytes(method, ckpt, tied):
    config = tiny_config(tied)
    plan = cpu_plan(method, micro_batch=2, seq_len=24, ckpt=ckpt)
    counted = count_step(build(config, plan), plan)
    assert_close(predicted(from_hf_config(config.to_dict()), plan), counted)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_bf16_prediction_matches_counted_bytes(method):
    """c = 2: bf16 norms keep an fp32 copy of their input, LoRA saves bf16 copies of A and B."""
    config = tiny_config(tied=False)
    plan = cpu_plan(method, micro_batch=2, seq_len=24, bf16=True)
    counted = count_step(build(config, plan), plan)
    assert_close(predicted(from_hf_config(config.to_dict()), plan), counted)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_packed_batches_save_a_mask_per_block_and_expanded_kv_which_padded_ones_do_not(method):
    config = tiny_config(tied=False)
    spec = from_hf_config(config.to_dict())
    plan = cpu_plan(method, micro_batch=2, seq_len=24)
    assert not plan.masked_attention
    counted = count_step(build(config, plan), plan)
    assert_close(predicted(spec, plan), counted)
    packed = plan_from_config(RunConfig(method=method, device="cpu", micro_batch=2, seq_len=24, packing=True,
                                        lora=LoraConfig(rank=8, alpha=16.0)))
    assert packed.masked_attention
    packed_counted = count_step(build(config, packed), packed)
    assert_close(predicted(spec, packed), packed_counted)
    n, b = plan.micro_batch * plan.seq_len, spec.block_groups()[0][1]
    extra = (spec.layers * (4 * plan.micro_batch * plan.seq_len ** 2               # the additive masks
                            + n * 4 * 2 * (b.heads - b.kv_heads) * spec.head_dim)  # k, v expanded
             + 2 * (plan.micro_batch - 1) * plan.seq_len * spec.head_dim * 4)      # RoPE tables per row
    assert packed_counted["saved"] - counted["saved"] == extra
    assert memory.saved_activation_bytes(spec, packed) - memory.saved_activation_bytes(spec, plan) == extra


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_sliding_window_no_longer_than_the_sequence_saves_a_mask_per_block(method):
    """Mistral v0.1 attends 4096 tokens back: past that, transformers hands SDPA a banded mask,
    which costs what a packed batch's does (bar the per-row RoPE tables)."""
    from transformers import MistralConfig, MistralForCausalLM

    plan = cpu_plan(method, micro_batch=2, seq_len=24)
    counted = {}
    for window in (25, 24, 8):      # transformers masks from a window as long as the sequence
        config = MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               attn_implementation="sdpa", sliding_window=window)
        spec = from_hf_config(config.to_dict())
        assert spec.sliding_window == window
        torch.manual_seed(0)
        model = MistralForCausalLM(config)
        prepare_for_training(model, plan)
        counted[window] = count_step(model, plan)
        assert_close(predicted(spec, plan), counted[window])
    n, b = plan.micro_batch * plan.seq_len, spec.block_groups()[0][1]
    extra = spec.layers * (4 * plan.micro_batch * plan.seq_len ** 2 + n * 4 * 2 * (b.heads - b.kv_heads) * spec.head_dim)
    assert counted[8]["saved"] - counted[25]["saved"] == counted[24]["saved"] - counted[25]["saved"] == extra
    assert memory.saved_activation_bytes(spec, plan) - memory.saved_activation_bytes(
        dataclasses.replace(spec, sliding_window=25), plan) == extra


@pytest.mark.parametrize("method,ckpt", [("full", False), ("lora", False), ("full", True)])
def test_chunked_loss_prediction_matches_counted_bytes(method, ckpt):
    """A chunked loss keeps the final hidden states instead of fp32 log-probs of the vocabulary."""
    config = tiny_config(tied=False)
    spec = from_hf_config(config.to_dict())
    plan = dataclasses.replace(cpu_plan(method, micro_batch=2, seq_len=24, ckpt=ckpt), loss_chunk=16)
    counted = count_step(build(config, plan), plan)
    assert_close(predicted(spec, plan), counted)
    whole = memory.saved_activation_bytes(spec, dataclasses.replace(plan, loss_chunk=0))
    assert whole - counted["saved"] >= 3 * plan.micro_batch * plan.seq_len * spec.vocab


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _checkpointed(model: torch.nn.Module, plan: Plan) -> torch.nn.Module:
    if plan.grad_checkpointing:
        enable_checkpointing(model)
        model.enable_input_require_grads()
    return model


@pytest.mark.parametrize("ckpt", [False, True])
def test_qlora_prediction_matches_counted_bytes(ckpt):
    """NF4 base (double quantization) + LoRA: lowmem.quant.nf4 on the CPU."""
    nf4 = pytest.importorskip("lowmem.quant.nf4")
    config = tiny_config(tied=False)
    plan = dataclasses.replace(cpu_plan("lora", micro_batch=2, seq_len=24, ckpt=ckpt),
                               method="qlora", base_format="nf4", double_quant=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    nf4.quantize_linears(model, ALL_LINEAR, torch.float32, double_quant=True)
    apply_lora(model, plan.lora_rank, plan.lora_alpha, plan.lora_targets)
    counted = count_step(_checkpointed(model, plan), plan)
    assert_close(predicted(from_hf_config(config.to_dict()), plan), counted)


@pytest.mark.parametrize("ckpt", [False, True])
def test_l4q_prediction_matches_counted_bytes(ckpt):
    """Dense base, LoRA merged into the weight and fake-quantized: lowmem.quant.l4q."""
    l4q = pytest.importorskip("lowmem.quant.l4q")
    config = tiny_config(tied=False)
    plan = dataclasses.replace(cpu_plan("lora", micro_batch=2, seq_len=24, ckpt=ckpt),
                               method="l4q", quant_bits=4, quant_group=32)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    l4q.apply_l4q(model, plan.lora_rank, plan.lora_alpha, plan.lora_targets, bits=4, group_size=32)
    counted = count_step(_checkpointed(model, plan), plan)
    assert_close(predicted(from_hf_config(config.to_dict()), plan), counted)


def test_lora_dropout_saves_dropped_inputs_instead_of_the_norm_outputs():
    config = tiny_config(tied=True)
    plan = cpu_plan("lora", micro_batch=2, seq_len=24, dropout=0.1)
    counted = count_step(build(config, plan), plan)
    spec = from_hf_config(config.to_dict())
    assert_close(predicted(spec, plan), counted)
    without = memory.saved_activation_bytes(spec, dataclasses.replace(plan, lora_dropout=0.0))
    assert counted["saved"] > without  # dropout costs memory, and the model says how much


def test_checkpointing_keeps_only_block_inputs():
    config = tiny_config(tied=False)
    spec = from_hf_config(config.to_dict())
    plan = cpu_plan("full", micro_batch=2, seq_len=24)
    ckpt = dataclasses.replace(plan, grad_checkpointing=True)
    saved, saved_ckpt = (count_step(build(config, p), p)["saved"] for p in (plan, ckpt))
    n = plan.micro_batch * plan.seq_len
    assert saved_ckpt < saved
    # Checkpointing drops every block's saved tensors (and its padding mask) and the
    # shared RoPE tables, and keeps each block's input (n·h·4 bytes).
    block = memory.block_saved_bytes(spec, spec.block_groups()[0][1], plan)
    dropped = spec.layers * (n * (block - 4 * spec.hidden) + memory.mask_saved_bytes(spec, plan)) \
        + 2 * plan.seq_len * spec.head_dim * 4
    assert abs((saved - saved_ckpt) - dropped) <= 0.01 * dropped


# ---------------------------------------------------------------- the embedded model

@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_embedded_smollm2_135m_prediction_matches_counted_bytes(method, embedded_dir):
    """The real SmolLM2-135M-Instruct (converted from its GGUF once, then cached), a short sequence."""
    from lowmem.model import load_model

    model, _, _ = load_model("smollm2-135m", log=lambda m: None)
    spec = builtin_spec("smollm2-135m")
    plan = cpu_plan(method, micro_batch=1, seq_len=32, rank=16)
    prepare_for_training(model, plan)
    counted = count_step(model, plan)
    assert counted["parameters"] == 4 * 134_515_008 + (4 * memory.lora_params(
        spec, plan.lora_targets, 16) if method == "lora" else 0)
    assert_close(predicted(spec, plan), counted)


# ---------------------------------------------------------------- storage formats vs bitsandbytes

@pytest.mark.parametrize("shape", [(256, 640), (1000, 333)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_bytes_match_bitsandbytes(shape, double_quant):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    packed, state = bnbf.quantize_4bit(torch.randn(*shape), blocksize=64, quant_type="nf4",
                                       compress_statistics=double_quant)
    counted = packed.nbytes + state.absmax.nbytes + state.code.nbytes
    if state.nested:
        counted += state.state2.absmax.nbytes + state.state2.code.nbytes + state.offset.nbytes
    assert memory.nf4_bytes(shape[0] * shape[1], double_quant) == counted


def test_adamw8bit_states_match_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    params = [torch.nn.Parameter(torch.randn(*s)) for s in [(300, 512), (64, 64), (4097,), (1000,)]]
    optimizer = bnb.optim.AdamW8bit(params)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    storages = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
                for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)}
    expected = sum(memory.adamw_state_bytes(p.numel(), 8) for p in params) + memory.ADAM8_CODE_BYTES
    assert sum(storages.values()) == expected


def test_quantized_formats_order_by_bytes_per_weight():
    out_f, in_f = 4096, 11008
    sizes = {fmt: memory.linear_weight_bytes(out_f, in_f, fmt) for fmt in ("fp32", "bf16", "int8")}
    sizes["nf4"] = memory.linear_weight_bytes(out_f, in_f, "nf4", double_quant=False)
    sizes["nf4-dq"] = memory.linear_weight_bytes(out_f, in_f, "nf4", double_quant=True)
    sizes["int3-g128"] = memory.linear_weight_bytes(out_f, in_f, "int", bits=3, group=128)
    assert sizes["fp32"] > sizes["bf16"] > sizes["int8"] > sizes["nf4"] > sizes["nf4-dq"] > sizes["int3-g128"]
    # One group per row: the codes plus a step and an offset per row.
    assert memory.intk_bytes(out_f, in_f, 4, in_f) == out_f * in_f // 2 + 2 * 2 * out_f


@pytest.mark.parametrize("shape,bits,group,symmetric", [((64, 256), 4, 128, False), ((48, 100), 3, 32, True),
                                                       ((10, 77), 2, 64, False)])
def test_intk_bytes_match_the_export_packing(shape, bits, group, symmetric):
    intk = pytest.importorskip("lowmem.quant.intk")
    assert memory.intk_bytes(*shape, bits, group, symmetric) == intk.packed_bytes(*shape, bits, group, symmetric)


# ---------------------------------------------------------------- properties of predict()

def _gpu_plans() -> list[Plan]:
    base = plan_from_config(RunConfig(method="lora", device="cpu"))
    plans = []
    for method, fmt, ratio in [("full", "bf16", 0.0), ("galore", "bf16", 0.0), ("lora", "bf16", 0.0),
                               ("qlora", "nf4", 0.0), ("loram", "nf4", 0.6), ("l4q", "bf16", 0.0)]:
        for ckpt, offload, chunk, accum in itertools.product([False, True], [False, True], [0, 512], [1, 4]):
            adapter = method not in ("full", "galore")
            plans.append(dataclasses.replace(
                base, method=method, base_format=fmt, prune_ratio=ratio, device="cuda",
                compute_dtype="bfloat16", grad_checkpointing=ckpt, offload_activations=offload,
                loss_chunk=chunk, grad_accum=accum, micro_batch=2,
                lora_rank=16 if adapter else None, lora_targets=base.lora_targets if adapter else (),
                optimizer_state_bits=8 if method == "galore" else 16 if not adapter else 32,
                galore_rank=1024 if method == "galore" else None, galore_per_layer=method == "galore",
                quant_bits=4 if method == "l4q" else None, quant_group=128 if method == "l4q" else None))
    return plans


def test_longer_sequences_never_predict_less():
    spec = builtin_spec("llama-3.1-8b")
    for plan in _gpu_plans():
        totals = [predict(spec, dataclasses.replace(plan, seq_len=s)).total for s in (64, 512, 2048, 8192)]
        assert totals == sorted(totals), plan.label


def test_larger_micro_batches_never_predict_less():
    spec = builtin_spec("llama-2-7b")
    for plan in _gpu_plans():
        totals = [predict(spec, dataclasses.replace(plan, micro_batch=b)).total for b in (1, 2, 4, 8)]
        assert totals == sorted(totals), plan.label


def test_each_memory_saver_lowers_its_own_term():
    spec = builtin_spec("llama-3.1-8b")
    plan = dataclasses.replace(_gpu_plans()[0], method="lora", base_format="bf16", lora_rank=16,
                               lora_targets=("q_proj", "v_proj"), optimizer_state_bits=32,
                               seq_len=4096, grad_accum=1)
    base = predict(spec, plan)
    ckpt = predict(spec, dataclasses.replace(plan, grad_checkpointing=True))
    offload = predict(spec, dataclasses.replace(plan, offload_activations=True))
    chunked = predict(spec, dataclasses.replace(plan, loss_chunk=1024))
    qlora = predict(spec, dataclasses.replace(plan, method="qlora", base_format="nf4"))
    assert ckpt.activations < base.activations
    assert offload.activations < base.activations and offload.host > 0 and base.host == 0
    assert chunked.logits < base.logits / 4  # 128k vocabulary: the loss is the big saving
    # NF4 quantizes the block linears (embeddings and head stay bf16) and adds a dequant buffer.
    assert qlora.weights < base.weights / 2 and qlora.temporaries > base.temporaries


def test_galore_per_layer_updates_keep_one_gradient_alive():
    spec = builtin_spec("llama-2-7b")
    galore = dataclasses.replace(_gpu_plans()[0], method="galore", galore_rank=1024,
                                 galore_per_layer=True, grad_accum=1, optimizer_state_bits=8)
    all_grads = memory.gradient_bytes(spec, dataclasses.replace(galore, galore_per_layer=False))
    assert memory.gradient_bytes(spec, galore) == 2 * spec.vocab * spec.hidden  # the largest tensor, bf16
    assert all_grads == 2 * spec.params
    # Projected 8-bit moments are far smaller than fp32 AdamW's 8 bytes per weight.
    full = dataclasses.replace(galore, method="full", optimizer_state_bits=32)
    assert memory.optimizer_bytes(spec, galore) < memory.optimizer_bytes(spec, full) / 6


def test_pruning_shrinks_every_shape_dependent_term():
    spec = builtin_spec("llama-3.1-70b")
    plan = dataclasses.replace(_gpu_plans()[0], method="loram", base_format="nf4", lora_rank=16,
                               lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                               optimizer_state_bits=32, prune_ratio=0.0)
    small = predict(spec, dataclasses.replace(plan, prune_ratio=0.8))
    big = predict(spec, dataclasses.replace(plan, prune_ratio=0.2))
    for term in ("weights", "adapters", "optimizer", "activations"):
        assert getattr(small, term) < getattr(big, term), term


def test_breakdown_total_is_the_sum_of_its_terms_and_round_trips():
    b = predict(builtin_spec("llama-2-13b"), _gpu_plans()[5])
    assert b.total == sum(b.to_dict()[t] for t in MemoryBreakdown.TERMS)
    assert MemoryBreakdown.from_dict(b.to_dict()) == b
    assert b.allocated == b.total - b.overhead and b.overhead >= memory.CUDA_CONTEXT_BYTES


def test_full_finetuning_peaks_when_gradients_are_all_alive():
    """Full training with bf16 grads of 8B: the peak is at the end of backward or the optimizer
    step, not at the end of the forward (short sequences, small activations)."""
    spec = builtin_spec("llama-3.1-8b")
    plan = dataclasses.replace(_gpu_plans()[0], seq_len=256, micro_batch=1, grad_accum=1)
    b = predict(spec, plan)
    assert b.phase in ("backward-end", "optimizer") and b.grads == 2 * spec.params and b.activations == 0


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "nf4"])
@pytest.mark.parametrize("prompt,new", [(16, 8), (256, 24)])
def test_generation_prediction_bounds_the_measured_peak(fmt, prompt, new):
    """Greedy generation (lowmem generate) on a model held as `fmt`: the predicted peak of live
    tensors is above what the steps held, and not by more than 10%."""
    from lowmem.measure import LiveTensorBytes, model_bytes
    from lowmem.quant.nf4 import quantize_linears
    from lowmem.spec import LINEARS

    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
                         max_position_embeddings=1024, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    compute = torch.bfloat16 if fmt == "bf16" else torch.float32
    model.to(compute)
    if fmt == "nf4":
        quantize_linears(model, LINEARS, compute)
    spec = from_hf_config(config.to_dict())
    plan = dataclasses.make_dataclass("Holding", ["method", "base_format", "compute_dtype", "device"])(
        "lora", fmt, "bfloat16" if fmt == "bf16" else "float32", "cpu")
    ids = torch.randint(0, 512, (1, prompt), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), LiveTensorBytes("cpu") as live:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, pad_token_id=0, use_cache=True)
    assert out.shape[1] == prompt + new
    predicted = memory.generation_bytes(spec, plan, prompt, new)
    if fmt == "nf4":
        # bitsandbytes' fused 4-bit matmul dequantizes inside one op, unseen by a dispatch mode;
        # the prediction counts that weight, which on CUDA the allocator does see.
        predicted -= spec.max_linear_numel() * 4
    # The model's own bytes, plus what generating added: not `live.base`, which counts every
    # tensor the process can reach (other tests' included).
    weights = model_bytes(model)
    assert memory.weight_bytes(spec, plan) <= weights <= 1.01 * memory.weight_bytes(spec, plan)   # + rotary buffer
    measured = weights + live.growth
    assert measured <= predicted <= 1.10 * measured, (measured, predicted)


# ---------------------------------------------------------------- what offloading moves

def offloaded_sizes(model: torch.nn.Module, plan: Plan) -> list[int]:
    """Bytes of each storage lowmem.offload moves in one micro-batch of the trainer's step."""
    from lowmem.offload import OffloadActivations

    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (plan.micro_batch, plan.seq_len))
    offload = OffloadActivations(device="cpu")
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=plan.compute_dtype == "bfloat16"):
        with offload:
            hidden = model.model(input_ids=ids).last_hidden_state
        loss = causal_lm_loss(hidden, model.lm_head.weight, ids, reduction="sum") / 100
    loss.backward()
    return offload.stats.sizes


@pytest.mark.parametrize("method,ckpt,bf16,dropout", [
    ("full", False, False, 0.0), ("full", False, True, 0.0), ("lora", False, True, 0.0),
    ("lora", False, False, 0.1), ("lora", True, True, 0.0), ("qlora", False, False, 0.0),
    ("l4q", False, True, 0.0)])
def test_offloading_moves_each_predicted_storage_once(method, ckpt, bf16, dropout):
    """Each tensor memory.decoder_saved_tensors lists is one storage the offloader moves
    (q, k and v read one input through three views: one copy), and pinned_host_bytes is
    those sizes rounded as the pinned allocator rounds them."""
    config = tiny_config(tied=True)
    plan = cpu_plan("lora" if method == "qlora" else method, micro_batch=2, seq_len=24,
                    ckpt=ckpt, dropout=dropout, bf16=bf16)
    torch.manual_seed(0)
    if method == "qlora":
        from lowmem.quant import nf4
        plan = dataclasses.replace(plan, method="qlora", base_format="nf4", double_quant=True)
        model = LlamaForCausalLM(config)
        nf4.quantize_linears(model, ALL_LINEAR, torch.float32, double_quant=True)
        apply_lora(model, plan.lora_rank, plan.lora_alpha, plan.lora_targets)
    else:
        model = build(config, plan)
    sizes = offloaded_sizes(_checkpointed(model, plan), plan)
    spec = from_hf_config(config.to_dict())
    predicted_sizes = memory.offloaded_tensors(spec, plan)
    assert sorted(sizes) == sorted(predicted_sizes.elements())
    on_gpu = dataclasses.replace(plan, device="cuda", offload_activations=True)
    if not dropout:   # the device decides only the dropout mask's bytes
        rounded = sum(2 ** math.ceil(math.log2(b)) for b in sizes)
        assert memory.pinned_host_bytes(spec, on_gpu) == rounded
    assert memory.pinned_host_bytes(spec, dataclasses.replace(plan, offload_activations=True)) == 0   # CPU


@pytest.mark.gpu
@pytest.mark.parametrize("ckpt", [False, True])
def test_on_cuda_pinned_host_memory_is_predicted(ckpt):
    """The pinned blocks alive at the end of an offloaded forward are memory.pinned_host_bytes."""
    from lowmem.offload import OffloadActivations

    config = tiny_config(tied=False)
    plan = dataclasses.replace(cpu_plan("lora", micro_batch=2, seq_len=256, ckpt=ckpt, bf16=True),
                               device="cuda", offload_activations=True)
    model = _checkpointed(build(config, plan).cuda(), plan)
    ids = torch.randint(0, config.vocab_size, (plan.micro_batch, plan.seq_len), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_host_memory_stats()
    before = torch.cuda.host_memory_stats()["active_bytes.current"]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with OffloadActivations(device="cuda"):
            hidden = model.model(input_ids=ids).last_hidden_state
        loss = causal_lm_loss(hidden, model.lm_head.weight, ids, reduction="sum")
    loss.backward()
    torch.cuda.synchronize()
    pinned = torch.cuda.host_memory_stats()["active_bytes.peak"] - before
    assert pinned == memory.pinned_host_bytes(from_hf_config(config.to_dict()), plan)
