"""restorenet: fused-kernel backend and reference models for adaptive image restoration."""
from restorenet.registry import count_parameters, create_model, list_models, register_model
from restorenet import ops
from restorenet.training.checkpoint import load_model

__version__ = "0.1.0"
__all__ = ["count_parameters", "create_model", "list_models", "load_model", "register_model", "ops",
           "__version__"]
