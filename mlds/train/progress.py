"""Progress of a sweep across all its jobs: networks done / total and an ETA.

The population sweeper knows the sweep's total before the first job starts and
writes it to ``<sweep dir>/progress.json``. Every job appends one JSON line per
event to ``<sweep dir>/progress.jsonl`` (a single ``O_APPEND`` write, so jobs
of any launcher -- in-process, joblib, SLURM on a shared file system -- can
share it): the networks it found already stored, and each population it
trained. Each job reads the lines the others wrote, so every finished
population logs one line with the sweep-wide count and ETA; a sweep whose
jobs run in other processes (all local cores, SLURM) shows one live display
in its own terminal (:class:`SweepDisplay`: each population's line, then one
bar for the whole sweep); and ``scripts/status.py --sweep DIR [--watch]`` shows
the bar from another terminal.

"done" counts networks of the sweep that are in the store: trained by this
sweep, or found already stored by a job that has started. ETA = networks not
yet done / this sweep's training rate (networks trained since its first
population started, all jobs together). Jobs that have not started yet have
not reported what they will skip, so after a resume the ETA starts high and
falls as they do.
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

TOTAL_FILE = "progress.json"
EVENTS_FILE = "progress.jsonl"


def start_sweep(sweep_dir: str | os.PathLike, total: int, jobs: int) -> Path:
    """Record a sweep's expected total (called by the sweeper before any job runs)."""
    folder = Path(sweep_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / EVENTS_FILE).write_text("")
    tmp = folder / f".{TOTAL_FILE}.tmp"
    tmp.write_text(json.dumps({"total": int(total), "jobs": int(jobs), "started": time.time()}))
    os.replace(tmp, folder / TOTAL_FILE)
    return folder


@dataclass
class Snapshot:
    total: int
    done: int
    stored: int      # found already in the store
    trained: int     # trained by this sweep
    populations: int
    rate: float | None   # networks trained per second
    elapsed: float

    @property
    def eta(self) -> float | None:
        left = max(self.total - self.done, 0)
        if left == 0:
            return 0.0
        return left / self.rate if self.rate else None

    @property
    def fraction(self) -> float:
        return min(self.done / self.total, 1.0) if self.total else 1.0


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "--:--:--"
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{hours}:{minutes:02d}:{secs:02d}"


def bar(fraction: float, width: int = 24) -> str:
    full = int(round(fraction * width))
    return "█" * full + "░" * (width - full)


class SweepProgress:
    """Shared progress of one sweep (or, outside a sweep, of one job: in memory)."""

    def __init__(self, folder: str | os.PathLike | None, total: int, started: float | None = None):
        self.folder = Path(folder) if folder else None
        self.total = int(total)
        self.started = started if started is not None else time.time()
        self._pos = 0
        self._stored = self._trained = self._populations = 0
        self._first_train: float | None = None
        self._last_trained: float | None = None
        self.messages: list[str] = []  # lines the jobs sent with their events, not yet taken

    @classmethod
    def open(cls, sweep_dir: str | os.PathLike) -> SweepProgress | None:
        """The progress of a sweep folder, if its sweeper recorded one."""
        folder = Path(sweep_dir)
        try:
            info = json.loads((folder / TOTAL_FILE).read_text())
        except (OSError, ValueError):
            return None
        return cls(folder, info["total"], info.get("started"))

    @classmethod
    def for_job(cls, n_seeds: int) -> SweepProgress:
        """The sweep's shared progress when running inside a Hydra multirun whose sweeper recorded a
        total, else this job's own."""
        try:
            from hydra.core.hydra_config import HydraConfig
            from hydra.types import RunMode

            hc = HydraConfig.get()
            if hc.mode == RunMode.MULTIRUN:
                folder = Path(hc.sweep.dir)
                if not folder.is_absolute():
                    folder = Path(hc.runtime.cwd) / folder
                found = cls.open(folder)
                if found is not None:
                    return found
        except (ImportError, ValueError, AttributeError):
            pass
        return cls(None, n_seeds)

    def record(self, event: str, n: int, message: str | None = None) -> None:
        """``event``: ``stored`` (found in the store), ``start`` (training begins), ``trained``;
        ``message``: a line for the sweep's display."""
        line = {"event": event, "n": int(n), "t": time.time(), "pid": os.getpid()}
        if message:
            line["message"] = message
        if self.folder is None:
            self._apply(line)
            return
        data = (json.dumps(line) + "\n").encode()
        fd = os.open(self.folder / EVENTS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def _apply(self, line: dict) -> None:
        event, n = line.get("event"), int(line.get("n", 0))
        if line.get("message"):
            self.messages.append(str(line["message"]))
        if event == "stored":
            self._stored += n
        elif event == "trained":
            self._trained += n
            self._populations += 1
            self._last_trained = float(line.get("t", time.time()))
        elif event == "start":
            t = float(line.get("t", time.time()))
            self._first_train = t if self._first_train is None else min(self._first_train, t)

    def _read(self) -> None:
        if self.folder is None:
            return
        try:
            with open(self.folder / EVENTS_FILE, "rb") as stream:
                stream.seek(self._pos)
                data = stream.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1  # a line being written is read next time
        for raw in data[:end].splitlines():
            try:
                self._apply(json.loads(raw))
            except ValueError:
                pass
        self._pos += end

    def snapshot(self) -> Snapshot:
        self._read()
        now = time.time()
        done = min(self._stored + self._trained, self.total) if self.total else self._stored + self._trained
        until = self._last_trained if done >= self.total and self._last_trained else now
        rate = None
        if self._trained and self._first_train is not None and until > self._first_train:
            rate = self._trained / (until - self._first_train)
        return Snapshot(self.total, done, self._stored, self._trained, self._populations, rate, now - self.started)

    def line(self) -> str:
        """``sweep 14/20 networks (70%) ███████░░ 3.1 networks/s, ETA 0:00:02``."""
        s = self.snapshot()
        scope = "sweep" if self.folder else "job"
        rate = f"{s.rate:.2f} networks/s" if s.rate else "rate unknown"
        return (f"{scope} {s.done}/{s.total} networks ({100 * s.fraction:.0f}%) {bar(s.fraction)} "
                f"{rate}, ETA {format_seconds(s.eta)}")


class SweepDisplay:
    """One live display of a sweep in the terminal that launched it: every line the jobs send
    (one per population), then a bar for the whole sweep (networks done / total, rate, ETA),
    refreshed from the sweep's events until :meth:`stop`. Runs in a thread of the launching process."""

    def __init__(self, sweep_dir: str | os.PathLike, interval: float = 1.0):
        self.folder, self.interval = Path(sweep_dir), interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "SweepDisplay":
        self._thread = threading.Thread(target=self._run, name="mlds-sweep-display", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        progress = SweepProgress.open(self.folder)
        if progress is None:
            return
        columns = [TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(), TextColumn("networks"),
                   TextColumn("{task.fields[rate]}"), TextColumn("ETA {task.fields[eta]}")]
        with Progress(*columns, console=Console(stderr=True), auto_refresh=False) as bar:
            task = bar.add_task("sweep", total=progress.total, rate="", eta="")
            while True:
                stopping = self._stop.is_set()
                s = progress.snapshot()
                for message in progress.messages:
                    bar.console.print(message, highlight=False)
                progress.messages.clear()
                bar.update(task, completed=s.done, rate=f"{s.rate:.2f} networks/s" if s.rate else "-",
                           eta=format_seconds(s.eta))
                bar.refresh()
                if stopping:
                    break
                self._stop.wait(self.interval)

