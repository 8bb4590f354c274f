"""How both command lines write: rich on a terminal; plain, unwrapped lines anywhere else (a pipe, a file, a log)."""

from __future__ import annotations

from rich.console import Console, ConsoleDimensions

# Width when the stream is not a terminal: wide enough that no line wraps and no table column is cut with "…" (a
# SHA-256, a long path), so what is piped or logged can be searched and parsed line by line.
UNWRAPPED = 1_000_000


class CliConsole(Console):
    """A rich Console that, when its stream is not a terminal, never wraps or cuts a line. The stream is looked up
    at every write (as rich does), so one console follows sys.stdout/sys.stderr when they are replaced."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        return size if self.is_terminal else ConsoleDimensions(UNWRAPPED, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 video', '2 videos', '1,503 videos' (`many`: the plural when it is not word + 's')."""
    return f"{n:,} {word if n == 1 else many or word + 's'}"
