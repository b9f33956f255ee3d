"""What the gateway knows about each backend right now: health, ejection, in-flight requests.

State is keyed by backend id and outlives config reloads, so a reload does not forget that a replica
is down. Passive outlier detection: `consecutive_errors_to_eject` connect errors or 5xx in a row eject
a backend for a cooldown that doubles with each ejection (capped); after the cooldown one trial request
is let through (half-open), and a success brings the backend back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.backends.upstream import ProbeVerdict, Unreachable, UpstreamUnavailable


@dataclass
class BackendState:
    backend_id: str
    healthy: bool = True  # last active probe (optimistic until the first probe says otherwise)
    outstanding: int = 0
    consecutive_errors: int = 0
    ejections: int = 0
    ejected_until: float = 0.0
    trial_in_flight: bool = False
    last_probe: float | None = None
    # The last probe's failure (None: it passed), and since when probes have failed without a pass.
    probe_failure: UpstreamUnavailable | None = None
    failing_since: float | None = None


@dataclass
class OutlierPolicy:
    consecutive_errors_to_eject: int = 3
    base_cooldown_s: float = 5.0
    max_cooldown_s: float = 120.0


@dataclass
class Fleet:
    policy: OutlierPolicy = field(default_factory=OutlierPolicy)
    clock: Callable[[], float] = time.monotonic
    states: dict[str, BackendState] = field(default_factory=dict)
    on_eject: Callable[[str], None] | None = None

    def state(self, backend_id: str) -> BackendState:
        state = self.states.get(backend_id)
        if state is None:
            state = self.states[backend_id] = BackendState(backend_id)
        return state

    def probed(self, backend_id: str, failure: UpstreamUnavailable | None) -> None:
        """An active probe's verdict: None when the backend answered its health path."""
        state = self.state(backend_id)
        state.healthy = failure is None
        state.last_probe = self.clock()
        if failure is None:
            state.probe_failure = state.failing_since = None
            return
        if state.failing_since is None:
            state.failing_since = state.last_probe
        # A DNS server that did not answer, or a probe that ran out of time (perhaps in the lookup), says
        # nothing about a name that did not resolve the probe before: that answer stands.
        known = state.probe_failure
        if not (known is not None and known.kind is Unreachable.UNRESOLVABLE
                and (failure.kind is Unreachable.LOOKUP_FAILED or failure.timed_out)):
            state.probe_failure = failure

    def probe_verdict(self, backend_id: str) -> ProbeVerdict | None:
        """The probes' last failure and for how long they have failed; None while they pass (or none ran)."""
        state = self.state(backend_id)
        if state.probe_failure is None or state.failing_since is None:
            return None
        return ProbeVerdict(state.probe_failure, self.clock() - state.failing_since)

    def is_ejected(self, backend_id: str) -> bool:
        """Ejected, unless the cooldown is over and no trial request is out yet (half-open)."""
        state = self.state(backend_id)
        if state.ejected_until == 0.0:
            return False
        return self.clock() < state.ejected_until or state.trial_in_flight

    def started(self, backend_id: str) -> None:
        state = self.state(backend_id)
        state.outstanding += 1
        if state.ejected_until and self.clock() >= state.ejected_until:
            state.trial_in_flight = True

    def finished(self, backend_id: str, ok: bool) -> None:
        state = self.state(backend_id)
        state.outstanding = max(0, state.outstanding - 1)
        if ok:
            self._recovered(state)
        else:
            self._failed(state)

    def released(self, backend_id: str) -> None:
        """A call that says nothing about the backend's health (a generation outlived its timeout, the
        client went away): only the outstanding count changes; a half-open trial may be tried again."""
        state = self.state(backend_id)
        state.outstanding = max(0, state.outstanding - 1)
        state.trial_in_flight = False

    def _recovered(self, state: BackendState) -> None:
        state.consecutive_errors = 0
        state.ejected_until = 0.0
        state.trial_in_flight = False
        state.ejections = 0

    def _failed(self, state: BackendState) -> None:
        state.consecutive_errors += 1
        was_trial = state.trial_in_flight
        state.trial_in_flight = False
        if was_trial or state.consecutive_errors >= self.policy.consecutive_errors_to_eject:
            cooldown = min(self.policy.base_cooldown_s * 2**state.ejections, self.policy.max_cooldown_s)
            state.ejections += 1
            state.ejected_until = self.clock() + cooldown
            if self.on_eject:
                self.on_eject(state.backend_id)
