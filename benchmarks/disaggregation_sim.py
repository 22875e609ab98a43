"""A discrete-event simulator of drafter and target pools: the controller against every fixed ratio and co-location.

    python benchmarks/disaggregation_sim.py [--devices 8] [--drafter-cost 0.25] [--draft-ms 0.6] [--svg out.svg]

The cluster: `devices` device units; a target actor takes 1, a drafter actor `drafter_cost`. Each target keeps
two groups of `rows` sequences; a group's round is k drafter steps on any free drafter (a shared FIFO pool),
then one verify on its own target (FIFO per target). Co-located actors take 1 device each and run one group
of 2*rows sequences, drafting then verifying. Costs (with +-5% noise per event):
verify = v0 + v1 * rows * (k+1); drafter step = d0 + d1 * rows. Each row accepts a geometric number of drafts
(per-token acceptance `a`, capped at k) plus one token from the target.

Printed: tokens/s of co-location at its best k, of every fixed targets:drafters split at its best k (found by
simulating every k), and of the controller, which is told nothing but the budget: it starts from a probe plan,
measures, and re-plans every `--interval` seconds (new actors take `--startup` seconds to start). Then the same
with acceptance dropping mid-run, and how long the controller takes to recover.
"""
from __future__ import annotations

import argparse
import heapq
import random
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.controller import Budget, Controller, Plan  # noqa: E402


@dataclass
class Costs:
    v0: float = 0.008  # seconds
    v1: float = 0.00005  # per row-position
    d0: float = 0.0004
    d1: float = 0.00002
    noise: float = 0.05

    def verify(self, rows: int, k: int) -> float:
        return self.v0 + self.v1 * rows * (k + 1)

    def draft_step(self, rows: int) -> float:
        return self.d0 + self.d1 * rows


def _accepted(rng: random.Random, rows: int, k: int, a: float) -> list[int]:
    out = []
    for _ in range(rows):
        m = 0
        while m < k and rng.random() < a:
            m += 1
        out.append(m)
    return out


