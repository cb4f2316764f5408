"""LoRAM: structured pruning, adapter recovery to the full shapes, alignment."""

import copy

import pytest
import torch

from lowmem.loram import INDEX_MAP_FILE, align, prepare_pruned, prune_state, recover_state, save_recovered_adapter
from lowmem.lora import adapter_state_dict, apply_lora, load_adapter, lora_modules
from lowmem.model import tiny_llama
from lowmem.prune import (IndexMap, apply_index_map, importance, kept_counts, layer_ratio_list,
                          masked_copy_reference, prune, select)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _model(seed=0, layers=4):
    # 6 query heads in 3 KV groups: a 50% prune keeps 2 groups of 2 heads, so both
    # whole groups and heads inside a kept group are removed.
    model = tiny_llama(hidden=48, layers=layers, heads=6, kv_heads=3, intermediate=96, seed=seed)
    return model.eval()


def _batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 512, (2, 12), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _trained_adapter(model, seed=1):
    """Random non-zero A and B, as if trained."""
    apply_lora(model, 4, 8.0, TARGETS)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.2)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)


def _save(model, folder):
    return save_recovered_adapter(model, folder, rank=4, alpha=8.0, targets=TARGETS, dropout=0.0,
                                  rslora=False, base_model="tiny")


# ---------------------------------------------------------------- pruning


@pytest.mark.parametrize("criterion", ["taylor", "magnitude"])
def test_pruned_model_equals_the_full_model_with_pruned_units_removed(criterion):
    full = _model()
    pruned = copy.deepcopy(full)
    index_map = prune(pruned, 0.5, criterion=criterion, batches=_batches())
    x = torch.randint(0, 512, (2, 10))
    reference = masked_copy_reference(full, index_map)
    torch.testing.assert_close(_logits(pruned, x), _logits(reference, x), atol=1e-5, rtol=1e-5)
    # ... and the removal really changed the model (the comparison is not vacuous).
    assert (_logits(pruned, x) - _logits(full, x)).abs().max() > 1e-3


def test_pruned_linears_are_physically_smaller_and_heads_form_whole_groups():
    model = _model()
    index_map = prune(model, 0.5, criterion="magnitude")
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    keep = index_map.layer(1)
    assert (len(keep.heads), len(keep.kv_heads), len(keep.channels)) == (4, 2, 48)
    assert tuple(attn.q_proj.weight.shape) == (4 * 8, 48) and tuple(attn.k_proj.weight.shape) == (2 * 8, 48)
    assert tuple(attn.o_proj.weight.shape) == (48, 4 * 8)
    assert tuple(mlp.gate_proj.weight.shape) == (48, 48) and tuple(mlp.down_proj.weight.shape) == (48, 48)
    assert attn.num_key_value_groups == 2
    # Kept query head j reads kept KV head j // 2: each head must come from that group.
    for j, h in enumerate(keep.heads):
        assert h // 2 == keep.kv_heads[j // 2]


def test_first_and_last_layers_are_kept_whole_by_default():
    full = _model()
    pruned = copy.deepcopy(full)
    index_map = prune(pruned, 0.5, criterion="magnitude")
    assert not index_map.is_pruned(0) and not index_map.is_pruned(3)
    assert index_map.is_pruned(1) and index_map.is_pruned(2)
    for i in (0, 3):
        for (name, a), (_, b) in zip(full.model.layers[i].named_parameters(),
                                     pruned.model.layers[i].named_parameters()):
            assert torch.equal(a, b), name


def test_per_layer_ratios_override_the_global_ratio_and_the_kept_outer_layers():
    ratios = layer_ratio_list(6, 0.5, keep_first=2, keep_last=1, layer_ratios={2: 0.25, 0: 0.5})
    assert ratios == [0.5, 0.0, 0.25, 0.5, 0.5, 0.0]
    model = _model()
    index_map = prune(model, 0.5, criterion="magnitude", layer_ratios={1: 0.0})
    assert not index_map.is_pruned(1) and index_map.is_pruned(2)
    assert index_map.ratio_text() == "ratio 50%"
    index_map = prune(_model(), 0.5, criterion="magnitude", layer_ratios={1: 0.25, 2: 0.75})
    assert index_map.ratio_text() == "ratios 25% to 75% by block"     # what the run's summary line says


