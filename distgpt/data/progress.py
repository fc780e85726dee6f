"""A one-line progress report for `distgpt prepare`: bar, documents, tokens, tokens/s, ETA.

On a terminal the line is redrawn in place a few times a second; into a file or a pipe (a batch
job's log) a plain line is printed every `log_every_s` seconds instead, so logs stay readable.
The ETA comes from input bytes read against the total: tokens per byte is roughly constant
within a corpus, and bytes are known before the first document is read.
"""
import sys
import time

from distgpt.logging import format_duration

BAR_WIDTH = 24
REDRAW_S = 0.2


class Progress:
    def __init__(self, total_bytes, stream=None, enabled=True, log_every_s=60.0, clock=time.monotonic):
        self.total = max(total_bytes, 1)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = REDRAW_S if self.tty else log_every_s
        self.clock = clock
        self.start = self.last = clock()
        self.bytes = self.docs = self.tokens = 0
        self.drawn = False  # a terminal line is open, to end before anything else is printed
        self.width = 0  # the longest line drawn so far

    def update(self, n_bytes, n_docs, n_tokens):
        self.bytes += n_bytes
        self.docs += n_docs
        self.tokens += n_tokens
        if self.enabled and self.clock() - self.last >= self.every:
            self._show()

    def close(self, finished=True):
        """The final state (unless the run failed: its error is then the one line to read), then a
        newline on a terminal so what follows starts on its own line."""
        if finished and self.enabled:
            self._show()
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False

    def elapsed(self):
        return self.clock() - self.start

    def line(self):
        done = min(self.bytes / self.total, 1.0)
        elapsed = self.elapsed()
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        eta = elapsed * (1 - done) / done if done > 0 else None
        filled = int(done * BAR_WIDTH)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        return (f"tokenizing {done:6.1%} [{bar}] {self.docs:,} docs, {self.tokens:,} tokens, "
                f"{rate / 1e6:.2f}M tokens/s, elapsed {format_duration(elapsed)}, ETA {format_duration(eta)}")

    def _show(self):
        self.last = self.clock()
        if self.tty:  # redraw in place; the padding wipes what a longer earlier line left behind
            line = self.line()
            self.width = max(self.width, len(line))
            self.stream.write("\r" + line.ljust(self.width))
            self.drawn = True
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()
