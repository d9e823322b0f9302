"""The OGBench domains flowrl knows: dimensions, dataset files, defaults, and env-name parsing.

One `DomainSpec` per dataset domain: the 10 domains of the QAM paper (METHODS.md §8.1) plus
cube-single. Numbers come from OGBENCH-DATA.md §1, §2, §4 (checked against the installed
ogbench 1.2.2 envs; `tests/test_ogbench_datasets.py` re-checks the dimensions).

Env names are OGBench single-task names, `<domain>-singletask[-taskN]-v0`
(e.g. `cube-double-play-singletask-task2-v0`); without `-taskN` OGBench's default task is used.
All of them read the goal-conditioned dataset files `<domain>-v0.npz` and `<domain>-v0-val.npz`
(OGBENCH-DATA.md §2); rewards are relabelled at load time (`flowrl.ogbench.datasets`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from flowrl import errors

__all__ = [
    "DOMAINS",
    "DatasetError",
    "DomainSpec",
    "EnvName",
    "GENERABLE_DOMAINS",
    "NotGenerableError",
    "UnknownEnvError",
    "domain_spec",
    "env_dims",
    "generable_domain_spec",
    "parse_env_name",
]


class DatasetError(errors.DatasetError, ValueError):
    """Bad or missing OGBench dataset input; the message is one line naming the problem and the fix.

    A `flowrl.errors.DatasetError` (the CLI reports it as one line) and a `ValueError`.
    """


class UnknownEnvError(DatasetError):
    """An env or domain name flowrl does not know."""


class NotGenerableError(DatasetError):
    """A domain whose dataset cannot be generated locally (locomotion: needs OGBench's SAC experts)."""


_LOCOMOTION_REASON = (
    "its official generator drives a pretrained SAC expert (OGBench's experts.tar.gz, not in the pip "
    "package) and a self-trained expert would give a different dataset (OGBENCH-DATA.md §4)"
)


@dataclasses.dataclass(frozen=True)
class DomainSpec:
    """Static facts about one OGBench dataset domain.

    Attributes:
        name: dataset domain, e.g. `cube-double-play` (env id + dataset type).
        generation_env_id: gymnasium id used in data-collection mode (`cube-double-v0`), or None.
        generable: whether `flowrl.ogbench.generate` can produce this dataset locally.
        not_generable_reason: why not, when `generable` is False.
        train_episodes: episodes in the official train file (the val file holds max(1, N // 10) more).
        episode_rows: stored rows per episode in the official files (1001 = 1000 transitions + last state).
        eval_horizon: max episode steps of the single-task evaluation env.
        ob_dim, action_dim, nq, nv, n_buttons: row widths of observations, actions, qpos, qvel,
            button_states (n_buttons = 0: the key is absent).
        default_task: task used when the env name has no `-taskN`.
        num_tasks: tasks are `task1` … `task{num_tasks}`.
        paper_dataset: what the QAM paper trains on: the standard file, or the 100M shard set
            `<domain>-100m-v0/<domain>-v0-NNN.npz` (METHODS.md §2.1, §8.1).
        paper_sparse: whether the paper converts rewards to sparse (METHODS.md §2.2, §8.1).
    """

    name: str
    generation_env_id: str | None
    generable: bool
    train_episodes: int
    episode_rows: int
    eval_horizon: int
    ob_dim: int
    action_dim: int
    nq: int
    nv: int
    n_buttons: int
    default_task: int
    num_tasks: int = 5
    paper_dataset: Literal["standard", "100m"] = "standard"
    paper_sparse: bool = False
    not_generable_reason: str | None = None

    @property
    def dataset_name(self) -> str:
        """`<domain>-v0`, the stem of the official files."""
        return f"{self.name}-v0"

    @property
    def train_file(self) -> str:
        return f"{self.dataset_name}.npz"

    @property
    def val_file(self) -> str:
        return f"{self.dataset_name}-val.npz"

    @property
    def shard_directory(self) -> str:
        """Directory name of the 100M shard set (OGBench / horizon-reduction layout)."""
        return f"{self.name}-100m-v0"

    @property
    def default_episodes(self) -> int:
        """Train episodes `generate` makes by default: the official count (`train_episodes`)."""
        return self.train_episodes

    @property
    def val_episodes(self) -> int:
        """Episodes in the official val file: N // 10 (at least 1, or ogbench goes to the network)."""
        return max(1, self.train_episodes // 10)

    @property
    def is_manipulation(self) -> bool:
        return self.generation_env_id is not None

    def file_names(self) -> tuple[str, str]:
        """(train, val) file names."""
        return self.train_file, self.val_file


def _manipulation(
    name: str, env_id: str, *, episodes: int, horizon: int, ob: int, nq: int, nv: int, buttons: int = 0,
    default_task: int, paper_dataset: Literal["standard", "100m"] = "standard", sparse: bool = False,
) -> DomainSpec:
    return DomainSpec(
        name=name, generation_env_id=env_id, generable=True, train_episodes=episodes, episode_rows=1001,
        eval_horizon=horizon, ob_dim=ob, action_dim=5, nq=nq, nv=nv, n_buttons=buttons,
        default_task=default_task, paper_dataset=paper_dataset, paper_sparse=sparse,
    )


def _locomotion(name: str, *, episodes: int, rows: int, horizon: int, humanoid: bool) -> DomainSpec:
    return DomainSpec(
        name=name, generation_env_id=None, generable=False, train_episodes=episodes, episode_rows=rows,
        eval_horizon=horizon, ob_dim=69 if humanoid else 29, action_dim=21 if humanoid else 8,
        nq=28 if humanoid else 15, nv=27 if humanoid else 14, n_buttons=0, default_task=1,
        not_generable_reason=_LOCOMOTION_REASON,
    )


DOMAINS: dict[str, DomainSpec] = {
    spec.name: spec
    for spec in [
        _locomotion("antmaze-large-navigate", episodes=1000, rows=1001, horizon=1000, humanoid=False),
        _locomotion("antmaze-giant-navigate", episodes=500, rows=2001, horizon=1000, humanoid=False),
        _locomotion("humanoidmaze-medium-navigate", episodes=1000, rows=2001, horizon=2000, humanoid=True),
        _locomotion("humanoidmaze-large-navigate", episodes=1000, rows=2001, horizon=2000, humanoid=True),
        _manipulation("cube-single-play", "cube-single-v0", episodes=1000, horizon=200, ob=28, nq=21, nv=20,
                      default_task=2),
        _manipulation("cube-double-play", "cube-double-v0", episodes=1000, horizon=500, ob=37, nq=28, nv=26,
                      default_task=2),
        _manipulation("cube-triple-play", "cube-triple-v0", episodes=3000, horizon=1000, ob=46, nq=35, nv=32,
                      default_task=2),
        _manipulation("cube-quadruple-play", "cube-quadruple-v0", episodes=5000, horizon=1000, ob=55, nq=42,
                      nv=38, default_task=2, paper_dataset="100m"),
        _manipulation("scene-play", "scene-v0", episodes=1000, horizon=750, ob=40, nq=25, nv=24, buttons=2,
                      default_task=2, sparse=True),
        _manipulation("puzzle-3x3-play", "puzzle-3x3-v0", episodes=1000, horizon=500, ob=55, nq=23, nv=23,
                      buttons=9, default_task=4, sparse=True),
        _manipulation("puzzle-4x4-play", "puzzle-4x4-v0", episodes=1000, horizon=500, ob=83, nq=30, nv=30,
                      buttons=16, default_task=4, paper_dataset="100m", sparse=True),
    ]
}

GENERABLE_DOMAINS: tuple[str, ...] = tuple(name for name, spec in DOMAINS.items() if spec.generable)


def _domain_aliases(name: str) -> set[str]:
    # Accept the domain, its dataset name and the data-collection env id: `cube-double-play`,
    # `cube-double-play-v0`, `cube-double`, `cube-double-v0`.
    spec = DOMAINS[name]
    aliases = {spec.name, spec.dataset_name}
    if spec.generation_env_id is not None:
        aliases |= {spec.generation_env_id, spec.generation_env_id.removesuffix("-v0")}
    return aliases


_ALIASES: dict[str, str] = {alias: name for name in DOMAINS for alias in _domain_aliases(name)}


def domain_spec(domain: str) -> DomainSpec:
    """Look up a domain by name (`cube-double-play`; also `cube-double`, `cube-double-v0`, `cube-double-play-v0`).

    Raises:
        UnknownEnvError: one line listing the valid domains.
    """
    name = _ALIASES.get(domain.strip().lower())
    if name is None:
        raise UnknownEnvError(f"unknown OGBench domain {domain!r}; valid domains: {', '.join(DOMAINS)}")
    return DOMAINS[name]


def generable_domain_spec(domain: str) -> DomainSpec:
    """Like `domain_spec`, but raises `NotGenerableError` (one line, with the reason) for locomotion."""
    try:
        spec = domain_spec(domain)
    except UnknownEnvError:
        raise UnknownEnvError(
            f"unknown OGBench domain {domain!r}; domains that can be generated: {', '.join(GENERABLE_DOMAINS)}"
        ) from None
    if not spec.generable:
        raise NotGenerableError(
            f"{spec.name} cannot be generated locally: {spec.not_generable_reason}; place the official files "
            f"{spec.train_file} and {spec.val_file} in the dataset directory instead"
        )
    return spec


@dataclasses.dataclass(frozen=True)
class EnvName:
    """A parsed single-task env name `<domain>-singletask-task<task>-v0`."""

    domain: DomainSpec
    task: int

    @property
    def canonical(self) -> str:
        """The name with the task spelled out: `cube-double-play-singletask-task2-v0`."""
        return f"{self.domain.name}-singletask-task{self.task}-v0"

    @property
    def gym_env_name(self) -> str:
        """The evaluation env id ogbench registers (dataset type removed): `cube-double-singletask-task2-v0`."""
        base = self.domain.name.rsplit("-", 1)[0]  # drop `-play` / `-navigate`
        return f"{base}-singletask-task{self.task}-v0"


_ENV_NAME = re.compile(r"^(?P<domain>[a-z0-9-]+?)-singletask(?:-task(?P<task>\d+))?-v0$")


def parse_env_name(env_name: str) -> EnvName:
    """Parse `<domain>-singletask[-taskN]-v0`; no `-taskN` means the domain's default task.

    Raises:
        UnknownEnvError: one line saying what is wrong and listing the valid domains or tasks.
    """
    match = _ENV_NAME.match(env_name.strip())
    if match is None:
        raise UnknownEnvError(
            f"env name {env_name!r} is not of the form <domain>-singletask[-taskN]-v0 "
            f"(e.g. cube-double-play-singletask-task2-v0); valid domains: {', '.join(DOMAINS)}"
        )
    domain = match["domain"]
    if domain not in DOMAINS:
        raise UnknownEnvError(
            f"unknown OGBench domain {domain!r} in env name {env_name!r}; valid domains: {', '.join(DOMAINS)}"
        )
    spec = DOMAINS[domain]
    task = spec.default_task if match["task"] is None else int(match["task"])
    if not 1 <= task <= spec.num_tasks:
        raise UnknownEnvError(
            f"unknown task {task} in env name {env_name!r}; valid tasks for {domain}: "
            f"{', '.join(f'task{i}' for i in range(1, spec.num_tasks + 1))}"
        )
    return EnvName(domain=spec, task=task)


def env_dims(env_name: str) -> tuple[int, int]:
    """(obs_dim, action_dim) of a single-task env, from the table (no env is built)."""
    spec = parse_env_name(env_name).domain
    return spec.ob_dim, spec.action_dim