def test_pruned_parameter_count_matches_the_planners_spec():
    from lowmem.spec import from_hf_config

    model = _model()
    spec = from_hf_config(model.config.to_dict())
    prune(model, 0.5, criterion="magnitude")
    assert sum(p.numel() for p in model.parameters()) == spec.pruned(0.5, 1, 1).params
    # loram.layer_ratios (the first blocks' own ratios) in the planner's spec as in the model.
    model = _model()
    prune(model, 0.5, criterion="magnitude", layer_ratios={0: 0.25, 1: 0.75, 2: 0.0})
    per_block = spec.pruned(0.5, 1, 1, (0.25, 0.75, 0.0))
    assert sum(p.numel() for p in model.parameters()) == per_block.params != spec.pruned(0.5, 1, 1).params
    # The shared formula: K' = round(K·0.5), H' = K'·round(H·0.5/K'), I' = round(I·0.5).
    assert kept_counts(9, 3, 1536, 0.5) == (4, 2, 768)   # SmolLM2-135M's middle blocks
    # A kept group never gets more query heads than it has (LLaMA-3.1-70B: 8 per group):
    # 20% of 8 KV groups keeps 6 groups, so at most 6·8 = 48 query heads, not round(64·0.8) = 51.
    assert kept_counts(64, 8, 28672, 0.2) == (48, 6, 22938)


def test_taylor_prunes_the_units_that_cannot_change_the_loss():
    # A KV group whose heads write nothing (zero o_proj columns) and MLP channels whose
    # down_proj columns are zero have |w·∂L/∂w| = 0 everywhere: they must go first,
    # although their other weights are large.
    model = _model()
    with torch.no_grad():
        for block in model.model.layers:
            block.self_attn.o_proj.weight[:, 0:16] = 0        # query heads 0, 1 = KV group 0
            block.self_attn.q_proj.weight[0:16] *= 10
            block.mlp.down_proj.weight[:, :10] = 0
            block.mlp.up_proj.weight[:10] *= 10
    index_map = prune(model, 0.5, criterion="taylor", batches=_batches())
    keep = index_map.layer(1)
    assert 0 not in keep.kv_heads and not {0, 1} & set(keep.heads)
    assert not set(range(10)) & set(keep.channels)


def test_magnitude_keeps_the_units_with_the_largest_weights():
    model = _model()
    with torch.no_grad():
        mlp = model.model.layers[2].mlp
        mlp.gate_proj.weight[90:] *= 100
        model.model.layers[2].self_attn.k_proj.weight[16:24] *= 100   # KV group 2
    scores = importance(model, "magnitude")
    index_map = select(model, scores, layer_ratio_list(4, 0.9), "magnitude")
    keep = index_map.layer(2)
    assert keep.kv_heads == (2,)
    assert len(keep.channels) == 10 and set(range(90, 96)) <= set(keep.channels)


def test_taylor_without_calibration_data_is_an_error():
    with pytest.raises(ValueError, match="calibration batches"):
        prune(_model(), 0.5, criterion="taylor")


def test_a_quantized_or_adapted_model_is_refused_with_the_fix():
    model = _model()
    apply_lora(model, 2, 4.0, ("q_proj",))
    with pytest.raises(TypeError, match="prune the float model before"):
        prune(model, 0.5, criterion="magnitude")


def test_index_map_round_trips_through_json_and_rebuilds_the_same_pruned_model(tmp_path):
    full = _model()
    pruned = copy.deepcopy(full)
    index_map = prune(pruned, 0.5, criterion="taylor", batches=_batches())
    loaded = IndexMap.load(index_map.save(tmp_path / "map.json"))
    assert loaded == index_map
    rebuilt = apply_index_map(copy.deepcopy(full), loaded)
    x = torch.randint(0, 512, (1, 8))
    assert torch.equal(_logits(rebuilt, x), _logits(pruned, x))


