"""The decision rule of the live controller: change the configuration only when it pays back.

    decision = decide(now_s, state, current, candidate, change, mean_request_s, policy)

Pure and fast: numbers in, a `Decision` out; the simulator (planner/simulator.py) and the
live controller call this same function. The currency is *requests that meet every SLO*.

A configuration's value under the observed workload is its predicted SLO goodput less what
its devices cost:

    value = goodput_rps - device_cost_rps * devices

(`device_cost_rps`: the goodput a device must add to be worth holding; it is what makes the
controller give devices back when load falls.) Over the payback horizon H the change gains

    gain = (value_candidate - value_current) * H                       [requests]

and costs what it takes away from serving, turned into requests by Little's law (a request
occupies the deployment for `mean_request_s`, so R request-seconds of service are R /
mean_request_s requests):

    cost = (stall_s * touched_requests + overhead * prefetch_s * in_flight_requests
            + recompute_request_s) / mean_request_s                     [requests]

(`recompute_request_s`: what the requests whose KV the change drops lose, when memory cannot
hold every request's KV through it; planner/adapt.recompute_request_s.) A change may drop KV
only out of a configuration predicted to meet the SLOs for less than 1 - `recompute_when_losing`
of the expected rate (or always, with `recompute_overflow`): elsewhere a change whose KV does
not fit is not made, as windows that straddle a shift in the mix overstate what it gains.

It acts when, in this order: no apply is under way (never two at once); the last apply ended
at least `min_dwell_s` ago (dwell); the value rises by at least `min_relative_gain` of the
current value (hysteresis); and gain > cost (payback). A change that raises goodput itself by the
hysteresis share skips the dwell: dwell must not hold a deployment in overload. `payback_s = cost / (value gain per s)`
is reported either way.

In an overload that meets no SLO whichever configuration serves (both goodputs under
OVERLOAD_GOODPUT_SHARE of the capacity), goodput cannot tell configurations apart, but the one
that serves more drains the queue sooner once the load eases. There a configuration is worth
what it serves, late, less its devices,

    overload_value = capacity_rps - device_cost_rps * devices,

and the candidate is applied when its capacity is higher by the hysteresis share and the
extra value over the horizon, (overload_value_candidate - overload_value_current) * H, pays for
the change; dwell does not hold it. So a surge past what the deployment serves takes devices
again when each serves more than it costs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

OVERLOAD_GOODPUT_SHARE = 0.01  # goodput under this share of the capacity: nothing meets the SLOs


@dataclass(frozen=True)
class ControllerPolicy:
    payback_horizon_s: float = 600.0  # the gain must repay the change within this
    min_relative_gain: float = 0.05  # hysteresis: ignore value gains below this share
    min_dwell_s: float = 300.0  # a configuration serves at least this long after an apply
    device_cost_rps: float = 0.5  # goodput (req/s) a device must add to be worth holding
    payback: bool = True  # False: act on any gain (the rule without payback, to compare)
    scale_down_window_s: float = 300.0  # devices go back only on a window this long (adapt.may_shed)
    recompute_overflow: bool = False  # a change may drop KV that does not fit (reconfig.py)
    # ... and where the serving configuration is predicted to lose more than this share of the
    # requests (their KV would keep it on what loses them); 1: never
    recompute_when_losing: float = 0.1

    def may_recompute(self, current: Outlook, demand_rps: float) -> bool:
        """Returns whether a change from `current` may drop KV that memory cannot hold through
        it: always with `recompute_overflow`; otherwise only out of a configuration predicted to
        meet the SLOs for less than 1 - `recompute_when_losing` of the `demand_rps` it is asked."""
        return self.recompute_overflow or current.goodput_rps < (1 - self.recompute_when_losing) * demand_rps

    @classmethod
    def without_payback(cls, device_cost_rps: float = 0.5) -> ControllerPolicy:
        """Returns the naive rule: re-plan and apply whenever the plan looks better at all."""
        return cls(
            payback_horizon_s=0.0,
            min_relative_gain=0.0,
            min_dwell_s=0.0,
            device_cost_rps=device_cost_rps,
            payback=False,
            scale_down_window_s=0.0,
        )


@dataclass(frozen=True)
class Outlook:
    """A configuration's predicted figures under the observed workload."""

    goodput_rps: float  # requests/s predicted to meet every SLO
    devices: int
    capacity_rps: float | None = None  # requests/s it serves within the SLOs at most

    def value(self, policy: ControllerPolicy) -> float:
        return self.goodput_rps - policy.device_cost_rps * self.devices

    def overload_value(self, policy: ControllerPolicy) -> float:
        """What it is worth where nothing meets the SLOs (module doc): what it serves, late."""
        return (self.capacity_rps or 0.0) - policy.device_cost_rps * self.devices


