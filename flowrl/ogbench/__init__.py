"""OGBench datasets for flowrl: the domain table, a local generator, and a validating loader.

- `flowrl.ogbench.domains`: the 10 QAM-paper domains + cube-single, env-name parsing, dimensions.
- `flowrl.ogbench.generate`: `generate_dataset` — manipulation "play" datasets from ogbench's oracles.
- `flowrl.ogbench.datasets`: `load_dataset` — official-format files → transitions with single-task
  rewards (ogbench's own relabelling), METHODS.md §2.1–2.2.
- `flowrl.ogbench.commands`: the `flowrl data generate` CLI.

Heavy imports (mujoco, ogbench, gymnasium) happen only inside the functions that need them.
"""

from flowrl.ogbench.datasets import find_shards, load_dataset, load_shard
from flowrl.ogbench.domains import (
    DOMAINS,
    DatasetError,
    DomainSpec,
    EnvName,
    NotGenerableError,
    UnknownEnvError,
    domain_spec,
    env_dims,
    parse_env_name,
)
from flowrl.ogbench.generate import DatasetExistsError, GenerationResult, generate_dataset

__all__ = [
    "DOMAINS",
    "DatasetError",
    "DatasetExistsError",
    "DomainSpec",
    "EnvName",
    "GenerationResult",
    "NotGenerableError",
    "UnknownEnvError",
    "domain_spec",
    "env_dims",
    "find_shards",
    "generate_dataset",
    "load_dataset",
    "load_shard",
    "parse_env_name",
]