# ---------------------------------------------------------------- recovery


def test_recovery_puts_every_trained_value_at_its_original_index():
    model = _model()
    index_map = prune(model, 0.5, criterion="taylor", batches=_batches())
    _trained_adapter(model)
    trained = adapter_state_dict(model)
    recovered = recover_state(trained, index_map)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    assert tuple(recovered[key].shape) == (6 * 8, 4)
    heads = index_map.layer(1).heads
    pruned_rows = [h * 8 + j for h in range(6) if h not in heads for j in range(8)]
    assert torch.count_nonzero(recovered[key][pruned_rows]) == 0
    down_a = "base_model.model.model.layers.2.mlp.down_proj.lora_A.weight"
    channels = list(index_map.layer(2).channels)
    assert torch.equal(recovered[down_a][:, channels], trained[down_a])
    # Round trip: pruned -> recovered -> re-pruned is the trained adapter, bit for bit.
    again = prune_state(recovered, index_map)
    assert again.keys() == trained.keys()
    for k in trained:
        assert torch.equal(again[k], trained[k]), k


def test_recovered_adapter_on_the_masked_full_model_reproduces_the_pruned_run(tmp_path):
    # The update the pruned model learned, and nothing else, reaches the full model:
    # with the pruned units' outputs removed, full + recovered == pruned + adapter.
    full = _model()
    pruned = copy.deepcopy(full)
    index_map = prune(pruned, 0.5, criterion="taylor", batches=_batches())
    _trained_adapter(pruned)
    _save(pruned, tmp_path)
    reference = masked_copy_reference(full, index_map)
    load_adapter(reference, tmp_path)
    x = torch.randint(0, 512, (2, 10))
    torch.testing.assert_close(_logits(reference, x), _logits(pruned, x), atol=1e-5, rtol=1e-5)


def test_recovered_adapter_gives_the_same_logits_through_lowmem_and_peft(tmp_path):
    from peft import PeftModel

    full = _model(seed=5)
    pruned = copy.deepcopy(full)
    index_map = prune(pruned, 0.5, criterion="taylor", batches=_batches())
    _trained_adapter(pruned)
    _save(pruned, tmp_path)
    assert (tmp_path / INDEX_MAP_FILE).is_file() and IndexMap.load(tmp_path / INDEX_MAP_FILE) == index_map

    ours = copy.deepcopy(full)
    load_adapter(ours, tmp_path)
    x = torch.randint(0, 512, (2, 9))
    expected = _logits(ours, x)
    assert (expected - _logits(full, x)).abs().max() > 1e-3     # the adapter does something
    peft_model = PeftModel.from_pretrained(copy.deepcopy(full), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(peft_model, x), expected, atol=1e-5, rtol=1e-5)


def test_trained_lora_on_the_pruned_model_updates_only_kept_neurons_of_the_full_model(tmp_path):
    from lowmem.loss import causal_lm_loss

    full = _model()
    pruned = copy.deepcopy(full)
    index_map = prune(pruned, 0.5, criterion="taylor", batches=_batches())
    apply_lora(pruned, 4, 8.0, TARGETS)
    params = [p for p in pruned.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for batch in _batches(3, seed=7):
        hidden = pruned.get_decoder()(input_ids=batch["input_ids"]).last_hidden_state
        causal_lm_loss(hidden, pruned.get_output_embeddings().weight, batch["labels"]).backward()
        opt.step()
        opt.zero_grad()
    _save(pruned, tmp_path)
    load_adapter(full, tmp_path)
    delta = lora_modules(full)["model.layers.1.mlp.up_proj"].delta_weight()
    channels = set(index_map.layer(1).channels)
    dropped = [c for c in range(96) if c not in channels]
    assert torch.count_nonzero(delta[dropped]) == 0 and torch.count_nonzero(delta) > 0


# ---------------------------------------------------------------- alignment


def test_alignment_lowers_the_text_loss_and_trains_only_the_chosen_subset():
    model = _model()
    prune(model, 0.5, criterion="magnitude")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    text = torch.randint(0, 64, (4, 16))  # a small vocabulary: easy to learn in a few steps
    losses = align(model, [text], steps=12, lr=5e-3, subset="mlp")
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, frozen[n])}
    assert changed and all(".mlp." in n for n in changed)
    assert not any(p.requires_grad for p in model.parameters())


