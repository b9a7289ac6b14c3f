"""esam_core: E-SAM (training-free Segment Every Entity Model) on Segment Anything. No ROS here."""

from esam_core.backends.protocol import Decoded, PromptBackend
from esam_core.config import Config, ConfigError, load_config
from esam_core.types import Entity, EntitySegmentation

__all__ = [
    "Config",
    "ConfigError",
    "Decoded",
    "Entity",
    "EntitySegmentation",
    "PromptBackend",
    "load_config",
]
__version__ = "0.1.0"