@dataclass(frozen=True)
class ChangeCost:
    """What the change would cost, as the diff planner (planner/reconfig.py) predicts it."""

    stall_s: float  # the blocking switch
    touched_requests: int  # in-flight requests on pipelines that change or go
    prefetch_s: float  # background loads and KV pre-copy, paced
    in_flight_requests: int  # every request in flight (all feel the paced background copy)
    overhead: float = 0.05  # the slowdown the paced copies may cause (reconfig max_overhead)
    recompute_requests: int = 0  # requests whose KV the change drops, to recompute
    recompute_request_s: float = 0.0  # the request-seconds those recomputes take from serving

    def request_seconds(self) -> float:
        return (
            self.stall_s * self.touched_requests
            + self.overhead * self.prefetch_s * self.in_flight_requests
            + self.recompute_request_s
        )


@dataclass(frozen=True)
class ControllerState:
    last_apply_end_s: float | None = None  # when the last apply finished (None: never)
    applying: bool = False  # an apply is under way


@dataclass(frozen=True)
class Decision:
    act: bool
    reason: str
    value_current: float  # req/s of goodput less device cost
    value_candidate: float
    gain: float  # requests over the payback horizon
    cost: float  # requests
    payback_s: float | None  # seconds until the change has paid for itself (None: never)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def decide(
    now_s: float,
    state: ControllerState,
    current: Outlook,
    candidate: Outlook,
    change: ChangeCost,
    mean_request_s: float,
    policy: ControllerPolicy,
) -> Decision:
    """Returns whether to apply the candidate now, why, and the figures behind it."""
    v_cur, v_new = current.value(policy), candidate.value(policy)
    delta = v_new - v_cur
    cost = change.request_seconds() / max(mean_request_s, 1e-9)
    gain = delta * policy.payback_horizon_s
    payback_s = cost / delta if delta > 0 else None

    def out(act: bool, reason: str) -> Decision:
        return Decision(act, reason, v_cur, v_new, gain, cost, payback_s)

    if state.applying:
        return out(False, "an apply is under way; never two at once")
    if lost(current) and lost(candidate):
        return _drain_faster(current, candidate, cost, policy, out)
    if delta <= 0:
        return out(False, f"no gain: value {v_new:.3f} <= current {v_cur:.3f} req/s")
    if not policy.payback:
        return out(True, f"value {v_cur:.3f} -> {v_new:.3f} req/s (payback rule off)")
    # dwell stops flapping, but never holds a deployment in overload: a change that raises
    # goodput itself (not only the device cost) by the hysteresis share may skip it
    rescue = candidate.goodput_rps > current.goodput_rps * (1 + policy.min_relative_gain)
    if (
        state.last_apply_end_s is not None
        and now_s - state.last_apply_end_s < policy.min_dwell_s
        and not rescue
    ):
        waited = now_s - state.last_apply_end_s
        return out(False, f"dwell: {waited:.0f} s since the last apply < {policy.min_dwell_s:g} s")
    threshold = policy.min_relative_gain * max(abs(v_cur), 1e-9)
    if delta < threshold:
        return out(
            False,
            f"hysteresis: gain {delta:.3f} req/s < {policy.min_relative_gain:.0%} of {v_cur:.3f}",
        )
    if gain <= cost:
        return out(
            False,
            f"does not pay back: gains {gain:.1f} requests over {policy.payback_horizon_s:g} s, "
            f"costs {cost:.1f}",
        )
    return out(
        True,
        f"value {v_cur:.3f} -> {v_new:.3f} req/s; gains {gain:.1f} requests over "
        f"{policy.payback_horizon_s:g} s, costs {cost:.1f} (payback {payback_s:.0f} s)",
    )


def lost(o: Outlook) -> bool:
    """Returns whether nothing meets the SLOs on `o`: an overload that has left a queue."""
    return o.capacity_rps is not None and o.goodput_rps <= OVERLOAD_GOODPUT_SHARE * o.capacity_rps


def _drain_faster(current: Outlook, candidate: Outlook, cost: float, policy: ControllerPolicy,
                  out: Any) -> Decision:
    """The overload rule (module doc): more capacity, worth more than its devices cost, if it
    pays back."""
    c_cur, c_new = current.capacity_rps or 0.0, candidate.capacity_rps or 0.0
    delta = candidate.overload_value(policy) - current.overload_value(policy)
    gain = delta * policy.payback_horizon_s
    figures = f"capacity {c_cur:.3f} -> {c_new:.3f} req/s on {current.devices} -> {candidate.devices} devices"
    if c_new <= c_cur * (1 + policy.min_relative_gain) or delta <= 0:
        return out(False, f"overload, no configuration meets the SLOs; {figures} is no real gain")
    if policy.payback and gain <= cost:
        return out(False, f"overload: {figures} does not pay back: serves {gain:.1f} more requests "
                          f"over {policy.payback_horizon_s:g} s, costs {cost:.1f}")
    decision = out(True, f"overload, no configuration meets the SLOs: {figures} drains the queue "
                         f"sooner; serves {gain:.1f} more requests over {policy.payback_horizon_s:g} s, "
                         f"costs {cost:.1f}")
    return replace(decision, gain=gain, payback_s=cost / delta)
