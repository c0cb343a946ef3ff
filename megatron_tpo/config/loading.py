"""Load configs from the shipped ``configs/`` tree (or any YAML path) into dataclasses.

The YAML files are Hydra config groups; the dataclasses are their schemas, so a typo
in a key or a wrong type fails at load time with OmegaConf's message naming the key.
"""

from importlib import resources
from pathlib import Path
from typing import Type, TypeVar, Union

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.config.model import ModelConfig
from megatron_tpo.config.parallel import ParallelConfig

CONFIG_DIR = Path(str(resources.files("megatron_tpo.configs")))

T = TypeVar("T")


def _resolve(group: str, name_or_path: Union[str, Path]) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"{group} config file not found: {path}")
        return path
    path = CONFIG_DIR / group / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        raise ConfigError(f"unknown {group} config {name_or_path!r}; known: {', '.join(known)}")
    return path


def load_structured(schema: Type[T], path: Path, **overrides) -> T:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(path),
                                 OmegaConf.create(overrides))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{path}: {error}") from error


def load_group_config(schema: Type[T], group: str, name_or_path: Union[str, Path],
                      **overrides) -> T:
    """``configs/<group>/<name>.yaml`` or a YAML path into ``schema``, with ``overrides``
    on top, then the schema's own ``validate()``."""
    config = load_structured(schema, _resolve(group, name_or_path), **overrides)
    config.validate()
    return config


def load_model_config(name_or_path: Union[str, Path], **overrides) -> ModelConfig:
    return load_group_config(ModelConfig, "model", name_or_path, **overrides)


def load_parallel_config(name_or_path: Union[str, Path], **overrides) -> ParallelConfig:
    return load_structured(ParallelConfig, _resolve("parallel", name_or_path), **overrides)