def test_a_resumed_run_rebuilds_the_same_pruned_model_from_its_saved_index_map():
    first, resumed = _model(), _model()
    index_map = prepare_pruned(first, ratio=0.5, criterion="taylor", calibration=_batches(), log=lambda m: None)
    # No calibration data on resume: the saved map decides, not a fresh scoring.
    prepare_pruned(resumed, ratio=0.5, index_map=IndexMap.from_json(index_map.to_json()), log=lambda m: None)
    x = torch.randint(0, 512, (1, 8))
    assert torch.equal(_logits(first, x), _logits(resumed, x))


# ---------------------------------------------------------------- where the dense model is pruned

def _loram_plan(vram_gib: float, criterion_device: str = "cuda"):
    import dataclasses

    from lowmem.config import RunConfig
    from lowmem.planner import plan_from_config

    base = plan_from_config(RunConfig(method="loram", device="cpu"))
    return dataclasses.replace(base, device=criterion_device, compute_dtype="bfloat16", base_format="nf4",
                               prune_ratio=0.6, micro_batch=1, seq_len=512,
                               vram=int(vram_gib * 2**30), safety_margin=0.05)


def test_preparing_loram_needs_the_dense_model_and_taylor_its_gradients():
    from lowmem import memory
    from lowmem.spec import builtin_spec

    spec = builtin_spec("llama-3.1-8b")
    plan = _loram_plan(24)
    magnitude = memory.loram_prepare_bytes(spec, plan, "magnitude")
    taylor = memory.loram_prepare_bytes(spec, plan, "taylor")
    assert magnitude == 2 * spec.params + 2 * spec.max_linear_numel()       # bf16 weights, one |w| temporary
    assert taylor > magnitude + 6 * spec.linear_params                      # fp32 sums + the weights' .grad
    # The dense model, not the pruned one: the prune ratio changes nothing here.
    import dataclasses
    assert memory.loram_prepare_bytes(spec, dataclasses.replace(plan, prune_ratio=0.9), "magnitude") == magnitude


def test_loram_prunes_on_the_gpu_if_it_fits_else_on_the_host_else_nowhere():
    from lowmem import memory
    from lowmem.spec import builtin_spec

    spec = builtin_spec("llama-3.2-1b")
    need = memory.loram_prepare_bytes(spec, _loram_plan(24), "magnitude")
    assert memory.loram_prepare_device(spec, _loram_plan(24), "magnitude", host_available=0) == "cuda"
    small = _loram_plan(need / 2**30)                    # the dense model alone fills it: overhead does not fit
    assert memory.loram_prepare_device(spec, small, "magnitude", host_available=need) == "cpu"
    assert memory.loram_prepare_device(spec, small, "magnitude", host_available=need - 1) is None
    cpu = _loram_plan(24, "cpu")
    assert memory.loram_prepare_device(spec, cpu, "magnitude", host_available=need) == "cpu"


def _available(monkeypatch, gib):
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("VM", (), {"available": int(gib * 2**30)})())


