"""Routing pieces on their own: filters, scorers (power of two, prefix/session affinity), picker,
outlier ejection with half-open recovery, and the retry budget."""

from __future__ import annotations

import random

from gateway.registry.schema import Backend, Engine, Role
from gateway.routing.budget import RetryBudget
from gateway.routing.fleet import Fleet, OutlierPolicy
from gateway.routing.picker import RoutingHints, RoutingPolicy, backends_in_try_order, rank


def backend(name: str, role: Role = Role.PRIMARY, max_concurrency: int | None = None) -> Backend:
    return Backend(id=name, engine=Engine.VLLM, engine_version="0.32.0", url=f"http://{name}:8000", role=role,
                   max_concurrency=max_concurrency)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_fallbacks_come_only_after_every_primary() -> None:
    fleet = Fleet()
    order = backends_in_try_order([backend("cpu", Role.FALLBACK), backend("g1"), backend("g2")], fleet)
    assert [b.id for b in order][-1] == "cpu" and {b.id for b in order[:2]} == {"g1", "g2"}


def test_unhealthy_ejected_and_full_backends_are_filtered() -> None:
    fleet = Fleet()
    fleet.state("sick").healthy = False
    for _ in range(3):
        fleet.started("flaky")
        fleet.finished("flaky", ok=False)
    fleet.started("full")
    order = backends_in_try_order([backend("sick"), backend("flaky"), backend("full", max_concurrency=1),
                                   backend("ok")], fleet)
    assert [b.id for b in order] == ["ok"]


def test_every_backend_failing_probes_means_try_them_anyway() -> None:
    fleet = Fleet()
    fleet.state("a").healthy = fleet.state("b").healthy = False
    assert {b.id for b in backends_in_try_order([backend("a"), backend("b")], fleet)} == {"a", "b"}


def test_power_of_two_choices_prefers_the_less_loaded() -> None:
    fleet = Fleet()
    for _ in range(5):
        fleet.started("busy")
    picks = [rank([backend("busy"), backend("idle")], fleet, RoutingHints(), RoutingPolicy(),
                  random.Random(seed))[0].id for seed in range(20)]
    assert set(picks) == {"idle"}


def test_prefix_affinity_sticks_and_yields_to_load() -> None:
    fleet = Fleet()
    candidates = [backend(f"r{i}") for i in range(4)]
    policy = RoutingPolicy(prefix_affinity=True, affinity_load_factor=2.0)
    hints = RoutingHints(prompt_prefix="You are a helpful assistant. Summarise:")
    first = {rank(candidates, fleet, hints, policy, random.Random(seed))[0].id for seed in range(20)}
    assert len(first) == 1  # the same warm prefix cache every time
    warm = first.pop()
    for _ in range(6):
        fleet.started(warm)
    assert rank(candidates, fleet, hints, policy, random.Random(1))[0].id != warm


def test_session_affinity_follows_the_user_field() -> None:
    fleet = Fleet()
    candidates = [backend(f"r{i}") for i in range(4)]
    policy = RoutingPolicy(session_affinity=True)
    alice = {rank(candidates, fleet, RoutingHints(session="alice"), policy, random.Random(s))[0].id
             for s in range(10)}
    assert len(alice) == 1


def test_ejection_cooldown_doubles_and_a_trial_success_readmits() -> None:
    clock = Clock()
    fleet = Fleet(OutlierPolicy(consecutive_errors_to_eject=2, base_cooldown_s=5), clock=clock)
    for _ in range(2):
        fleet.started("a")
        fleet.finished("a", ok=False)
    assert fleet.is_ejected("a")
    clock.now = 5.1
    assert not fleet.is_ejected("a")  # half-open: one trial may go
    fleet.started("a")
    assert fleet.is_ejected("a")  # ...but only one
    fleet.finished("a", ok=False)  # the trial failed: ejected again, for twice as long
    clock.now = 5.1 + 9.9
    assert fleet.is_ejected("a")
    clock.now = 5.1 + 10.1
    fleet.started("a")
    fleet.finished("a", ok=True)
    assert not fleet.is_ejected("a") and fleet.state("a").ejections == 0


def test_retry_budget_allows_about_a_fifth_extra_load() -> None:
    budget = RetryBudget(ratio=0.2, floor=3)
    spent = 0
    for _ in range(100):
        budget.deposit()
        spent += budget.try_spend()
    assert 20 <= spent <= 23  # 20 % of 100 requests, plus the floor
    assert not budget.try_spend()
