"""Stopping between training steps: an interruption (Ctrl-C, or SIGTERM from a scheduler preempting
the job) that arrives while a training loop runs is held until the step ends; the loop then saves its
progress, a checkpoint of whole steps, and stops the way the signal would have. A stopped run so loses
no finished step, and resumes from the step it stopped at (bit-identically: a checkpoint between any
two steps is one the loop could have written on its schedule). A second signal stops at once, so a step
that hangs can still be stopped.

Only the interruptions that raise are held: Python's own SIGINT handler (``KeyboardInterrupt``) and
:func:`raise_terminated` (``Terminated``, which ``posbias``'s command line sets for SIGTERM). A signal
whose action is the system's (SIGTERM in a plain Python process: the process ends) or a handler of the
caller's own is left as it is, and so is every signal outside the main thread, where Python runs none.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator, NoReturn

__all__ = ["Terminated", "raise_terminated", "sigterm_raises", "between_steps", "Held"]

HELD = (signal.SIGINT, signal.SIGTERM)


class Terminated(BaseException):
    """SIGTERM raised in the main thread (:func:`raise_terminated`), so that it unwinds as an interrupt
    does: temporary files removed, locks released, progress saved between steps, one line said."""


def raise_terminated(signum: int, frame: Any) -> NoReturn:
    """A SIGTERM handler that raises :class:`Terminated`."""
    raise Terminated


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM (a scheduler preempting the job, ``kill``) raises :class:`Terminated` for the duration, so
    that it unwinds as an interrupt does (temporary files removed, locks released, a training loop's step
    saved: :func:`between_steps`); the previous handler is restored after. A no-op outside the main
    thread, where no handler can be set. The command line runs every command inside it."""
    try:
        previous = signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raises(handler: Any) -> bool:
    return handler is signal.default_int_handler or handler is raise_terminated


class Held:
    """The interruptions :func:`between_steps` holds: ``requested`` once one came; :meth:`stop` raises what
    it would have raised."""

    def __init__(self, handlers: dict[int, Any]) -> None:
        self.handlers, self.signals = handlers, []

    @property
    def requested(self) -> bool:
        return bool(self.signals)

    def hold(self, signum: int, frame: Any) -> None:
        if self.signals:  # asked twice: stop now
            self.handlers[signum](signum, frame)
        self.signals.append(signum)

    def stop(self, *, agreed: bool = False) -> None:
        """Raise what the first held signal would have raised; when none came, nothing, or with ``agreed``
        (processes training together stop at one step because another was interrupted) KeyboardInterrupt."""
        if self.signals:
            self.handlers[self.signals[0]](self.signals[0], None)
        if agreed:
            raise KeyboardInterrupt("stopped with the other processes, one of which was interrupted")


@contextlib.contextmanager
def between_steps() -> Iterator[Held]:
    """Within: a SIGINT / SIGTERM whose handler raises is held (:class:`Held`); the handlers are restored
    on exit. Outside the main thread nothing is held, and ``requested`` stays False. Processes training
    together hold theirs too, and agree after each step whether any was interrupted
    (:func:`posbias.train.train`)."""
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.getsignal(s) for s in HELD if _raises(signal.getsignal(s))}
    held = Held(handlers)
    for s in handlers:
        signal.signal(s, held.hold)
    try:
        yield held
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