def test_a_loram_run_that_cannot_prune_anywhere_stops_before_loading_with_the_figures(monkeypatch):
    import dataclasses

    from lowmem import trainer
    from lowmem.config import LoramConfig, RunConfig
    from lowmem.errors import ModelError

    # Taylor with alignment needs the dense 70B model and its gradients: 531 GiB.
    config = RunConfig(method="loram", model="llama-3.1-70b", loram=LoramConfig(criterion="taylor", align_steps=10))
    plan = _loram_plan(24)
    _available(monkeypatch, 64)
    with pytest.raises(ModelError) as e:
        trainer.loram_preparation(config, plan, out=lambda m: None)
    message = str(e.value)
    assert "llama-3.1-70b" in message and "taylor scoring and alignment need" in message and "22.80GiB" in message
    assert "64.00GiB" in message and "without loram.align_steps, taylor scores one dense block at a time" in message
    # Without alignment Taylor scores block by block; it still needs its block, the embeddings and the
    # head somewhere: with 8 GiB of GPU and 1 GiB of RAM, nowhere.
    config = dataclasses.replace(config, loram=dataclasses.replace(config.loram, align_steps=0))
    _available(monkeypatch, 1)
    with pytest.raises(ModelError, match=r"taylor scores computed one dense block at a time need 10\.63GiB and "
                                         r"4\.43GiB of host RAM besides: more than the GPU budget \(7\.60GiB\), and "
                                         r"on the host more than .*\(1\.00GiB\); loram.criterion=magnitude needs no "
                                         r"scoring"):
        trainer.loram_preparation(config, _loram_plan(8), out=lambda m: None)
    # The GPU holds the scoring, but the blocks' inputs kept on the host do not fit its RAM.
    with pytest.raises(ModelError, match=r"need 10\.63GiB and 4\.43GiB of host RAM besides: the GPU budget holds "
                                         r"the first, but the second is more than this machine's available RAM "
                                         r"\(1\.00GiB\)"):
        trainer.loram_preparation(config, plan, out=lambda m: None)
    config = dataclasses.replace(config, loram=dataclasses.replace(config.loram, criterion="magnitude",
                                                                   align_steps=10))
    # Magnitude with alignment: the dense model (131.8 GiB), then AdamW on the pruned blocks (more).
    _available(monkeypatch, 200)
    with pytest.raises(ModelError, match=r"magnitude scoring and alignment need.*without loram.align_steps, "
                                         r"magnitude pruning happens while loading"):
        trainer.loram_preparation(config, plan, out=lambda m: None)
    _available(monkeypatch, 400)
    said = []
    resolved, prep = trainer.loram_preparation(config, plan, out=said.append)
    assert (prep.where, prep.streamed, resolved.loram.criterion) == ("cpu", False, "magnitude")
    assert "pruning on the host" in said[0]
    assert trainer.loram_preparation(config, _loram_plan(24, "cpu"))[1].where == "cpu"


def test_taylor_scoring_goes_to_the_host_when_the_gpu_budget_is_too_small(monkeypatch):
    from lowmem import trainer
    from lowmem.config import LoramConfig, RunConfig

    config = RunConfig(method="loram", model="llama-3.1-70b", loram=LoramConfig(criterion="taylor"))
    _available(monkeypatch, 64)
    resolved, prep = trainer.loram_preparation(config, _loram_plan(24), out=lambda m: None)
    assert (prep.where, prep.streamed, round(prep.bytes / 2**30, 2)) == ("cuda", True, 10.63)
    said = []
    resolved, prep = trainer.loram_preparation(config, _loram_plan(8), out=said.append)
    assert (prep.where, prep.streamed) == ("cpu", True)
    assert said == ["LoRAM: taylor scores computed one dense block at a time need 10.59GiB, more than the GPU "
                    "budget; scoring on the host (64.00GiB RAM available), then loading the pruned weights "
                    "onto the GPU"]


def test_quantizing_onto_a_device_moves_each_weight_first():
    """QLoRAM after pruning on the host: each linear goes to the device and is quantized there."""
    from lowmem.quant.nf4 import NF4Linear, quantize_linears

    model = tiny_llama(hidden=64, intermediate=128)
    reference = copy.deepcopy(model)
    names = quantize_linears(model, ("q_proj", "down_proj"), torch.float32, device="cpu")
    quantize_linears(reference, ("q_proj", "down_proj"), torch.float32)
    assert names and all(isinstance(model.get_submodule(n), NF4Linear) for n in names)
    for n in names:
        assert torch.equal(model.get_submodule(n).weight, reference.get_submodule(n).weight)


