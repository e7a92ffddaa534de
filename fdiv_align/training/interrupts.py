"""SIGINT/SIGTERM handling for a run: stop soon, lose nothing, and let a second signal force an exit.

Inside :func:`stop_requests` (the trainer installs it for the whole run; the CLI already around model
loading):

* the first SIGINT/SIGTERM is recorded and said on stderr. Where the running code declared itself
  *abortable* (:meth:`StopRequests.abortable`: model loading, evaluation, a step's sampling and
  scoring — phases whose partial work is simply redone on resume) the signal raises
  :class:`RunInterrupted` at once; elsewhere (a step's update) the run stops at the end of the step.
  Either way the caller checkpoints the last consistent state.
* a second signal forces the exit at once (:class:`ForcedStop`, a ``SystemExit`` with status
  128 + signal): what was checkpointed before stays, the step in flight is lost.

Signals can only be handled in the main thread; elsewhere this is a no-op context.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

__all__ = ["RunInterrupted", "ForcedStop", "StopRequests", "stop_requests"]

SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)


class RunInterrupted(BaseException):
    """A stop signal arrived during an abortable phase; ``signum`` is the signal. A ``BaseException``, like
    ``KeyboardInterrupt``: code that handles errors (``except Exception``) — torch.compile's tracer wrapping
    what it calls, a fallback path — must let it through, so that the stop is honoured the same way whatever
    runs when the signal arrives."""

    def __init__(self, signum: int, phase: str):
        super().__init__(f"interrupted by {signal.Signals(signum).name} during {phase}")
        self.signum, self.phase = signum, phase


class ForcedStop(SystemExit):
    """A second stop signal: exit now (status 128 + signal)."""


class StopRequests:
    """The run's stop state; see the module docstring."""

    def __init__(self):
        self.signum: int | None = None
        self._phase: str | None = None  # the abortable phase running now, if any

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @contextlib.contextmanager
    def abortable(self, phase: str):
        """Declare a phase whose work may be abandoned: a stop signal (or one already pending) raises
        :class:`RunInterrupted` inside it."""
        if self.signum is not None:
            raise RunInterrupted(self.signum, phase)
        outer, self._phase = self._phase, phase
        try:
            yield
        finally:
            self._phase = outer

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum is not None:
            print(f"\n[fdiv-align] second {name}: stopping now; the step in flight is lost, earlier checkpoints "
                  f"are kept", file=sys.stderr, flush=True)
            raise ForcedStop(128 + signum)
        self.signum = signum
        if self._phase is not None:
            print(f"\n[fdiv-align] {name}: stopping ({self._phase} abandoned); send it again to stop without "
                  f"saving", file=sys.stderr, flush=True)
            raise RunInterrupted(signum, self._phase)
        print(f"\n[fdiv-align] {name}: stopping at the end of this step and saving a checkpoint; send it again to "
              f"stop at once", file=sys.stderr, flush=True)


_ACTIVE: list[StopRequests] = []


@contextlib.contextmanager
def stop_requests():
    """Install the handlers for the duration (re-entrant: an inner call shares the outer state)."""
    if _ACTIVE:
        yield _ACTIVE[-1]
        return
    state = StopRequests()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    old = {sig: signal.signal(sig, state._handle) for sig in SIGNALS}
    _ACTIVE.append(state)
    try:
        yield state
    finally:
        _ACTIVE.pop()
        for sig, handler in old.items():
            signal.signal(sig, handler)
