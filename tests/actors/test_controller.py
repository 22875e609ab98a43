"""The drafter:target controller, run inside the discrete-event simulator of benchmarks/disaggregation_sim.py."""
from __future__ import annotations

import pytest

from actors.controller import Budget, Controller, Plan
from benchmarks.disaggregation_sim import Costs, best_k, fixed_plans, simulate

BUDGET = Budget(devices=2, drafter_cost=0.5, max_k=6)


def _best_fixed(costs, acceptance, duration=20.0):
    plans = fixed_plans(BUDGET) + [Plan("colocated", 2, 0, 0)]
    return max(best_k(costs, BUDGET, 16, duration, acceptance, p, range(0, BUDGET.max_k + 1))[0] for p in plans)


@pytest.mark.parametrize("costs", [
    Costs(),  # memory-bound verify (large fixed cost): speculation pays, co-location wins
    Costs(v0=0.0005, v1=0.00015, d0=0.0012, d1=0.00002),  # compute-bound verify, costly drafter: plain decoding wins
], ids=["memory-bound", "compute-bound"])
def test_controller_finds_within_5_percent_of_the_best_fixed_configuration(costs):
    best = _best_fixed(costs, lambda t: 0.8)
    ctl = Controller(BUDGET, group_rows=16)
    run = simulate(costs, BUDGET, 16, 40.0, lambda t: 0.8, controller=ctl, interval=4.0, startup=2.0)
    second_half = run["per_second"][20:39]
    assert sum(second_half) / len(second_half) >= 0.95 * best, (ctl.timeline, best)
    assert ctl.plan.devices(BUDGET.drafter_cost) <= BUDGET.devices


def test_controller_follows_an_acceptance_drop_and_logs_why():
    costs = Costs()
    best_after = _best_fixed(costs, lambda t: 0.3)
    ctl = Controller(BUDGET, group_rows=16)
    run = simulate(costs, BUDGET, 16, 60.0, lambda t: 0.9 if t < 30 else 0.3, controller=ctl, interval=4.0,
                   startup=2.0)
    assert ctl.timeline[0]["k"] > ctl.plan.k  # it drafted long while drafts were good, shorter afterwards
    late = run["per_second"][40:59]  # two re-planning intervals after the drop
    assert sum(late) / len(late) >= 0.95 * best_after, ctl.timeline
    assert all({"t", "mode", "targets", "drafters", "k", "acceptance", "reason"} <= set(d) for d in ctl.timeline)


def test_every_candidate_plan_fits_the_budget_and_stable_measurements_do_not_churn():
    ctl = Controller(Budget(devices=4, drafter_cost=0.25, max_k=4), group_rows=8)
    assert all(p.devices(0.25) <= 4 for p in ctl.candidates())
    for _ in range(20):
        ctl.observe_verify(8, 1, 0.010)
        ctl.observe_verify(8, 4, 0.012)
        ctl.observe_draft_step(8, 0.0005)
        ctl.observe_acceptance([3, 4, 2, 4], [4, 4, 4, 4])
    for t in range(10):
        ctl.decide(float(t))
    assert len(ctl.timeline) == 1


def test_cost_line_does_not_fall_faster_than_in_proportion_below_its_data():
    """A steep noisy line through two bins would predict a near-zero cost for a smaller x (and an absurd plan);
    below the data the cost falls at most in proportion to x."""
    from engine.estimates import CostLine

    c = CostLine()
    c.add(20, 0.02)
    c.add(40, 0.06)
    assert c(5) == pytest.approx(0.02 * 5 / 20)
    assert c(30) == pytest.approx(0.04)
    assert c(60) == pytest.approx(0.10)


