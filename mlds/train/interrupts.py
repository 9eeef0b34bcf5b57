"""Signals in a training job: SIGTERM and SIGINT become :class:`JobInterrupted`, never a lost network.

Inside :func:`interruptible` (all of :func:`train_job`, and all of
``train.py``) SIGTERM and SIGINT (Ctrl-C) raise :class:`JobInterrupted`
wherever the job is, Lightning's training loop included; ``train.py`` turns it
into one line on stderr (the population in training was not stored, the stored
ones are kept, a rerun resumes) and exit status 128 + the signal (143, 130).
Storing a population is never cut short by them: a signal that arrives while a
shard is written takes effect once the shard is stored. Where another handler
owns a signal (submitit's, in SLURM jobs) it is left alone; Lightning's own
reaction to SIGTERM (a bare ``SystemExit``) still becomes :class:`JobInterrupted`.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


class JobInterrupted(BaseException):
    """A job (or a sweep) stopped by a signal. A ``BaseException`` like ``KeyboardInterrupt``, so that
    neither Hydra nor Lightning takes it for one failed job and goes on with the next. ``code``: the
    exit status, 128 + the signal number (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, signum: int, population: str | None = None, stored: int = 0, job: str | None = None):
        super().__init__(signum, population, stored, job)
        self.signum, self.population, self.stored, self.job = int(signum), population, int(stored), job

    @property
    def code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        name = "Ctrl-C (SIGINT)" if self.signum == signal.SIGINT else signal.Signals(self.signum).name
        what = (f"the population in training ({self.population}) was not stored" if self.population
                else f"no population of {self.job} was in training" if self.job
                else "populations still in training were not stored")
        kept = f"the {self.stored} networks this job stored are kept" if self.stored else "stored networks are kept"
        return (f"interrupted by {name}: {what}; {kept}; run the same command again to resume "
                "(stored networks are skipped)")


class JobInterruptedError(RuntimeError):
    """:class:`JobInterrupted` as an ordinary exception, raised by a job that runs in a submitit (SLURM)
    process: submitit stores it as the job's result and the sweep raises it again, so ``train.py``
    reports it in one line with the same exit status (``code``)."""

    def __init__(self, message: str, code: int):
        super().__init__(message, code)
        self.code = int(code)

    def __str__(self) -> str:
        return str(self.args[0])


class _Interrupts:
    """What a signal interrupts (set by :func:`train_job`), and signals held back while storing."""

    def __init__(self):
        self.depth = 0  # nesting of interruptible()
        self.defer = 0  # nesting of _storing()
        self.pending: int | None = None
        self.raised = False
        self.population: str | None = None  # the population in training
        self.stored = 0  # networks this process stored
        self.job: str | None = None  # the task of the job running in this process


STATE = _Interrupts()


def _on_signal(signum, frame) -> None:
    if STATE.defer or STATE.raised:  # storing (takes effect afterwards), or already stopping
        STATE.pending = STATE.pending or signum
        return
    STATE.raised = True
    raise JobInterrupted(signum, STATE.population, STATE.stored, STATE.job)


@contextmanager
def interruptible():
    """Within: SIGTERM and SIGINT raise :class:`JobInterrupted`, where the signal has its default
    handler (one that someone else installed, such as submitit's, is kept). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if STATE.depth == 0:
        STATE.__init__()
    previous = {}
    for signum, default in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler)):
        current = signal.getsignal(signum)
        if current in (default, _on_signal):
            previous[signum] = current
            signal.signal(signum, _on_signal)
    STATE.depth += 1
    try:
        yield
    finally:
        STATE.depth -= 1
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def storing():
    """Hold signals back while a population is stored (a message must never call a stored population
    lost); one that arrived meanwhile interrupts right after."""
    STATE.defer += 1
    try:
        yield
    finally:
        STATE.defer -= 1
    if not STATE.defer and STATE.pending and not STATE.raised:
        signum, STATE.pending, STATE.raised = STATE.pending, None, True
        raise JobInterrupted(signum, None, STATE.stored, STATE.job)
