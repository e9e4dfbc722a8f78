"""How a run stops before its end, shared by both frameworks' training loops: a signal turned
into a flag the loop checks (`SignalFlag`), and the two early outcomes a caller sees as
exceptions (`Preempted`, `Diverged`; the CLI maps them to exit codes 143 and 3).
"""

import signal
from typing import Optional

from absl import logging


class Preempted(Exception):
    """SIGTERM/SIGINT arrived (or a stop was requested); a checkpoint was saved."""


class Diverged(Exception):
    """A non-finite loss appeared."""


class SignalFlag:
    """Turns SIGTERM/SIGINT into a flag the loop checks after every chunk of steps.

    Further signals while stopping (a second Ctrl-C during the checkpoint save), and any signal
    once training is done and the results are being written, only log one line: the work in
    hand always completes, so nothing half-written is left behind. A signal that arrived too
    late to stop training still stops the process once the results are written
    (`stop_if_received`), so that a grid does not start its next trial.
    """

    def __init__(self, stopping: str = "stopping after the current chunk of steps, with a "
                 "checkpoint"):
        self.stopping = stopping  # what the first signal's log line says happens next
        self.received: Optional[int] = None
        self.received_by: Optional[str] = None  # set when another process got the signal
        self.finishing = False  # training is done; the results are being written
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, the run is not pre-emptible
                pass
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.finishing:
            self.received = self.received or signum
            logging.warning("%s: training is done; the run stops once its results are "
                            "written (a few seconds).", name)
            return
        if self.received is not None:
            logging.warning("%s again: already stopping; the checkpoint is being completed so "
                            "that the run can resume exactly.", name)
            return
        self.received = signum
        logging.warning("Received %s: %s.", name, self.stopping)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def stop_if_received(self) -> None:
        """Raises Preempted for a signal that came after the last chance to stop training."""
        if self.received is not None:
            raise Preempted(f"Stopped by {signal.Signals(self.received).name} once training "
                            "had finished: the results are written, nothing is left to resume.")
