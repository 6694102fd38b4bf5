"""Typed, frozen configuration for the model, with the paper's presets and strict loading.

Every field has one meaning and one place. Loading from a dict or TOML rejects unknown keys with a
message that lists the valid ones, so a typo never silently falls back to a default.

Import every name from here (`from tformer.config import DecodeConfig`); the modules behind it are
`model` (ModelConfig, the presets), `decode` (DecodeConfig), `experiment` (DataConfig, TrainConfig,
ExperimentConfig and their loading), `loading` (any config from a dict, TOML files, `--set`) and
`checks` (ConfigError and the value checks every config runs). The recipes' TOML files are in
`tformer/configs/`, not here.
"""

from tformer.config.checks import (
    UNLIMITED_BY_INF,
    ConfigError,
    check_choices,
    check_finite,
    check_int64,
    check_types,
)
from tformer.config.decode import DecodeConfig, LengthNormalization
from tformer.config.experiment import (
    BLEU_TOKENIZE,
    EXPERIMENT_SECTIONS,
    BleuTokenize,
    CompileMode,
    DataConfig,
    ExperimentConfig,
    Precision,
    ScheduleName,
    StopMetric,
    TokenizerModel,
    TrainConfig,
    apply_overrides,
    expand_preset,
    experiment_from_dict,
    experiment_to_dict,
    load_experiment,
    override_list,
    set_key,
)
from tformer.config.loading import (
    config_from_dict,
    config_to_dict,
    field_names,
    load_toml,
    parse_override,
)
from tformer.config.model import (
    PRESETS,
    Activation,
    ModelConfig,
    NormPosition,
    PositionalEncoding,
    SinusoidalLayout,
    preset,
    preset_of,
)

__all__ = [
    "BLEU_TOKENIZE",
    "EXPERIMENT_SECTIONS",
    "PRESETS",
    "UNLIMITED_BY_INF",
    "Activation",
    "BleuTokenize",
    "CompileMode",
    "ConfigError",
    "DataConfig",
    "DecodeConfig",
    "ExperimentConfig",
    "LengthNormalization",
    "ModelConfig",
    "NormPosition",
    "PositionalEncoding",
    "Precision",
    "ScheduleName",
    "SinusoidalLayout",
    "StopMetric",
    "TokenizerModel",
    "TrainConfig",
    "apply_overrides",
    "check_choices",
    "check_finite",
    "check_int64",
    "check_types",
    "config_from_dict",
    "config_to_dict",
    "expand_preset",
    "experiment_from_dict",
    "experiment_to_dict",
    "field_names",
    "load_experiment",
    "load_toml",
    "override_list",
    "parse_override",
    "preset",
    "preset_of",
    "set_key",
]
