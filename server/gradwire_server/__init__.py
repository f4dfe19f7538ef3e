"""gradwire's server: a PyTorch model's training step behind the gradwire.v1.Trainer service."""

from gradwire_server.optimizers import OptimizerSettings
from gradwire_server.trainer import Trainer

__all__ = ["OptimizerSettings", "Trainer"]
