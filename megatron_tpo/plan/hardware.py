"""GPU types and their interconnects, read from ``configs/hardware/gpus.yaml``.

The table is a Hydra/OmegaConf structured config, so a user's own YAML with a misspelt
key or a wrong type fails at load time with a message naming the key.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Union

from megatron_tpo.config import CONFIG_DIR, ConfigError
from megatron_tpo.config.loading import load_structured

DEFAULT_GPU_TABLE = CONFIG_DIR / "hardware" / "gpus.yaml"

GIB = 1024**3


@dataclass
class GpuSpec:
    description: str = ""
    memory_gib: float = 80.0
    bf16_tflops: float = 989.0
    fp8_tflops: Optional[float] = None
    hbm_tb_per_s: float = 3.35
    nvlink_gb_per_s: float = 450.0
    internode_gbit_per_s: float = 400.0

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GIB

    @property
    def has_fp8(self) -> bool:
        return bool(self.fp8_tflops)

    def peak_flops(self, fp8: bool) -> float:
        return (self.fp8_tflops if fp8 else self.bf16_tflops) * 1e12

    @property
    def nvlink_bytes_per_s(self) -> float:
        return self.nvlink_gb_per_s * 1e9

    @property
    def internode_bytes_per_s(self) -> float:
        return self.internode_gbit_per_s * 1e9 / 8

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_tb_per_s * 1e12


@dataclass
class GpuTable:
    gpus: Dict[str, GpuSpec] = field(default_factory=dict)


def load_gpu_table(path: Union[str, Path, None] = None) -> Dict[str, GpuSpec]:
    path = Path(path) if path is not None else DEFAULT_GPU_TABLE
    if not path.is_file():
        raise ConfigError(f"GPU table not found: {path}")
    table = load_structured(GpuTable, path)
    for name, spec in table.gpus.items():
        for setting in ("memory_gib", "bf16_tflops", "hbm_tb_per_s", "nvlink_gb_per_s",
                        "internode_gbit_per_s"):
            if getattr(spec, setting) <= 0:
                raise ConfigError(f"{path}: gpus.{name}.{setting} must be positive")
    return table.gpus


def find_gpu(name: str, path: Union[str, Path, None] = None) -> GpuSpec:
    table = load_gpu_table(path)
    if name not in table:
        raise ConfigError(f"unknown GPU {name!r}; known: {', '.join(sorted(table))}")
    return table[name]
