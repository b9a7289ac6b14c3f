"""esam_lifecycle_node: esam_node as a managed (lifecycle) node, for GPU robots that want the
video memory back while segmentation is not needed (rclpy.lifecycle; Humble, Jazzy, Kilted).

Once active it is esam_node: same name (``esam_node``, so the same parameter files apply), same
parameters, topics, diagnostics and code (``esam_ros.node.runtime``). The transitions
(``ros2 lifecycle set /esam_node configure``, or a lifecycle manager):

    configure   declare and validate the parameters, load the model. Invalid parameters: FAILURE,
                the node stays unconfigured. A missing checkpoint (or an unusable model.device):
                ERROR, with the path tried and how to get the file logged; error processing
                releases everything and the node ends unconfigured.
    activate    load the model again if a deactivate released it (FAILURE, staying inactive, if
                that fails), then subscribe, advertise, start /diagnostics and the worker.
    deactivate  stop the worker (a frame in flight finishes), destroy the subscriptions and
                publishers, release the model and empty the CUDA cache. An inactive node holds
                no model memory and receives no images; the cost is one model load on the next
                activate (a few seconds for vit_h from the page cache). Track ids restart there.
    cleanup     as deactivate, and forget cameras and counters; configure re-reads the
                parameters (read-only ones keep the values the process started with).
    shutdown    from any state: as cleanup.

The model is released on *deactivate*, not only on cleanup: deactivate is how a lifecycle manager
pauses a node, and the point is to free VRAM exactly then. Parameters changed while inactive
apply from the next frame after activate, like any run-time change.

Parameter ``autostart`` (default true, read-only): configure and activate at start, so a plain
``ros2 run esam_ros esam_lifecycle_node`` serves like esam_node; if either transition fails, the
error is logged and the process exits with code 1. Under a lifecycle manager set it false.
"""

from __future__ import annotations

import sys
import traceback
from typing import Any

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.exceptions import InvalidParameterTypeException
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from esam_core.backends.checkpoints import CheckpointError
from esam_core.config import ConfigError
from esam_ros.node.params import help_requested, usage_text, watch_parameters
from esam_ros.node.runtime import EsamRuntime, StartupError, run
from esam_ros.node.stats import memory_mb

NODE_NAME = "esam_node"  # esam_node's name: its parameter files apply unchanged
EXECUTABLE = "esam_lifecycle_node"
SUCCESS, FAILURE, ERROR = (TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE,
                           TransitionCallbackReturn.ERROR)


class EsamLifecycleNode(EsamRuntime, LifecycleNode):
    """The E-SAM node as a lifecycle node; see the module docstring for the transitions.

    Attributes:
        autostarted: None without ``autostart``, else whether configure and activate succeeded.
        last_error: the message of the last failed transition ('' if none).
    """

    def __init__(self, params_files: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **{"allow_undeclared_parameters": True, **kwargs})
        self._init_runtime(params_files, kwargs.get("cli_args"))
        self._watching_params = False
        self.last_error = ""
        self.autostarted: bool | None = None
        try:
            autostart = self.declare_parameter("autostart", True, ParameterDescriptor(
                name="autostart", read_only=True, description="configure and activate at "
                "start (false: wait for lifecycle transitions)")).value
        except InvalidParameterTypeException as exc:
            self.destroy_node()
            raise ConfigError(f"parameter 'autostart': {exc}".removesuffix(": autostart")) \
                from None
        if autostart:
            self.autostarted = (self.trigger_configure() == SUCCESS
                                and self.trigger_activate() == SUCCESS)

    # --- transitions (run by the executor, like the ChangeState service that asks for them) ---

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._declare()
            if not self._watching_params:  # after declaring: declaring calls the callback too
                watch_parameters(self, self._on_set_parameters)
                self._watching_params = True
            self._load_model()
        except ConfigError as exc:
            self._teardown()
            return self._failed("configure", f"invalid configuration: {exc}", FAILURE)
        except (CheckpointError, ValueError) as exc:  # path tried and how to get the file
            return self._failed("configure", str(exc), ERROR)  # on_error releases
        except Exception:
            return self._failed("configure", traceback.format_exc(), ERROR)
        self.get_logger().info(f"configured: {self._ready_text()}; activate to serve")
        return SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            if self.segmenter is None:  # released by deactivate
                self._load_model()
        except (CheckpointError, ValueError) as exc:  # e.g. the file went away meanwhile
            return self._failed("activate", str(exc), FAILURE)
        except Exception:
            return self._failed("activate", traceback.format_exc(), FAILURE)
        try:
            self._start_io()
        except Exception:
            self._stop_io()
            return self._failed("activate", traceback.format_exc(), ERROR)
        self.get_logger().info(f"active; ready: {self._ready_text()}")  # as esam_node
        return SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_io()
        self._release_model()
        self.get_logger().info(f"inactive: no subscriptions, model released ({self._memory()})")
        return SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        self.get_logger().info("unconfigured: everything released")
        return SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        return SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        """After an ERROR: release everything and go back to unconfigured (configure may retry)."""
        self._teardown()
        return SUCCESS

    # --- helpers ------------------------------------------------------------------------------

    def _failed(self, transition: str, text: str, code: TransitionCallbackReturn
                ) -> TransitionCallbackReturn:
        self.last_error = text
        self.get_logger().error(f"{transition} failed: {text}")
        return code

    def _teardown(self) -> None:
        """Stop and destroy what activate made, release the model, forget the cameras."""
        self._stop_io()
        if self.segmenter is not None:
            self._release_model()
        self.cameras = {}

    def _memory(self) -> str:
        if self.device.startswith("cuda"):
            return f"CUDA memory allocated now {memory_mb(self.device):.1f} MB"
        return f"process resident {memory_mb(self.device):.0f} MB"

    def destroy_node(self) -> None:
        """Stop the worker (a frame in flight finishes) and release the model, then destroy."""
        if getattr(self, "_stop", None) is not None:
            self._stop_worker()
            if self.segmenter is not None:
                self._release_model()
        super().destroy_node()


def _make_node(**kwargs: Any) -> EsamLifecycleNode:
    node = EsamLifecycleNode(**kwargs)
    if node.autostarted is False:
        node.destroy_node()
        raise StartupError("autostart: the node did not become active (the error above); "
                           "exiting")
    return node


def main(args: list[str] | None = None) -> int:
    """``esam_lifecycle_node [--ros-args ...]``: 0 on a normal stop, 1 on a start-up error;
    ``--help`` prints the usage and every parameter without starting a node."""
    if help_requested(sys.argv[1:] if args is None else args):
        print(usage_text(EXECUTABLE, __doc__))
        return 0
    return run(_make_node, NODE_NAME, args)


if __name__ == "__main__":
    sys.exit(main())
