"""The domain of the AI Model Service: entities, errors, ports, the model service and use cases.

Pure Python: nothing here imports torch, transformers or bentoml.
"""

from .catalog import CatalogEntry, ModelCatalog
from .commands import Classify, CompletePrompt, GenerateText, GenerationOptions, LoadModel, OptimizeMemory, UnloadModel
from .errors import (
    DeviceNotAvailableError,
    EngineUnavailableError,
    ExternalModelError,
    GenerationError,
    GenerationTimeoutError,
    InsufficientMemoryError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelNotLoadedError,
    ModelServiceError,
    ModelUnloadingError,
    OverloadedError,
    ProviderError,
    ProviderUnavailableError,
    error_from_type,
    raise_if_error,
)
from .generation import (
    ChatMessage,
    ClassifyParams,
    Decision,
    Generation,
    GenerationLimits,
    GenerationParams,
    GuidedDecoding,
    Prompt,
    TextDelta,
    TokenLogprob,
)
from .model import Model
from .ports import ModelRepository, SystemMonitor
from .prompt import PromptBuilder
from .response_cache import LruResponseCache, ResponseCache, response_key
from .services import ModelService
from .use_cases import GenerateTextUseCase

__all__ = [
    "CatalogEntry",
    "ChatMessage",
    "Classify",
    "ClassifyParams",
    "CompletePrompt",
    "Decision",
    "DeviceNotAvailableError",
    "ExternalModelError",
    "GenerateText",
    "GenerateTextUseCase",
    "Generation",
    "GenerationError",
    "GenerationLimits",
    "GenerationOptions",
    "GenerationParams",
    "GuidedDecoding",
    "GenerationTimeoutError",
    "InsufficientMemoryError",
    "InvalidRequestError",
    "LruResponseCache",
    "LoadModel",
    "Model",
    "ModelCatalog",
    "ModelNotFoundError",
    "ModelNotLoadedError",
    "ModelRepository",
    "ModelService",
    "ModelServiceError",
    "ModelUnloadingError",
    "OptimizeMemory",
    "OverloadedError",
    "EngineUnavailableError",
    "Prompt",
    "PromptBuilder",
    "ProviderError",
    "ProviderUnavailableError",
    "ResponseCache",
    "SystemMonitor",
    "TextDelta",
    "TokenLogprob",
    "UnloadModel",
    "error_from_type",
    "raise_if_error",
    "response_key",
]
