"""How `affextract run` shows its progress on stderr: a live display on a terminal, a plain line every few seconds
otherwise (logs, jobs), drawn from the events `extract` reports (extract.ExtractEvent)."""

from __future__ import annotations

import sys
import time

from affextract.extract import ExtractEvent, FramesAnalysed, RunEnded, RunStarted, VideoEnded, VideoOpened


class RunProgress:
    """`extract`'s on_event, used as a context manager around the call so that a live display stops however the call
    ends.

    Work is counted in bytes of the videos to do, known before any video is opened, so the time left is sound from the
    start. A video's frame count is known once it is opened; until every video has been, the frame total is a lower
    bound, shown with "≥".
    """

    def __init__(self, every: float):
        if every < 0:
            raise ValueError(f"seconds between progress lines must be >= 0, got {every}")
        self.every = every
        self.sizes: tuple[int, ...] = ()
        self.live = None

    def __enter__(self) -> RunProgress:
        return self

    def __exit__(self, *exc) -> None:
        self._stop_live(*exc)

    def __call__(self, event: ExtractEvent) -> None:
        match event:
            case RunStarted(sizes=sizes):
                self._start(sizes)
            case VideoOpened(index=i, frames=frames):
                self._opened(i, frames)
            case FramesAnalysed(index=i, frames=n):
                self.done[i] += n
                self.frames += n
                self._show()
            case VideoEnded(index=i, failed=failed):
                self.failed += failed
                self._ended(i)
            case RunEnded(complete=complete):
                if self.live is not None:
                    self._stop_live(None, None, None)
                elif complete:
                    self._print(force=True)

    def _start(self, sizes: tuple[int, ...]) -> None:
        self.sizes = sizes
        self.total_bytes = max(sum(sizes), 1)
        self.done_bytes = 0.0  # of videos that ended
        self.ended_videos = 0
        self.failed = 0  # videos among them that could not be analysed
        self.announced: dict[int, int] = {}  # frames each open video will bring
        self.done: dict[int, int] = {}  # frames analysed of each open video
        self.frames = 0  # analysed so far
        self.frames_total = 0  # announced by the videos opened so far, less what broken videos did not bring
        self.known = 0  # videos whose frame count is known (opened, or failed before opening)
        self.t0 = time.monotonic()
        self.printed = -float("inf")
        self.last = ""
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            # On stderr, the stream the terminal test looked at: stdout stays free for what a command prints.
            self.live = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(), transient=False, console=Console(stderr=True))
            self.task = self.live.add_task(self._summary(), total=self.total_bytes)
            self.live.__enter__()

    def _stop_live(self, *exc) -> None:
        if self.live is not None:
            live, self.live = self.live, None
            live.__exit__(*exc)

    def _opened(self, i: int, frames: int) -> None:
        if i in self.announced:  # decoding starts over: its frames are analysed again
            self.frames_total -= self.announced[i]
            self.frames -= self.done[i]
            self.known -= 1
        self.announced[i], self.done[i] = frames, 0
        self.frames_total += frames
        self.known += 1
        self._show()

    def _ended(self, i: int) -> None:
        if i in self.announced:
            self.frames_total -= self.announced.pop(i) - self.done.pop(i)  # a broken stream brings fewer frames
        else:
            self.known += 1
        self.ended_videos += 1
        self.done_bytes += self.sizes[i]
        self._show()

    def _work(self) -> float:
        """Bytes done, counting each open video's share of frames analysed."""
        return self.done_bytes + sum(self.sizes[i] * self.done[i] / max(n, 1) for i, n in self.announced.items())

    def _summary(self) -> str:
        bound = "≥" if self.known < len(self.sizes) else ""
        failed = f" ({self.failed} failed)" if self.failed else ""
        return (f"{self.ended_videos}/{len(self.sizes)} videos{failed}, "
                f"{self.frames:,}/{bound}{self.frames_total:,} frames")

    def _show(self) -> None:
        if self.live is not None:
            self.live.update(self.task, completed=self._work(), description=self._summary())
        else:
            self._print()

    def _print(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.printed < self.every:
            return
        elapsed = now - self.t0
        work = self._work() / self.total_bytes
        left = f", about {_clock(elapsed * (1 - work) / work)} left" if 0 < work < 1 else ""
        line = (f"progress: {self._summary()}, {self.frames / max(elapsed, 1e-9):,.1f} frames/s, "
                f"{_clock(elapsed)} elapsed{left}")
        if force and line.split(", ")[:2] == self.last.split(", ")[:2]:
            return  # nothing new since the last line
        print(line, file=sys.stderr, flush=True)
        self.printed, self.last = now, line


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
