"""gradwire's server: a PyTorch model's training step behind the gradwire.v1.Trainer service."""

from gradwire_server.trainer import OptimizerSettings, Trainer

__all__ = ["OptimizerSettings", "Trainer"]
