"""The pinned arena that offloaded activations are cut from (`memory.pinned`), in plain host memory on the
CPU: its slices, its leases, when it grows, and the offloader over it."""

from __future__ import annotations

import pytest
import torch
from model_cases import loss_and_grads, make_fused_lora_model

from fasttune.memory import offload, pinned
from fasttune.memory.plan import ModelShape, pinned_copy_bytes, plan_memory

A = pinned.ALIGN


def offset(arena: pinned.PinnedArena, t: torch.Tensor) -> int:
    return t.data_ptr() - arena.block.data_ptr()


def test_a_lease_takes_consecutive_page_aligned_slices_and_the_next_forward_takes_them_again():
    arena = pinned.PinnedArena(pin=False)
    arena.reserve(3 * A)
    assert arena.capacity == 3 * A and arena.grows == 1
    lease = arena.lease()
    a, b = lease.take(10), lease.take(A + 1)
    assert a.numel() == 10 and b.numel() == A + 1
    assert (offset(arena, a), offset(arena, b)) == (0, A)
    assert lease.take(A) is None  # 3 pages are taken: the offloader pins this one on its own
    arena.end(lease)
    # the next forward grows the block to what this one asked for (4 pages), with the margin, and starts over
    again = arena.lease()
    assert arena.grows == 2 and arena.capacity == pinned.aligned(int(4 * A * pinned.GROW_MARGIN))
    assert offset(arena, again.take(10)) == 0


def test_a_forward_begun_while_another_is_live_takes_slices_after_it():
    arena = pinned.PinnedArena(pin=False)
    arena.reserve(8 * A)
    first = arena.lease()
    x = first.take(100)
    second = arena.lease()  # a second forward before the first one's backward
    y = second.take(100)
    assert offset(arena, y) == offset(arena, x) + A
    assert first.take(100) is None  # no longer the newest: its further copies would run into the second's
    x[:] = 1
    y[:] = 2
    assert bool((x == 1).all())
    arena.end(second)
    third = arena.lease()  # the first is still live
    assert offset(arena, third.take(100)) == A
    arena.end(first), arena.end(third)
    assert offset(arena, arena.lease().take(100)) == 0


def test_the_block_stays_within_the_host_rule(monkeypatch):
    monkeypatch.setattr(pinned, "host_bytes", lambda: 100 * A)
    arena = pinned.PinnedArena(pin=False)
    arena.reserve(1000 * A)
    assert arena.capacity == pinned.aligned(int(pinned.HOST_SHARE * 100 * A))  # the rest pins on its own


def test_a_copy_in_an_arena_slice_round_trips():
    arena = pinned.PinnedArena(pin=False)
    arena.reserve(A)
    t = torch.randn(3, 7).to(torch.bfloat16)[:, ::2]  # not contiguous
    host = offload.PinnedCopy.into(t, arena.lease().take(t.numel() * 2), non_blocking=False)
    back = torch.empty(t.shape, dtype=t.dtype)
    host.copy_into(back)
    assert torch.equal(back, t)


