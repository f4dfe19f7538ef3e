"""gradwire: drive a PyTorch model's training step on a remote (GPU) server over gRPC.

    import gradwire
    with gradwire.connect("localhost:50051") as client:
        client.forward(gradwire.Fill.ones(8, 3, 10, 10), gradwire.Fill.ones(8, dtype="int64"))
        client.backward()
        print(client.remote.conv1.weight.grad[0][0][0])

This package is the thin client: it needs grpcio (and its health-checking and status
packages), protobuf and numpy, not torch.
"""

from gradwire.client import Client, connect
from gradwire.credentials import PlaintextTokenWarning, TokenFileWarning
from gradwire.errors import GradwireError, GradwireWarning, RemoteError
from gradwire.fill import Fill
from gradwire.pipeline import Batch, Pending, Pipeline
from gradwire.remote import RemoteModel, RemoteTensor
from gradwire.results import (
    CheckpointInfo,
    ForwardResult,
    Listing,
    LoadedCheckpoint,
    OptimizerConfig,
    SavedCheckpoint,
    ServerInfo,
    ServerLimits,
    SessionInfo,
    SessionListing,
    StepResult,
    TensorInfo,
    TensorRead,
    TrainStepResult,
)

# What watch(), train() and stats() give, for a type-checked caller's annotations as the
# results above (found by a review of the client as a type-checked user's code sees it).
from gradwire.updates import Histogram, Stats, TensorStats, TrainProgress, Watched, WatchUpdate

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "CheckpointInfo",
    "Client",
    "Fill",
    "ForwardResult",
    "GradwireError",
    "GradwireWarning",
    "Histogram",
    "Listing",
    "LoadedCheckpoint",
    "OptimizerConfig",
    "Pending",
    "Pipeline",
    "PlaintextTokenWarning",
    "RemoteError",
    "RemoteModel",
    "RemoteTensor",
    "SavedCheckpoint",
    "ServerInfo",
    "ServerLimits",
    "SessionInfo",
    "SessionListing",
    "Stats",
    "StepResult",
    "TensorInfo",
    "TensorRead",
    "TensorStats",
    "TokenFileWarning",
    "TrainProgress",
    "TrainStepResult",
    "WatchUpdate",
    "Watched",
    "__version__",
    "connect",
]
