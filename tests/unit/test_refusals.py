"""refusals: how 1008 closes are read, fed the facts of each ended connection (no clock, no I/O)."""

from __future__ import annotations

from bridge.refusals import PolicyCause, PolicyRefusals

HOUR = 3600.0


def test_a_quick_1008_on_a_token_issued_after_a_refusal_blames_a_contract() -> None:
    refusals = PolicyRefusals(window=3.0)
    assert refusals.on_policy_close("t1", seconds_open=0.05, received=False) is PolicyCause.AUTH
    assert refusals.on_policy_close("t2", seconds_open=0.05, received=False) is PolicyCause.CONTRACT


def test_two_token_expiries_six_hours_apart_blame_nothing() -> None:
    refusals = PolicyRefusals(window=3.0)
    assert refusals.on_policy_close("t1", seconds_open=6 * HOUR, received=True) is PolicyCause.AUTH
    assert refusals.on_policy_close("t2", seconds_open=6 * HOUR, received=True) is PolicyCause.AUTH
    # Even a quiet connection (no frame outside trading hours) that stayed up past the window was accepted.
    assert refusals.on_policy_close("t3", seconds_open=6 * HOUR, received=False) is PolicyCause.AUTH


def test_the_same_token_refused_again_is_not_a_contracts_fault() -> None:
    refusals = PolicyRefusals(window=3.0)
    for _ in range(3):
        assert refusals.on_policy_close("static", seconds_open=0.05, received=False) is PolicyCause.AUTH


def test_a_healthy_connection_in_between_clears_the_suspicion() -> None:
    refusals = PolicyRefusals(window=3.0)
    assert refusals.on_policy_close("t1", seconds_open=0.05, received=False) is PolicyCause.AUTH
    refusals.on_other_end(seconds_open=2 * HOUR, received=True)  # t2 worked for hours, then the network dropped
    assert refusals.on_policy_close("t2", seconds_open=0.05, received=False) is PolicyCause.AUTH


def test_a_quick_unhealthy_end_keeps_the_suspicion() -> None:
    refusals = PolicyRefusals(window=3.0)
    refusals.on_policy_close("t1", seconds_open=0.05, received=False)
    refusals.on_other_end(seconds_open=0.5, received=False)  # a reset during the handshake proves nothing
    assert refusals.on_policy_close("t2", seconds_open=0.05, received=False) is PolicyCause.CONTRACT
