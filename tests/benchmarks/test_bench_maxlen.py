"""bench_maxlen.search against a fake card: doubling, bisection, the time budget, failures that stop it."""

from bench_maxlen import Attempt, predict_wall, search


def fake_card(max_tokens: int, step_s_per_k2: float = 0.0, load_s: float = 0.0, clock=None, fail=None):
    """try_len for a card where lengths up to `max_tokens` fit; steps cost step_s_per_k2 * (seq/1024)^2."""
    tried = []

    def try_len(seq: int, timeout: float) -> Attempt:
        tried.append(seq)
        step = step_s_per_k2 * (seq / 1024) ** 2
        if clock is not None:
            clock.t += load_s + step
        if fail and seq in fail:
            return Attempt(seq, fail[seq], load_s, detail="fake")
        if seq > max_tokens:
            return Attempt(seq, "oom", load_s, detail="OOM")
        return Attempt(seq, "fit", load_s + step, step, peak_gib=seq / 10_000)

    return try_len, tried


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_docstring_example_bisects_to_resolution():
    try_len, tried = fake_card(300_000)
    res = search(try_len, start=131_072, resolution=4096, limit=1 << 20, max_seconds=1e9)
    assert tried == [131_072, 262_144, 524_288, 393_216, 327_680, 294_912, 311_296, 303_104, 299_008]
    assert (res["max_fit"], res["first_fail"], res["resolved"]) == (299_008, 303_104, True)
    assert res["stopped"] is None
    assert res["peak_gib_at_fit"] == 299_008 / 10_000
    outcomes = [a["outcome"] for a in res["attempts"]]
    assert outcomes == ["fit", "fit", "oom", "oom", "oom", "fit", "oom", "oom", "fit"]


def test_start_that_fails_bisects_down_from_known_fit():
    try_len, tried = fake_card(200_000)
    res = search(try_len, start=262_144, resolution=16_384, limit=1 << 20, max_seconds=1e9, known_fit=131_072)
    assert tried[0] == 262_144 and 131_072 not in tried  # the known length is not re-run
    assert res["max_fit"] <= 200_000 < res["first_fail"] and res["first_fail"] - res["max_fit"] <= 16_384


def test_nothing_fits():
    try_len, _ = fake_card(1000)
    res = search(try_len, start=4096, resolution=4096, limit=1 << 20, max_seconds=1e9)
    assert (res["max_fit"], res["first_fail"], res["resolved"]) == (0, 4096, True)


def test_limit_reached_says_so():
    try_len, tried = fake_card(1 << 30)
    res = search(try_len, start=8192, resolution=4096, limit=32768, max_seconds=1e9)
    assert tried == [8192, 16384, 32768] and res["max_fit"] == 32768 and res["first_fail"] is None
    assert res["stopped"].startswith("limit")


def test_budget_stops_before_an_attempt_predicted_too_long():
    # 50 s per step at 131,072 tokens, 20 s of loading: 131,072 costs 70 s, 262,144 is predicted 220 s
    for budget, expect in ((300, [131_072, 262_144]), (250, [131_072])):
        clock = Clock()
        try_len, tried = fake_card(1 << 30, step_s_per_k2=50 / 128**2, load_s=20, clock=clock)
        res = search(try_len, start=131_072, resolution=4096, limit=1 << 22, max_seconds=budget, clock=clock)
        assert tried == expect, budget
        assert res["max_fit"] == expect[-1] and res["first_fail"] is None and not res["resolved"]
        assert res["stopped"].startswith("budget") and clock.t <= budget


def test_predict_wall_is_quadratic_in_length():
    a = Attempt(131_072, "fit", wall_s=70, step_s=50)
    assert predict_wall(a, 262_144) == 20 + 200
    assert predict_wall(None, 262_144) == 0


def test_timeout_or_crash_stops_the_search():
    for outcome in ("timeout", "error"):
        try_len, tried = fake_card(1 << 30, fail={262_144: outcome})
        res = search(try_len, start=131_072, resolution=4096, limit=1 << 22, max_seconds=1e9)
        assert tried == [131_072, 262_144]
        assert res["max_fit"] == 131_072 and res["first_fail"] is None and res["stopped"].startswith(outcome)


def test_worker_attempt_reads_bench_train_rows(monkeypatch):
    import argparse

    import bench_maxlen
    import bench_train

    answers = {1024: {"step_s": 2.0, "peak_gib": 5.0}, 2048: {"error": "OOM"},
               3072: {"error": "OOM (host: killed by signal 9)"}, 4096: {"error": "TIMEOUT after 60 s"},
               5120: {"error": "RuntimeError: boom"}}
    seen = {}

    def fake_run_one(stack, mode, batch, seq, run):
        seen[seq] = (stack, mode, batch, run.steps, run.warmup, run.timeout)
        return [dict(stack=stack, **answers[seq])]

    monkeypatch.setattr(bench_train, "run_one", fake_run_one)
    args = argparse.Namespace(shape="llama-2-7b", model_dir="/tmp/x", variant="offload", log_dir="/tmp",
                              attempt_timeout=300, mode="qlora")
    try_len = bench_maxlen.worker_attempt("unsloth", args)
    got = {seq: try_len(seq, 100.0) for seq in answers}
    assert {s: a.outcome for s, a in got.items()} == {1024: "fit", 2048: "oom", 3072: "oom", 4096: "timeout",
                                                      5120: "error"}
    assert got[1024].peak_gib == 5.0 and got[1024].step_s == 2.0
    assert seen[1024] == ("unsloth", "qlora", 1, 1, 0, 100)  # batch 1, one step, timeout capped by the budget