def _offloaders(monkeypatch) -> list:
    """The offloaders made from now on (held: their leases stay live until they are dropped)."""
    made, inner = [], offload.LayerInputOffloader.__init__

    def init(self, *args, **kwargs):
        inner(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(offload.LayerInputOffloader, "__init__", init)
    return made


def test_a_step_at_the_planned_shape_asks_the_arena_for_what_the_plan_reserves(monkeypatch):
    """What a step's offloader takes equals `pinned_copy_bytes` of its plan: x, x_mid, the kept attention
    output, log-sum-exp and q, k, v, and gate/up of the layers that keep them on the host."""
    made = _offloaders(monkeypatch)
    model = make_fused_lora_model()
    model.set_gradient_checkpointing("offload", keep_attention="reference", host_gate_up=1.0,
                                     device_gate_up=0)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    loss_and_grads(model, ids, ids)
    plan = plan_memory(ModelShape.of(model.config), model.model.checkpointing, tokens=18, span=9,
                       act_bytes=4, fused=True)
    # gate/up of all 3 layers on the host, but the last layer's tensors, all of them, stay on the device
    assert plan.keep_qkv and plan.count(gate_up="host") == 3 and plan.count(input="host") == 2
    assert made[-1].lease.asked == pinned_copy_bytes(plan, ModelShape.of(model.config), A) > 0


def test_two_forwards_before_their_backwards_keep_their_own_copies(monkeypatch):
    """Two offloaded forwards, then one backward through both: the second forward's copies go after the
    first's, so the gradients are those without checkpointing; once both are freed the next forward starts
    at the arena's beginning again."""
    made = _offloaders(monkeypatch)
    model = make_fused_lora_model()
    a = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    b = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))

    def both():
        model.zero_grad(set_to_none=True)
        (model(a, targets=a).loss_sum + model(b, targets=b).loss_sum).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = both()
    model.set_gradient_checkpointing("offload", keep_attention="reference")
    grads = both()
    assert made[1].lease.start == made[0].lease.end > 0
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], atol=1e-6, rtol=1e-5, msg=name)
    del made[:]  # freed at once (no collection needed): a training loop reuses the slices step after step
    arena = pinned.arena(torch.device("cpu"))
    assert arena.live == []
    loss_and_grads(model, a, a)
    assert made[-1].lease.start == 0


@pytest.mark.parametrize("room_pages", [0, 3])
def test_copies_past_the_arenas_room_are_pinned_on_their_own(monkeypatch, room_pages):
    """Where the arena has no room (the host rule leaves none, or the block is full), each copy that does not
    fit is a `PinnedCopy` of its own, with the same gradients."""
    monkeypatch.setattr(pinned, "_ARENAS", {})
    monkeypatch.setattr(pinned, "host_bytes", lambda: int(room_pages * A / pinned.HOST_SHARE) + 1)
    made = _offloaders(monkeypatch)
    model = make_fused_lora_model()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    ref_loss, ref_grads = loss_and_grads(model, ids, ids)
    model.set_gradient_checkpointing("offload", keep_attention="reference")
    loss_and_grads(model, ids, ids)
    del made[:]  # its lease ends: the next forward grows the arena to what it asked for, within the rule
    loss, grads = loss_and_grads(model, ids, ids)
    arena = pinned.arena(torch.device("cpu"))
    assert arena.capacity == room_pages * A
    in_arena = [h for h in made[-1].host if h is not None and h.pieces[0].untyped_storage().data_ptr()
                == arena.block.untyped_storage().data_ptr()]
    own = [h for h in made[-1].host if h is not None and h not in in_arena]
    assert own and (len(in_arena) > 0) == (room_pages > 0)
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=1e-6)  # the kept attention's fp32 reference
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_cuda_block_is_pinned_at_its_exact_size_and_copies_round_trip_in_device_order():
    """On CUDA the block is page-locked at exactly the asked size (torch's pinned allocator would round
    3 MiB + 1 page up to 4 MiB); a copy out and back through a slice, queued without waiting, is exact; a
    grown block is pinned too, after the device has finished with the old one."""
    arena = pinned.PinnedArena(pin=True)
    arena.reserve(3 * 2**20 + A)
    assert arena.block.is_pinned() and arena.capacity == 3 * 2**20 + A
    t = torch.randn(1000, 700, device="cuda").to(torch.bfloat16)
    lease = arena.lease()
    host = offload.PinnedCopy.into(t, lease.take(t.numel() * 2), non_blocking=True)
    back = torch.empty_like(t)
    host.copy_into(back)
    assert torch.equal(back, t)
    arena.end(lease)
    arena.reserve(8 * 2**20)
    assert arena.grows == 2 and arena.block.is_pinned() and arena.capacity == 8 * 2**20


def test_cuda_without_an_index_is_the_current_devices_arena(monkeypatch):
    """set_checkpointing is told 'cuda', tensors say 'cuda:0': both must reserve and take from one block."""
    monkeypatch.setattr(pinned, "_ARENAS", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert pinned.arena(torch.device("cuda")) is pinned.arena(torch.device("cuda", 0))
    assert pinned.arena(torch.device("cuda", 1)) is not pinned.arena(torch.device("cuda", 0))
