"""The ``auto`` selection rule on hand-made candidate rows: the fastest passing policy; within 5% timing
noise of it, the more accurate, then the less quantized; fp32 when the accuracy budget rejects the rest."""
from __future__ import annotations

from mmopt.precision.search import NOISE, _choose


def row(policy: dict[str, str], ms: float, parity: bool = True, acc: float | None = None,
        acc_ok: bool = True) -> dict:
    r = {"label": " ".join(f"{c}={p}" for c, p in policy.items()), "policy": policy, "latency_ms": ms,
         "parity_ok": parity, "accuracy_ok": acc_ok}
    if acc is not None:
        r["accuracy"] = acc
    return r


AUTOS = ["image", "text"]


def test_the_fastest_passing_policy_wins():
    rows = [row({"image": "fp32", "text": "fp32"}, 10.0), row({"image": "int8-cpu", "text": "fp32"}, 6.0),
            row({"image": "int8-cpu", "text": "int8-dynamic"}, 4.0, parity=False),  # fastest, but fails parity
            row({"image": "fp32", "text": "int8-dynamic"}, 8.0)]
    best, why = _choose(rows, AUTOS)
    assert best["policy"] == {"image": "int8-cpu", "text": "fp32"}
    assert why == "the fastest passing candidate (6 ms); 3 of 4 candidates pass parity"


def test_within_timing_noise_the_more_accurate_then_the_less_quantized_wins():
    fast = row({"image": "int8-cpu", "text": "int8-dynamic"}, 5.0, acc=0.90)
    near = row({"image": "int8-cpu", "text": "fp32"}, 5.0 * (1 + NOISE * 0.9), acc=0.93)  # inside the noise
    far = row({"image": "fp32", "text": "fp32"}, 5.0 * (1 + NOISE * 1.5), acc=0.99)  # outside it
    best, why = _choose([fast, near, far], AUTOS)
    assert best is near
    assert why == ("2 passing candidates are within 5% of the fastest (5 ms), which is timing noise here, so the "
                   "most accurate of them; 3 of 3 candidates pass parity and the accuracy budget")
    tie_a = row({"image": "int8-cpu", "text": "int8-dynamic"}, 5.0, acc=0.95)
    tie_b = row({"image": "int8-cpu", "text": "fp32"}, 5.0, acc=0.95)
    best, why = _choose([tie_a, tie_b], AUTOS)
    assert best is tie_b  # same speed and accuracy: the less quantized
    assert "so the least quantized of the 2 most accurate; " in why
    untimed = [row({"image": "int8-cpu", "text": "fp32"}, 5.0), row({"image": "fp32", "text": "fp32"}, 5.1)]
    assert _choose(untimed, AUTOS)[1].endswith("so the least quantized of them; 2 of 2 candidates pass parity")


def test_the_accuracy_budget_can_send_every_auto_component_back_to_fp32():
    rows = [row({"image": "int8-cpu", "text": "int8-dynamic"}, 3.0, acc_ok=False),
            row({"image": "fp32", "text": "fp32"}, 9.0, acc_ok=False),  # even fp32 is over budget: the fixed part
            row({"image": "int8-cpu", "text": "fp32"}, 4.0, parity=False)]
    best, why = _choose(rows, AUTOS)
    assert best["policy"] == {"image": "fp32", "text": "fp32"}
    assert why == "no candidate passes parity and the accuracy budget: the auto components stay fp32"
