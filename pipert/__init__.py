"""pipert: a real-time pipeline daemon for video and sensor analytics."""
from .api import APIWrapper
from .errors import BuildError, ClusterError, EventError, PipeError, TransportError
from .events import KILL_EVENT_NAME, START_EVENT_NAME, STOP_EVENT_NAME, events
from .frames import FrameFilter
from .log import PIPE_INFRASTRUCTURE
from .params import Param, ParamError
from .pipe import EventResult, Pipe
from .pipeline_file import PipelineFileError, check_pipeline, load_pipeline
from .registry import RegistryError, register
from .routine import DestinationRoutine, MiddleRoutine, Routine, SourceRoutine
from .rpc import RPCPipeWrapper
from .socket_logger import get_socket_logger
from .wire import Wire

__all__ = [
    "APIWrapper", "BuildError", "ClusterError", "DestinationRoutine", "EventError", "EventResult", "FrameFilter",
    "KILL_EVENT_NAME", "MiddleRoutine", "PIPE_INFRASTRUCTURE", "Param", "ParamError", "Pipe", "PipeError",
    "PipelineFileError", "RPCPipeWrapper", "RegistryError", "Routine", "START_EVENT_NAME", "STOP_EVENT_NAME",
    "SourceRoutine", "TransportError", "Wire", "check_pipeline", "events", "get_socket_logger", "load_pipeline",
    "register",
]
