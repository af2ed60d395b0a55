"""One typed config tree: YAML files plus dotted command-line overrides, validated up front.

`load_config("configs/local/diffmoe-tiny.yaml", ["model.depth=6", "optim.lr=3e-4"])` returns a
`Config`; `validate()` raises `ConfigError` with one line naming the field, the value and the fix,
before any process group or model is built. The bottom layer: it imports nothing else of
diffmoe_dist. Modules: `options` (the value lists, declared once, and ConfigError), `schema` (the
dataclasses), `validate` (the checks), `load` (YAML, overrides, checkpoint copies).
"""

from diffmoe_dist.config.load import REMOVED_FIELDS, config_from_dict, load_config, save_config
from diffmoe_dist.config.options import (
    ADAMW_IMPLS,
    BACKENDS,
    DENSE_ROUTER,
    DEVICES,
    GRAD_REDUCE_DTYPES,
    INFERENCE_MODES,
    LOADERS,
    MFU_PEAK_WORDS,
    MODEL_SIZES,
    POOLS,
    PRECISIONS,
    RESUME_WORDS,
    ROUTER_CHOICES,
    ROUTERS,
    SAMPLERS,
    TASKS,
    WANDB_MODES,
    ZERO_STAGES,
    ConfigError,
)
from diffmoe_dist.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    ParallelConfig,
    SampleConfig,
    TrainConfig,
)
from diffmoe_dist.config.validate import deepspeed_config_path

__all__ = [
    "ADAMW_IMPLS",
    "BACKENDS",
    "DENSE_ROUTER",
    "DEVICES",
    "GRAD_REDUCE_DTYPES",
    "INFERENCE_MODES",
    "LOADERS",
    "MFU_PEAK_WORDS",
    "MODEL_SIZES",
    "POOLS",
    "PRECISIONS",
    "REMOVED_FIELDS",
    "RESUME_WORDS",
    "ROUTER_CHOICES",
    "ROUTERS",
    "SAMPLERS",
    "TASKS",
    "WANDB_MODES",
    "ZERO_STAGES",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "MoEConfig",
    "OptimConfig",
    "ParallelConfig",
    "SampleConfig",
    "TrainConfig",
    "config_from_dict",
    "deepspeed_config_path",
    "load_config",
    "save_config",
]
