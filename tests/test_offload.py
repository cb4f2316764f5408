"""Activation offloading: the hooks run, the byte accounting is right, gradients do not change."""

import copy

import pytest
import torch

from lowmem.loss import causal_lm_loss
from lowmem.model import checkpointing as enable_checkpointing, tiny_llama
from lowmem.offload import OffloadActivations, activation_offloading

LAYERS, ROWS, LENGTH, HIDDEN = 3, 2, 16, 64


@pytest.fixture(scope="module")
def base_model():
    model = tiny_llama(vocab_size=256, hidden=HIDDEN, layers=LAYERS, heads=4, kv_heads=2, intermediate=128, seed=2)
    model.config.use_cache = False
    return model


def gradients(model, offload=None, checkpointing=False):
    model = copy.deepcopy(model)
    if checkpointing:
        enable_checkpointing(model)
    model.train()
    ids = torch.randint(0, 256, (ROWS, LENGTH), generator=torch.Generator().manual_seed(0))
    with offload if offload is not None else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        hidden = model.model(input_ids=ids).last_hidden_state
    causal_lm_loss(hidden, model.lm_head.weight, ids).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_gradients_are_identical_with_and_without_offloading(base_model):
    offload = OffloadActivations(min_bytes=1024)
    assert_identical(gradients(base_model), gradients(base_model, offload))
    stats = offload.stats
    assert stats.offloaded_bytes > 0 and stats.returned_bytes == stats.offloaded_bytes
    assert stats.host_bytes == 0 and stats.peak_host_bytes == stats.offloaded_bytes
    assert stats.parameter_saves > 0      # the weights the linears save stay where they are
    assert not offload._entries and not offload._order


def test_with_checkpointing_only_layer_inputs_travel(base_model):
    offload = OffloadActivations(min_bytes=1024)
    assert_identical(gradients(base_model, checkpointing=True),
                     gradients(base_model, offload, checkpointing=True))
    one_hidden = ROWS * LENGTH * HIDDEN * 4
    # each block's input, then the final norm's input and output (outside the blocks)
    assert offload.stats.sizes == [one_hidden] * (LAYERS + 2)
    without = OffloadActivations(min_bytes=1024)
    gradients(base_model, without)
    assert without.stats.offloaded_bytes > 10 * offload.stats.offloaded_bytes


def test_parameters_and_their_views_are_never_offloaded():
    weight = torch.nn.Parameter(torch.randn(32, 32))
    x = torch.randn(8, 32, requires_grad=True)
    offload = OffloadActivations(min_bytes=0)
    with offload:
        y = torch.nn.functional.linear(x, weight)        # saves x and Wᵀ (a view of W)
        z = (weight * 2).sum() + y.sum()                # saves nothing of W: mul by a number
        w = (x @ weight).sum()                          # saves x (again) and W itself
    (z + w).backward()
    assert offload.stats.parameter_saves == 2
    assert offload.stats.offloaded_bytes == x.numel() * 4 and offload.stats.offloaded_tensors == 1
    assert offload.stats.shared_saves == 1              # x saved twice, copied once


def test_small_tensors_stay_in_place():
    x = torch.randn(4, 4, requires_grad=True)            # 64 bytes
    offload = OffloadActivations(min_bytes=1024)
    with offload:
        y = torch.sin(x).sum()
    y.backward()
    assert offload.stats.offloaded_bytes == 0 and offload.stats.kept_bytes == 64


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_backward_prefetches_the_next_tensors_while_one_is_in_use(prefetch):
    x = torch.randn(256, requires_grad=True)             # 1 KiB each
    offload = OffloadActivations(min_bytes=1024, prefetch=prefetch)
    with offload:
        t1 = torch.sin(x)                                # sin saves its input: x, t1, t2, t3
        t2 = torch.sin(t1)
        t3 = torch.sin(t2)
        out = torch.sin(t3).sum()
    returned_when_t3_is_in_use = []
    t3.register_hook(lambda g: returned_when_t3_is_in_use.append(offload.stats.returned_bytes))
    out.backward()
    # sin(t3)'s backward unpacked t3; t2, t1 (and x) are on their way, `prefetch` of them
    assert returned_when_t3_is_in_use == [1024 * (1 + prefetch)]
    assert offload.stats.returned_bytes == 4 * 1024


def test_a_second_backward_through_offloaded_tensors_is_refused():
    x = torch.randn(512, requires_grad=True)
    with OffloadActivations(min_bytes=1024):
        y = torch.sin(x).sum()
    y.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        y.backward()


def test_disabled_offloading_is_a_plain_context():
    with activation_offloading(False) as nothing:
        assert nothing is None
    assert isinstance(activation_offloading(True, min_bytes=1), OffloadActivations)