def test_pruning_while_loading_a_sharded_checkpoint_holds_one_block_at_a_time(tmp_path):
    """Small shards split blocks across files and list them out of order; read in name order,
    every block's tensors still arrive together, and the result equals pruning the loaded model."""
    from lowmem.prune import load_pruned_model
    from lowmem.quant.skeleton import read_tensors, shard_files

    model = tiny_llama(hidden=64, intermediate=96, layers=12, heads=4, kv_heads=2)
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    files = shard_files(tmp_path)
    assert len(files) > 3
    blocks = [int(k.split(".")[2]) for k, _ in read_tensors(files, in_name_order=True) if ".layers." in k]
    assert blocks == sorted(blocks)                     # block 2 before block 10, each block contiguous
    streamed = load_pruned_model(tmp_path, "cpu", torch.float32, 0.5)
    whole = copy.deepcopy(model)
    index_map = prune(whole, 0.5, criterion="magnitude")
    assert streamed.loram_index_map == index_map
    x = torch.randint(0, 512, (1, 9))
    torch.testing.assert_close(streamed(x).logits, whole.eval()(x).logits, rtol=0, atol=0)


def _qwen2(layers=4):
    """Qwen2 blocks: q/k/v biases, and a mask chosen per block by its attention type."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=512, hidden_size=48, num_hidden_layers=layers,
                                        num_attention_heads=6, num_key_value_heads=3, intermediate_size=96,
                                        tie_word_embeddings=False, attn_implementation="sdpa")).eval()


@pytest.mark.parametrize("build", [lambda: _model(layers=5), _qwen2], ids=["llama", "qwen2"])
def test_taylor_scores_block_by_block_equal_the_whole_models(tmp_path, build):
    """Forward block by block keeping each block's input, then backward from the last block
    re-running each on its input: the same fp32 scores, bit for bit, as one backward through
    the loaded model; with a padded batch and blocks split across shards."""
    from lowmem.prune import taylor_index_map_streamed, taylor_scores_streamed

    model = build()
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    batches = _batches(3)
    batches[1]["attention_mask"][0, 8:] = 0
    batches[1]["labels"] = batches[1]["labels"].clone()
    batches[1]["labels"][0, 8:] = -100
    whole = importance(model, "taylor", batches)
    streamed = taylor_scores_streamed(tmp_path, batches, "cpu", torch.float32)
    for i, (w, s) in enumerate(zip(whole, streamed)):
        for unit in w:
            assert torch.equal(w[unit], s[unit]), (i, unit)
    only = taylor_scores_streamed(tmp_path, batches, "cpu", torch.float32, score=[2, 3])
    assert [s is None for s in only] == [True, True, False, False] + [True] * (len(only) - 4)
    assert all(torch.equal(only[i][u], whole[i][u]) for i in (2, 3) for u in whole[i])
    index_map = taylor_index_map_streamed(tmp_path, batches, 0.5, device="cpu", dtype=torch.float32)
    assert index_map == prune(copy.deepcopy(model), 0.5, criterion="taylor", batches=batches)
    assert index_map.criterion == "taylor"


def test_taylor_scoring_from_files_that_lack_a_block_tensor_names_it(tmp_path):
    from safetensors.torch import load_file, save_file

    from lowmem.errors import ModelError
    from lowmem.prune import taylor_index_map_streamed

    _model(layers=3).save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"the model files lack block 1's mlp.up_proj.weight"):
        taylor_index_map_streamed(tmp_path, _batches(1), 0.5, device="cpu", dtype=torch.float32)


def _scoring_case(folder, device: str, chunk: int, seq: int = 256, micro_batch: int = 2, batches: int = 4,
                  dtype: torch.dtype = torch.float32):
    """(spec, plan, calibration batches) for scoring a 4-block model of SmolLM2-135M's shapes,
    saved with random weights in `folder` in `dtype`, on `device`."""
    from lowmem.config import load_config
    from lowmem.measure import random_model, with_layers
    from lowmem.planner import make_plan
    from lowmem.spec import builtin_spec

    spec = with_layers(builtin_spec("smollm2-135m"), 4)
    overrides = ["model=smollm2-135m", f"device={device}", "method=loram", f"seq_len={seq}",
                 f"micro_batch={micro_batch}", f"loss_chunk={chunk}"]
    plan = make_plan(load_config(overrides=overrides), spec, pinned={"method", "seq_len", "micro_batch",
                                                                      "loss_chunk"}, device=device)
    if not (folder / "config.json").is_file():
        lora = make_plan(load_config(overrides=["device=cpu", "method=lora"]), spec, device="cpu")
        random_model(spec, lora, "cpu").to(dtype).save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, spec.vocab, (micro_batch, seq), generator=g) for _ in range(batches)]
    return spec, plan, [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]


@pytest.mark.parametrize("chunk, dtype", [(0, torch.float32), (128, torch.float32), (0, torch.bfloat16)])
def test_taylor_scoring_block_by_block_stays_within_its_predicted_memory(tmp_path, chunk, dtype):
    """The peak of live tensors (lowmem.measure.LiveTensorBytes) while scoring, whole and chunked
    loss, fp32 and bf16 weights (whose fp32 gradient sums and scores must not copy whole
    weights), against memory.loram_taylor_stream_bytes (device and host are both the CPU
    here): never under it, at most 15% over."""
    import dataclasses

    from lowmem import memory
    from lowmem.measure import LiveTensorBytes
    from lowmem.prune import taylor_scores_streamed

    if dtype == torch.bfloat16:   # bf16 matmuls are slow on this CPU: a shorter case
        spec, plan, batches = _scoring_case(tmp_path, "cpu", chunk, seq=32, micro_batch=1, batches=2, dtype=dtype)
        plan = dataclasses.replace(plan, compute_dtype="bfloat16")
    else:
        spec, plan, batches = _scoring_case(tmp_path, "cpu", chunk)
    device, host = memory.loram_taylor_stream_bytes(spec, plan, len(batches))
    with LiveTensorBytes("cpu") as live:
        taylor_scores_streamed(tmp_path, batches, "cpu", dtype, range(1, 4), loss_chunk=chunk)
    assert live.growth <= device + host <= 1.15 * live.growth, (live.growth, device + host)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [0, 128])
def test_on_cuda_taylor_scoring_block_by_block_stays_within_its_predicted_memory(tmp_path, chunk):
    """The same on the GPU in bf16: torch.cuda.max_memory_allocated above what was allocated
    before, against the device part of the prediction (the blocks' inputs wait on the host),
    less cuBLAS's workspace, allocated before the window."""
    from lowmem import memory
    from lowmem.prune import taylor_scores_streamed

    spec, plan, batches = _scoring_case(tmp_path, "cuda", chunk, dtype=torch.bfloat16)
    device, _ = memory.loram_taylor_stream_bytes(spec, plan, len(batches))
    # cuBLAS's workspace, which the prediction counts, exists before the window whatever ran
    # before: on this thread and on autograd's, where the backward passes run.
    from lowmem.kernels.device import load_cublas

    load_cublas(torch.cuda.current_device())
    device -= memory.CUBLAS_WORKSPACE_BYTES
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    scores = taylor_scores_streamed(tmp_path, batches, "cuda", torch.bfloat16, range(1, 4), loss_chunk=chunk)
    measured = torch.cuda.max_memory_allocated() - start
    assert all(torch.isfinite(s["channel"]).all() for s in scores[1:])
    assert measured <= device <= 1.15 * measured, (measured, device)


def test_magnitude_scores_of_bf16_weights_are_summed_in_fp32():
    """bf16 sums of thousands of |w| round to a handful of values and tie; the scores must not."""
    from lowmem.prune import _unit_scores

    model = tiny_llama(hidden=64, intermediate=4096, layers=1, heads=4, kv_heads=2).to(torch.bfloat16)
    block = model.model.layers[0]
    scores = _unit_scores(block, lambda lin: lin.weight.abs(), 4, 2, 16)
    mlp = block.mlp
    want = (mlp.gate_proj.weight.float().abs().sum(1) + mlp.up_proj.weight.float().abs().sum(1)
            + mlp.down_proj.weight.float().abs().sum(0))
    assert scores["channel"].dtype == torch.float32
    torch.testing.assert_close(scores["channel"], want, rtol=1e-6, atol=0)
    assert scores["channel"].unique().numel() > 4000


def test_pruning_while_loading_quantizes_a_targeted_head_like_the_whole_path(tmp_path):
    from lowmem.prune import load_pruned_model
    from lowmem.quant.nf4 import NF4Linear, quantize_linears

    model = tiny_llama(hidden=64, intermediate=96, layers=3, heads=4, kv_heads=2)
    model.config.tie_word_embeddings = False                 # a head of its own, as large models have
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.save_pretrained(tmp_path)
    targets = ("q_proj", "lm_head")
    streamed = load_pruned_model(tmp_path, "cpu", torch.float32, 0.5, nf4_targets=targets)
    whole = copy.deepcopy(model)
    prune(whole, 0.5, criterion="magnitude")
    quantize_linears(whole, targets, torch.float32)
    assert isinstance(streamed.lm_head, NF4Linear) and isinstance(streamed.model.layers[1].self_attn.q_proj, NF4Linear)
    x = torch.randint(0, 512, (1, 6))
    torch.testing.assert_close(streamed(x).logits, whole.eval()(x).logits)
    only_head = load_pruned_model(tmp_path, "cpu", torch.float32, 0.5, nf4_targets=("lm_head",))
    assert isinstance(only_head.lm_head, NF4Linear)


def test_auto_criterion_is_taylor_where_it_fits_and_magnitude_while_loading_elsewhere(monkeypatch):
    """loram.criterion=auto (the default): taylor when its scoring fits the GPU budget or the
    host's RAM (block by block without alignment, the dense model with it); magnitude, pruned
    while loading, when it does not."""
    import dataclasses

    from lowmem import trainer
    from lowmem.config import RunConfig
    from lowmem.loram import resolve_criterion, streams
    from lowmem.spec import builtin_spec

    config = RunConfig(method="loram", model="llama-3.1-70b")
    assert config.loram.criterion == "auto"
    plan = _loram_plan(24)
    spec = builtin_spec("llama-3.1-70b")
    assert resolve_criterion(config, plan, spec, host_available=64 * 2**30) == (
        "taylor", "auto: its block-by-block scoring fits")
    aligned = dataclasses.replace(config, loram=dataclasses.replace(config.loram, align_steps=10))
    criterion, why = resolve_criterion(aligned, plan, spec, host_available=64 * 2**30)
    assert criterion == "magnitude" and "taylor scoring would need 531.20GiB" in why
    assert resolve_criterion(aligned, plan, spec, host_available=2**50) == (
        "taylor", "auto: the dense model and its scoring fit")
    criterion, why = resolve_criterion(config, _loram_plan(8), spec, host_available=2**30)
    assert criterion == "magnitude" and why == ("auto: taylor scoring would need 10.63GiB and 4.43GiB of host RAM, "
                                                "more than fits here")
    taylor = dataclasses.replace(config, loram=dataclasses.replace(config.loram, criterion="taylor"))
    assert resolve_criterion(taylor, plan, spec, host_available=0) == ("taylor", "set")
    said = []
    _available(monkeypatch, 1)
    resolved, prep = trainer.loram_preparation(config, _loram_plan(8), out=said.append)
    assert resolved.loram.criterion == "magnitude" and streams(resolved) and prep.streamed
    assert (prep.where, prep.bytes) == ("cuda", prep.stream_bytes)
    assert said == [f"LoRAM: pruning by magnitude ({why})"]
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        from lowmem import memory
        memory.loram_prepare_bytes(spec, plan, "auto")


@pytest.mark.parametrize("damage", ["missing", "malformed"])
def test_a_resume_without_a_readable_index_map_names_the_file(tmp_path, damage):
    from lowmem.config import RunConfig
    from lowmem.errors import CheckpointError
    from lowmem.loram import load_streamed_loram

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if damage == "malformed":
        (run_dir / INDEX_MAP_FILE).write_text("{bad")
    with pytest.raises(CheckpointError, match=rf"{INDEX_MAP_FILE}: cannot read this LoRAM run's index map"
                                              r".*start a new run"):
        load_streamed_loram(tmp_path, plan=None, config=RunConfig(method="loram"), device="cpu", dtype=torch.float32,
                            run_dir=run_dir, resume=True)
