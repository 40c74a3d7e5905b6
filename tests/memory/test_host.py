"""The host rule: pinned bytes as the allocator rounds them, and what fits within 40% of host memory."""

from __future__ import annotations

from fasttune.memory import host


def test_pinned_host_memory_is_counted_as_the_allocator_rounds_it(monkeypatch):
    """torch's pinned allocator takes a power of two per allocation, so the offloader pins a tensor in
    power-of-two pieces down to 1 MiB and the rest in one: the host rule counts what that takes."""
    MiB = 1 << 20
    assert host.pinned_pieces(2560 * MiB) == [2048 * MiB, 512 * MiB]  # 327,680 x 4096 x 2 bytes
    assert host.pinned_pieces(896 * MiB) == [512 * MiB, 256 * MiB, 128 * MiB]  # g at 1 x 32,768
    assert host.pinned_pieces(3 * MiB + 5) == [2 * MiB, MiB, 5]
    assert host.pinned_pieces(0) == [] and host.pinned_pieces(65) == [65]
    assert [host.pinned_bytes(n) for n in (0, 1, 64, 65, 896 * MiB, 2560 * MiB, 3 * MiB + 5)] == \
        [0, 1, 64, 128, 896 * MiB, 2560 * MiB, 3 * MiB + 8]
    monkeypatch.setattr(host, "host_bytes", lambda: 1000)  # 400 bytes of pinned room
    assert host.halves_fit_host(layers=2, layer_input_bytes=64)  # 2 x 2 x 64 = 256
    assert not host.halves_fit_host(layers=2, layer_input_bytes=90)  # 2 x 2 x 128, not 2 x 2 x 90
    assert host.host_fits(1, 16, 1, 2 * 128, False) and not host.host_fits(1, 16, 1, 2 * 129)


def test_gate_up_layers_are_spread_evenly():
    assert host.spread(32, 8) == {2, 6, 10, 14, 18, 22, 26, 30}
    assert host.spread(5, 5) == set(range(5)) and host.spread(7, 0) == set()


def test_host_check_counts_the_kept_output(monkeypatch):
    monkeypatch.setattr(host, "host_bytes", lambda: 1000)  # 40% = 400 bytes of pinned room
    assert host.halves_fit_host(layers=3, layer_input_bytes=64)  # 3 x 2 x 64 = 384
    assert not host.halves_fit_host(layers=3, layer_input_bytes=64, kept_attention=True)  # 576
