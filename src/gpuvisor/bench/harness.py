"""What every scheduling benchmark runs in: progress Reporter, run_and_report, hold, workdir."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from gpuvisor.bench.loadgen import write_json

__all__ = ["Reporter", "hold", "progress_reporter", "workdir"]


class Reporter:
    """Says what a benchmark is doing; the base class says nothing (tests, library use)."""

    def phase(self, description: str, total: float | None = None) -> None:
        pass

    def advance(self, done: float = 1) -> None:
        pass


class _RichReporter(Reporter):
    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = progress.add_task("starting", total=None)

    def phase(self, description: str, total: float | None = None) -> None:
        self.progress.reset(self.task, description=description, total=total, completed=0)

    def advance(self, done: float = 1) -> None:
        self.progress.advance(self.task, done)


@contextmanager
def progress_reporter(console: Console) -> Iterator[Reporter]:
    """A transient rich progress bar behind the Reporter interface."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        yield _RichReporter(progress)


class BenchReport(Protocol):
    """What every scheduling benchmark's report offers: its run time and its JSON."""

    seconds: float

    def to_json(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=BenchReport)


def run_and_report(
    console: Console,
    output: Path,
    run: Callable[[Reporter], R],
    render: Callable[[R, Console], None],
) -> R:
    """Run a benchmark behind a progress bar, print its report and write its JSON to ``output``."""
    with progress_reporter(console) as reporter:
        report = run(reporter)
    render(report, console)
    write_json(output, report.to_json())
    console.print(f"results written to {output} ({report.seconds:.0f}s)", highlight=False)
    return report


def hold(seconds: float, reporter: Reporter, step: float = 0.25) -> None:
    """Sleep ``seconds``, advancing ``reporter`` by the seconds that passed."""
    end = time.perf_counter() + seconds
    while (left := end - time.perf_counter()) > 0:
        time.sleep(min(step, left))
        reporter.advance(min(step, left))


@contextmanager
def workdir(path: Path | None) -> Iterator[Path]:
    """``path`` when given, else a temporary directory removed on exit."""
    with ExitStack() as stack:
        if path is not None:
            path.mkdir(parents=True, exist_ok=True)
            yield path
        else:
            yield Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpuvisor-bench-")))