def simulate(costs: Costs, budget: Budget, rows: int, duration: float, acceptance, plan: Plan | None = None,
             controller: Controller | None = None, interval: float = 5.0, startup: float = 3.0,
             seed: int = 0) -> dict:
    """Tokens generated over `duration` seconds with a fixed plan, or with the controller re-planning.

    `acceptance(t)` is the true per-token acceptance at time t. Returns tokens/s overall and per second.
    """
    rng = random.Random(seed)

    def jitter(x: float) -> float:
        return x * (1 + rng.uniform(-costs.noise, costs.noise))

    events: list = []  # (time, seq, kind, payload)
    seq = 0

    def push(t: float, kind: str, payload=None) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, payload))

    tokens_at: list[tuple[float, int]] = []
    state = {"plan": None, "epoch": 0, "started": 0.0, "acceptance": 0.0}
    draft_queue: list[int] = []  # group ids waiting for a drafter
    free_drafters: list[int] = []
    target_queue: dict[int, list[int]] = {}
    target_busy: dict[int, bool] = {}
    group_target: dict[int, int] = {}
    group_k: dict[int, int] = {}

    def start(p: Plan, now: float) -> None:
        """(Re)build the actors for plan p: every actor that changes restarts after `startup`; work in flight
        of the previous epoch is dropped and its groups are re-queued (rows are neither lost nor counted twice:
        a round's tokens count only when its verify completes)."""
        state["epoch"] += 1
        state["plan"] = p
        state["started"] = now
        delay = startup if now > 0 else 0.0
        for d in (draft_queue, free_drafters, target_queue, target_busy, group_target, group_k):
            d.clear()
        epoch = state["epoch"]
        if p.mode == "colocated":
            for t in range(p.targets):
                push(now + delay, "colo_round", (epoch, t))
            return
        for t in range(p.targets):
            target_queue[t], target_busy[t] = [], False
            for g in range(2):
                gid = t * 2 + g
                group_target[gid] = t
                if p.k == 0 or p.drafters == 0:
                    push(now + delay, "to_target", (epoch, gid))
                else:
                    draft_queue.append(gid)
        for d in range(p.drafters if p.k > 0 else 0):
            push(now + delay, "drafter_free", (epoch, d))

    def dispatch_drafts(now: float) -> None:
        p = state["plan"]
        while draft_queue and free_drafters:
            gid, d = draft_queue.pop(0), free_drafters.pop()
            group_k[gid] = controller.explore_k(p.k, rng.random()) if controller else p.k
            steps = [jitter(costs.draft_step(rows)) for _ in range(group_k[gid])]
            if controller:
                for s in steps:
                    controller.observe_draft_step(rows, s)
            push(now + sum(steps), "drafted", (state["epoch"], gid, d))

    def dispatch_verify(now: float, t: int) -> None:
        p = state["plan"]
        if target_busy[t] or not target_queue[t]:
            return
        gid = target_queue[t].pop(0)
        target_busy[t] = True
        k = group_k.get(gid, p.k) if p.k and p.drafters else 0
        v = jitter(costs.verify(rows, k))
        if controller:
            controller.observe_verify(rows, k, v)
        push(now + v, "verified", (state["epoch"], gid, t))

    p0 = plan
    if controller is not None:  # a probe plan to measure from: half the budget on targets, k = 4
        targets = max(1, int(budget.devices // 2))
        drafters = int((budget.devices - targets) / budget.drafter_cost) if budget.drafter_cost else targets
        p0 = Plan("disaggregated", targets, max(1, min(drafters, budget.max_drafters)), 4)
        controller.plan = p0  # as the pool manager does: the probe plan is the current plan
        push(interval, "decide")
    start(p0, 0.0)
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if now > duration:
            break
        if kind == "decide":
            if now - state["started"] >= startup + interval:  # settled for a whole interval: report the rate
                controller.observe_rate(sum(n for t, n in tokens_at if t > now - interval) / interval,
                                        state["acceptance"])
            new, old = controller.decide(now), state["plan"]
            state["acceptance"] = controller.acceptance  # the next interval's start
            if (new.mode, new.targets, new.drafters) != (old.mode, old.targets, old.drafters):
                start(new, now)  # actors change: they restart
            elif new.k != old.k and (new.k == 0) == (old.k == 0):
                state["plan"] = new  # only k changes: from the next round on, no restart
            elif new != old:
                start(new, now)  # speculation switched on or off: the groups' routes change
            push(now + interval, "decide")
            continue
        if payload[0] != state["epoch"]:
            continue  # an event of actors that no longer exist
        p = state["plan"]
        a = acceptance(now)
        if kind == "colo_round":
            n = 2 * rows
            k = controller.explore_k(p.k, rng.random()) if controller else p.k
            draft, verify = jitter(k * costs.draft_step(n)), jitter(costs.verify(n, k))
            dur = draft + verify
            acc = _accepted(rng, n, k, a)
            if controller:
                controller.observe_verify(n, k, verify)
                if k:
                    controller.observe_draft_step(n, draft / k)
                    controller.observe_acceptance(acc, [k] * n)
            tokens_at.append((now + dur, sum(acc) + n))
            push(now + dur, "colo_round", payload)
        elif kind == "drafter_free":
            free_drafters.append(payload[1])
            dispatch_drafts(now)
        elif kind == "drafted":
            _, gid, d = payload
            free_drafters.append(d)
            target_queue[group_target[gid]].append(gid)
            dispatch_drafts(now)
            dispatch_verify(now, group_target[gid])
        elif kind == "to_target":
            gid = payload[1]
            target_queue[group_target[gid]].append(gid)
            dispatch_verify(now, group_target[gid])
        elif kind == "verified":
            _, gid, t = payload
            target_busy[t] = False
            k = group_k.get(gid, p.k) if p.k and p.drafters else 0
            acc = _accepted(rng, rows, k, a)
            if controller and k > 0:
                controller.observe_acceptance(acc, [k] * rows)
            tokens_at.append((now, sum(acc) + rows))
            if p.k == 0 or p.drafters == 0:
                target_queue[t].append(gid)
            else:
                draft_queue.append(gid)
                dispatch_drafts(now)
            dispatch_verify(now, t)
    per_second = [0] * (int(duration) + 1)
    for t, n in tokens_at:
        if t <= duration:
            per_second[int(t)] += n
    return {"tokens_per_s": sum(per_second) / duration, "per_second": per_second}


def fixed_plans(budget: Budget) -> list[Plan]:
    """Every targets:drafters split of the budget (k chosen later), and co-location."""
    out = []
    for targets in range(1, int(budget.devices) + 1):
        left = budget.devices - targets
        most = budget.max_drafters if budget.drafter_cost == 0 else int(left / budget.drafter_cost + 1e-9)
        for drafters in range(0, min(most, budget.max_drafters) + 1):
            out.append(Plan("disaggregated", targets, drafters, 0))
    return out


def best_k(costs, budget, rows, duration, acceptance, plan: Plan, ks) -> tuple[float, int]:
    runs = []
    for k in ks:
        p = Plan(plan.mode, plan.targets, plan.drafters, k if plan.drafters or plan.mode == "colocated" else 0)
        runs.append((simulate(costs, budget, rows, duration, acceptance, plan=p)["tokens_per_s"], p.k))
        if not plan.drafters and plan.mode != "colocated":
            break
    return max(runs)


def svg_plot(points: list[tuple[str, float]], chosen: str, colocated: float, path: str) -> None:
    """A bar per fixed split (tokens/s), the controller's steady-state choice in red, co-location as a dashed
    line (red when the controller chose it); drawn with matplotlib in the report's style (pipeline/charts.py)."""
    import matplotlib
    from matplotlib.figure import Figure

    from pipeline.charts import COLORS, MPL_RC

    with matplotlib.rc_context(MPL_RC):
        fig = Figure(figsize=(9, 3.6), layout="constrained")
        ax = fig.add_subplot()
        labels = [label for label, _ in points]
        colors = [COLORS["red"] if label == chosen else COLORS["blue"] for label in labels]
        for i, (label, value) in enumerate(points):
            ax.bar(i, value, width=0.8, color=colors[i], gid=f"bar-{i}", label=f"{label}: {value:.0f}")
        ax.axhline(colocated, color=COLORS["red"] if chosen == "colocated" else "#333333", linestyle="--",
                   linewidth=2, gid="colocated")
        ax.set_ylim(0, max(max(v for _, v in points), colocated) * 1.1)
        ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
        ax.set_xlabel("targets:drafters")
        ax.set_ylabel("tokens/s")
        fig.suptitle("tokens/s per targets:drafters split (red: the controller's choice; dashed line: co-located, "
                     "best k)")
        fig.savefig(path, format="svg", metadata={"Date": None})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=float, default=8)
    ap.add_argument("--drafter-cost", type=float, default=0.25)
    ap.add_argument("--rows", type=int, default=16, help="sequences per group")
    ap.add_argument("--draft-ms", type=float, default=0.72, help="one drafter step over a group, ms")
    ap.add_argument("--verify-fixed-ms", type=float, default=8.0, help="a verify forward's cost at zero rows, ms")
    ap.add_argument("--verify-row-ms", type=float, default=0.05, help="its cost per row and position, ms")
    ap.add_argument("--acceptance", type=float, default=0.8)
    ap.add_argument("--drop-to", type=float, default=0.4, help="acceptance after the mid-run shift")
    ap.add_argument("--duration", type=float, default=120.0)
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("--startup", type=float, default=3.0)
    ap.add_argument("--svg")
    args = ap.parse_args()
    costs = Costs(v0=args.verify_fixed_ms / 1000, v1=args.verify_row_ms / 1000)
    costs.d0 = args.draft_ms / 1000 - costs.d1 * args.rows
    budget = Budget(args.devices, drafter_cost=args.drafter_cost)
    ks = range(1, budget.max_k + 1)
    ratio = 4 * costs.draft_step(args.rows) / costs.verify(args.rows, 4)
    print(f"# devices {args.devices}, drafter {args.drafter_cost} device; group {args.rows} rows; verify(k=4) "
          f"{costs.verify(args.rows, 4) * 1e3:.1f} ms, 4 drafter steps {4 * costs.draft_step(args.rows) * 1e3:.1f} ms "
          f"({ratio:.0%} of verifying); acceptance {args.acceptance}; {args.duration:.0f} s simulated")

    def steady(_t):
        return args.acceptance

    colo, colo_k = best_k(costs, budget, args.rows, args.duration, steady, Plan("colocated", int(args.devices), 0, 0),
                          range(0, budget.max_k + 1))
    print(f"co-located ({int(args.devices)} actors), best k={colo_k}: {colo:9.0f} tokens/s")
    results = []
    for p in fixed_plans(budget):
        rate, k = best_k(costs, budget, args.rows, args.duration, steady, p, ks)
        results.append((f"{p.targets}:{p.drafters}", rate, k))
    best_label, best_split, best_k_ = max(results, key=lambda r: r[1])
    best_rate = max(best_split, colo)
    print(f"fixed splits (targets:drafters, best k each): {len(results)}; best {best_label} k={best_k_}: "
          f"{best_split:.0f} tokens/s ({best_split / colo:.2f}x co-located); worst {min(r[1] for r in results):.0f}")
    ctl = Controller(budget, args.rows)
    run = simulate(costs, budget, args.rows, args.duration, steady, controller=ctl, interval=args.interval,
                   startup=args.startup)
    final = ctl.plan
    tail = run["per_second"][int(args.duration / 2):-1]
    tail_rate = sum(tail) / len(tail)
    print(f"controller: {run['tokens_per_s']:.0f} tokens/s over the run, {tail_rate:.0f} in its second half "
          f"({tail_rate / best_rate:.1%} of the best fixed configuration, {tail_rate / colo:.2f}x co-located); "
          f"settled on {final.targets}:{final.drafters} k={final.k} after {len(ctl.timeline)} decisions")

    def shift(t):
        return args.acceptance if t < args.duration / 2 else args.drop_to

    ctl2 = Controller(budget, args.rows)
    run2 = simulate(costs, budget, args.rows, args.duration, shift, controller=ctl2, interval=args.interval,
                    startup=args.startup)
    dropped = [best_k(costs, budget, args.rows, args.duration / 4, lambda t: args.drop_to, p, range(0, budget.max_k + 1))[0]
               for p in fixed_plans(budget) + [Plan("colocated", int(args.devices), 0, 0)]]
    best_after = max(dropped)
    per = run2["per_second"]
    half = int(args.duration / 2)
    recovered = next((t - half for t in range(half, len(per) - 5)
                      if sum(per[t:t + 5]) / 5 >= 0.95 * best_after), None)
    print(f"acceptance {args.acceptance} -> {args.drop_to} at t={half}s: best fixed configuration afterwards "
          f"{best_after:.0f} tokens/s; the controller reaches 95% of it "
          f"{'after ' + str(recovered) + ' s' if recovered is not None else 'never'}; decisions:")
    for d in ctl2.timeline:
        print(f"  t={d['t']:7.1f}s  {d['mode']:13s} {d['targets']}:{d['drafters']} k={d['k']}  "
              f"a={d['acceptance']:.2f}  {d['reason']}")
    if args.svg:
        chosen = "colocated" if final.mode == "colocated" else f"{final.targets}:{final.drafters}"
        svg_plot([(label, rate) for label, rate, _ in results], chosen, colo, args.svg)
        print(f"plot: {args.svg}")


if __name__ == "__main__":
    main()
