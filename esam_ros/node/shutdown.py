"""How an E-SAM node process ends: bounded, and never with an abort.

After Ctrl-C or SIGTERM (rclpy's handlers stop the executor) ``bounded_stop`` cancels the frame in
flight, which stops at its next stage boundary, and waits at most ``shutdown_timeout_s`` for it.
A second SIGINT/SIGTERM meanwhile, or a frame that does not stop in time (the encoder cannot be
interrupted), ends the process at once with ``os._exit``: a daemon thread still inside torch when
the interpreter finalises is what makes a plain exit abort ("terminate called without an active
exception", exit -6), and nothing is left to save at that point.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import rclpy.signals


def exit_now(code: int = 0) -> None:
    """Flush the logs and leave without finalising the interpreter (no thread can abort it)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _second_signal(logger: Any) -> None:
    """From now on SIGINT or SIGTERM exits at once (rclpy's handlers would ignore them)."""
    def handler(signum: int, _frame: Any) -> None:
        logger.warning(f"{signal.Signals(signum).name} again: exiting now, without waiting "
                       f"for the frame in flight")
        exit_now(0)

    rclpy.signals.uninstall_signal_handlers()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def bounded_stop(node: Any, logger: Any) -> None:
    """Stop ``node``'s worker within its ``shutdown_timeout_s`` (main thread only), else exit 0.

    ``node`` is an ``EsamRuntime`` node; a lifecycle node that was never configured has no
    worker and returns at once.
    """
    _second_signal(logger)
    timeout = float(getattr(node, "params", {}).get("shutdown_timeout_s", 3.0))
    if not node._stop_worker(timeout=timeout):
        logger.warning(f"the frame in flight did not stop within shutdown_timeout_s = "
                       f"{timeout:.1f} s: exiting without it")
        exit_now(0)
