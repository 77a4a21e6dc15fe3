"""SIGTERM and SIGINT become a checkpoint at a step every process agrees on.

A preempted TPU VM gets SIGTERM, then some seconds before it goes. With
several processes, JAX's distributed runtime catches SIGTERM itself and
agrees with the other processes on the step at which all of them save
(`multihost_utils.reached_preemption_sync_point`, which orbax's
`reached_preemption` asks); SIGINT is turned into a SIGTERM to join that
protocol. A single process has no such runtime (`jax.distributed` is not
initialised), so a Python handler notes the signal and the next step saves.
A second SIGINT interrupts at once, without saving.
"""

import logging
import os
import signal
import threading

import jax


class Preempted(Exception):  # noqa: N818 (an outcome, like KeyboardInterrupt)
  """Training stopped on a signal after saving the checkpoint at `step`."""

  def __init__(self, step):
    super().__init__(f"stopped by a signal at step {step}; its checkpoint is saved")
    self.step = step


class Watcher:
  """`reached(step)` is True at the step where every process should save and stop."""

  def __init__(self, mgr):
    self._mgr, self._signalled = mgr, False
    self._multi, self._old = jax.process_count() > 1, {}
    if threading.current_thread() is not threading.main_thread():
      return  # Python takes signals on the main thread only: leave them as they are
    self._old[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
    if not self._multi:  # with jax.distributed, its runtime handles SIGTERM
      self._old[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):
    del frame
    logging.warning("%s received: saving a checkpoint after this step.",
                    signal.Signals(signum).name)
    self._signalled = True

  def _on_sigint(self, signum, frame):
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: stop now
    if self._multi:
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's handler, which tells the others
    else:
      self._on_signal(signum, frame)

  def reached(self, step):
    # Every process asks at every step (the sync protocol needs it), even once signalled.
    return self._mgr.reached_preemption(step) if self._multi else self._signalled

  def close(self):
    for signum, handler in self._old.items():
      signal.signal(signum, handler)
