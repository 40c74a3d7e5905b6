"""peak_report: replaying an allocator trace finds the moment of the most allocated bytes and what was live
then, grouped by allocation site (our frames, not torch's)."""

import peak_report as pr


def frames(name, line=1, filename="/x/site-packages/fasttune/models/llama.py"):
    return [{"filename": "/x/torch/nn/functional.py", "line": 9, "name": "linear"},
            {"filename": filename, "line": line, "name": name}]


def test_the_peak_is_the_most_bytes_live_and_names_their_sites():
    events = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": frames("forward", 10)},
        {"action": "alloc", "addr": 2, "size": 300, "frames": frames("loss", 20)},
        {"action": "free_requested", "addr": 2, "size": 300},
        {"action": "free_completed", "addr": 2, "size": 300},  # counted once, at the request
        {"action": "alloc", "addr": 3, "size": 250, "frames": frames("backward", 30)},
        {"action": "alloc", "addr": 4, "size": 50, "frames": frames("backward", 30)},  # same site: summed
        {"action": "free_requested", "addr": 1, "size": 100},
        {"action": "segment_alloc", "addr": 9, "size": 10_000},  # the allocator's segments are not tensors
        {"action": "alloc", "addr": 5, "size": 10, "frames": frames("tail", 40)},
    ]
    peak = pr.live_at_peak(events, before=1000)
    # 1000 + 100 + 300 = 1400 first; 1000 + 100 + 250 + 50 = 1400 again (not above); the first is kept
    assert peak.bytes == 1400 and peak.before == 1000
    assert peak.live == [(300, "llama.py:20 loss"), (100, "llama.py:10 forward")]
    events.append({"action": "alloc", "addr": 6, "size": 200, "frames": frames("late", 50)})
    later = pr.live_at_peak(events, before=1000)
    assert later.bytes == 1000 + 250 + 50 + 10 + 200
    assert later.live[0] == (300, "llama.py:30 backward")
    text = pr.format_peak(later, top=2)
    assert text.startswith("peak ") and "(1 other site)" in text and "llama.py:40 tail" not in text


def test_a_site_without_our_frames_names_the_innermost_frame():
    assert pr.site([{"filename": "/t/torch/a.py", "line": 3, "name": "f"}]) == "a.py:3 f"
    assert pr.site([]) == "(no frames)"