def test_a_change_that_measures_slower_than_the_plan_it_replaced_is_reverted():
    """The model prefers plan B; B runs and its achieved rate is reported lower than A's: the controller goes
    back to A and sets B aside, until the acceptance moves."""
    from actors.controller import Budget, Controller, Plan

    c = Controller(Budget(devices=2, drafter_cost=1.0, max_k=4), group_rows=8)
    for k in range(0, 5):
        for _ in range(3):
            c.observe_verify(8, k, 0.010 + 0.001 * 8 * (k + 1))
            c.observe_verify(16, k, 0.010 + 0.001 * 16 * (k + 1))
    for rows in (8, 16):
        c.observe_draft_step(rows, 0.004)
    c.observe_acceptance([4] * 8, [4] * 8)
    a = Plan("disaggregated", 1, 1, 4)
    c.plan = a
    c.observe_rate(300.0, c.acceptance)
    b = c.decide(1.0)
    assert b != a and c.previous == a
    assert c.decide(2.0) == b  # not measured yet: keep running it
    c.observe_rate(200.0, c.acceptance)
    assert c.decide(3.0) == a and b in c.rejected
    assert "reverted" in c.timeline[-1]["reason"]
    assert c.decide(4.0) != b  # set aside ...
    for _ in range(40):
        c.observe_acceptance([0] * 8, [4] * 8)
    c.decide(5.0)
    assert not c.rejected  # ... until the acceptance moves


def test_orders_and_measurements_cross_as_typed_messages():
    """The manager's answer is an Orders (groups spread over the ready drafters, each failing over to the others);
    a target's Measurements feed the controller's model and the loop's totals."""
    import itertools
    import threading

    from actors.actor_pool import ActorPool, Member, Pools
    from actors.control_loop import ControlLoop
    from actors.event_log import EventLog
    from actors.messages import Measurements, Orders
    from actors.orders import orders
    from actors.routing import Routing
    from actors.target_actor import OrderedDraftLength

    ready = [Member(f"drafter-{i}", f"handle-{i}", None, 0.0, ready=True) for i in range(3)]
    o = orders(Plan("disaggregated", 2, 3, 4), "target-1", ["target-0", "target-1"], ready, groups=2, max_k=8)
    assert isinstance(o, Orders) and (o.mode, o.k, o.groups, o.max_k) == ("disaggregated", 4, 2, 8)
    assert [[d for d, _ in group] for group in o.drafters] == [["drafter-2", "drafter-0", "drafter-1"],
                                                               ["drafter-0", "drafter-1", "drafter-2"]]
    assert orders(Plan("disaggregated", 1, 0, 4), "target-0", ["target-0"], [], groups=2, max_k=8) == \
        Orders(mode="plain", k=0, groups=1, drafters=((),), max_k=8)

    policy = OrderedDraftLength(o, seed=0)
    policy.record(4, 0.2, 0.1, accepted=[3, 1], num_drafts=[4, 4], rows=2)
    m = policy.measured
    assert isinstance(m, Measurements) and m.verify == [(2, 4, 0.2)] and m.draft_step == [(2, 0.025)]
    log, lock = EventLog(), threading.RLock()
    pools = Pools(ActorPool("target", {}, itertools.count(), log), ActorPool("drafter", {}, itertools.count(), log),
                  Plan("disaggregated", 1, 1, 4), log)
    controller = Controller(Budget(devices=2, drafter_cost=0.5, max_drafters=4, max_k=8), group_rows=8, groups=2)
    loop = ControlLoop(pools, Routing(pools, lock), controller=controller, policy="auto", interval_s=1.0, lock=lock,
                       log=log)
    loop.observe(m)
    assert loop.stats["verify_s"] == 0.2 and loop.rounds_since_plan == 1


def test_the_simulator_plot_is_drawn_with_matplotlib(tmp_path):
    """benchmarks/disaggregation_sim.py's chart: a bar per split with its value, the chosen one red, and the
    co-located rate as a dashed line (red when co-location was chosen)."""
    import re

    from benchmarks.disaggregation_sim import svg_plot
    from pipeline.charts import COLORS

    path = tmp_path / "sim.svg"
    svg_plot([("1:0", 100.0), ("1:2", 150.0), ("2:1", 180.0)], "1:2", 160.0, str(path))
    svg = path.read_text()
    bars = [re.search(rf'<g id="bar-{i}">.*?</g>', svg, re.S).group() for i in range(3)]
    assert [COLORS["red"] in b for b in bars] == [False, True, False]
    assert '<g id="colocated">' in svg and "Matplotlib" in svg
    svg_plot([("1:0", 100.0)], "colocated", 160.0, str(path))
    assert COLORS["red"] in re.search(r'<g id="colocated">.*?</g>', path.read_text(), re.S).group()
