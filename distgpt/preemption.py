"""Preemption: SIGTERM and SIGUSR1 end a run cleanly instead of killing it.

Slurm sends SIGUSR1 ahead of a job's time limit when asked (`--signal=USR1@120`) and SIGTERM when
it preempts or cancels a job (SIGKILL follows after KillWait, 30 s by default). Inside `train`,
either signal only leaves a note here; the trainer folds the note into the loss all-reduce every
step already does (a second element: how many ranks were signalled), so a signal that reached
only some ranks still stops every rank after the same step, with no extra collective and no
extra host sync. Every rank then finishes that step, writes a checkpoint and exits with
PREEMPTED_EXIT_CODE; `resume=auto` continues bitwise where it stopped.

The handlers are installed for the training loop only and the previous ones restored after, so
importing distgpt (or running eval, bench, sample) changes no signal handling. SIGINT (Ctrl-C)
keeps Python's KeyboardInterrupt.
"""
import signal
import threading

# EX_TEMPFAIL in sysexits.h, "a temporary failure; the user is invited to retry": the job stopped
# with a checkpoint and should be run (requeued) again. launch/slurm.sbatch requeues on it.
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """While entered, SIGTERM and SIGUSR1 set `received` (the first one's name) and nothing else."""

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        # Python runs signal handlers in the main thread only, and may install them only there;
        # a trainer driven from another thread (an embedding program) keeps its process's handling
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._note) for sig in STOP_SIGNALS}
        return self

    def _note(self, signum, frame):
        if self.received is None:
            self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False