@pytest.mark.gpu
def test_on_cuda_offloading_lowers_peak_memory_and_keeps_gradients(base_model):
    model = copy.deepcopy(base_model).cuda()
    enable_checkpointing(model)
    ids = torch.randint(0, 256, (8, 1024), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def run(offload):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        # The math kernel: the memory-efficient one's backward need not repeat itself bit for bit.
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            with offload:
                hidden = model.model(input_ids=ids).last_hidden_state
            forward_peak = torch.cuda.max_memory_allocated() - start
            causal_lm_loss(hidden, model.lm_head.weight, ids).backward()
        torch.cuda.synchronize()
        return forward_peak, {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_peak, plain = run(torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t))
    offload = OffloadActivations(min_bytes=1024)
    offload_peak, offloaded = run(offload)
    assert_identical(plain, offloaded)
    assert offload.stats.offloaded_bytes > 0
    assert offload_peak < plain_peak


def test_views_of_one_storage_travel_once_and_come_back_as_the_same_views():
    x = torch.randn(6, 8, requires_grad=True)
    offload = OffloadActivations(min_bytes=0)
    with offload:
        h = x * 2                                        # mul by a number saves nothing
        a = h.reshape(3, 16).sin()                       # saves a view of h's storage
        b = h.t().cos()                                  # ... another view of it
        c = h[:, 2:5].sin()                              # ... and a slice, at an offset
        out = a.sum() + b.sum() + c.sum()
    out.backward()
    h = h.detach()
    expected = 2 * (h.cos() - h.sin())
    expected[:, 2:5] += 2 * h[:, 2:5].cos()
    assert torch.allclose(x.grad, expected)
    assert offload.stats.sizes == [6 * 8 * 4] and offload.stats.shared_saves == 2


def test_a_storage_written_in_place_after_its_save_is_copied_again():
    # The first copy was taken for the storage as it was; reusing it for the second
    # save would hand backward what was there before the write. (On the CPU nothing
    # is copied, so only the decision shows.)
    x = torch.randn(64, requires_grad=True)
    offload = OffloadActivations(min_bytes=0)
    with offload:
        h = x * 1
        h.sin()                    # saves h
        h.mul_(3)                  # a new version of the storage
        h.view(8, 8).sin()         # saves a view of the new h
    assert offload.stats.offloaded_tensors == 2 and offload.stats.shared_saves == 0


def test_a_slice_of_a_large_storage_travels_alone():
    w = torch.randn(10, requires_grad=True)
    big = torch.randn(1000)
    offload = OffloadActivations(min_bytes=0)
    with offload:
        y = (w * big[10:20]).sum()                       # mul saves the slice for w's gradient
    y.backward()
    assert torch.equal(w.grad, big[10:20]) and offload.stats.sizes == [10 * 4]


def test_a_view_whose_storage_ends_between_its_elements_comes_back():
    """Four bf16 of a five-element storage seen as two float32: the storage's 10 bytes are no
    whole number of float32s, the 8 bytes the view reads are."""
    w = torch.randn(2, requires_grad=True)
    v = torch.randn(5, dtype=torch.bfloat16)[:4].view(torch.float32)
    offload = OffloadActivations(min_bytes=0)
    with offload:
        y = (w * v).sum()
    y.backward()
    assert torch.equal(w.grad, v) and offload.stats.sizes == [8]


def test_a_new_storage_at_a_freed_address_is_not_taken_for_the_old_one():
    """t1's storage moves (resize_) and a new tensor lands where it was: a different storage,
    which must get its own copy (by address alone it would share t1's and get t1's values)."""
    torch.manual_seed(0)
    for _ in range(200):
        w = torch.randn(4096, requires_grad=True)
        offload = OffloadActivations(min_bytes=0)
        with offload:
            t1 = torch.randn(4096)
            first = t1.clone()
            y1 = (t1 * w).sum()
            old = t1.data_ptr()
            t1.resize_(1 << 20)
            t2 = torch.randn(4096)
            y2 = (t2 * w).sum()
        if t2.data_ptr() == old:
            (y1 + y2).backward()
            assert offload.stats.shared_saves == 0 and torch.allclose(w.grad, first + t2)
            return
    pytest.skip("the allocator never put a new tensor at the freed address")


def test_a_forward_never_backpropagated_leaves_nothing_behind():
    x = torch.randn(64, 64, requires_grad=True)
    offload = OffloadActivations(min_bytes=0)
    with offload:
        y = (x * 2).sin().cos().sum()    # a forward whose graph is dropped (an error before backward)
    assert offload._entries
    del y
    assert not offload._entries and not offload._order and offload.stats.host_bytes == 0
    with offload:
        z = (x * 3).sin().cos().sum()
    z.backward()
    assert not offload._entries and torch.allclose(x.grad, -(3 * x).sin().sin() * (3 * x).cos() * 3)
