"""Configuration: YAML groups, dotted overrides and typed validation (OmegaConf does the merging).

A run is described by five sections. Three are *groups* whose choice picks a file (or a registered
name) and two are fixed::

    memory:  a memory core   (configs/memory/<choice>.yaml or any registered core name)
    env:     an environment  (configs/env/<choice>.yaml or any registered environment name)
    agent:   a learner       (configs/agent/<choice>.yaml or any registered learner name)
    model:   the network around the core (agents.base.ModelOptions)
    train:   the run itself (TrainOptions below)

A runnable file names its group choices under ``defaults`` and overrides any option::

    defaults: {memory: gru, env: cue_recall, agent: actor_critic}
    memory: {hidden_size: 64}
    train: {total_steps: 300000}

The command line then applies ``group=choice`` and ``dotted.key=value`` arguments on top. Options are
checked against each component's options dataclass: an unknown key, a wrong type, an unknown choice
or an invalid value raises ``ConfigError`` with one message naming the key and the valid choices.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import agents  # noqa: F401  (registers the learners)
import envs  # registers the environments
from agents.base import LEARNERS, ModelOptions
from agents.population import check_population_grid
from rlmem.errors import ConfigError
from rlmem.memory import CORES

GROUPS = ("memory", "env", "agent")
SECTIONS = (*GROUPS, "model", "train")
DEFAULT_CHOICES = {"memory": "gru", "env": "cue_recall", "agent": "actor_critic"}


@dataclass
class TrainOptions:
    """Options of the run itself."""

    total_steps: int = 200_000  # environment steps, all envs together
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    run_dir: str | None = None  # default: runs/<name>
    name: str | None = None  # default: <env>_<memory>_<agent>_s<seed>
    checkpoint_every: int = 50_000  # environment steps between checkpoints (also at the end and on Ctrl-C)
    progress: bool = True  # console progress bar (drawn only when stderr is a terminal)
    # Small recurrent nets act fastest on one intra-op thread (more threads spin against the envs and
    # each other); raise it for CNN encoders on CPU. 0 keeps PyTorch's default.
    torch_threads: int = 1
    # Intra-op threads while actor_critic and ppo collect a window (0: torch_threads). With a CNN on a CPU,
    # acting on 1 thread beside the emulators' threads and updating on all cores (torch_threads: 0) is fastest.
    acting_threads: int = 0
    # A population (agents.population): P learners stepped together in one process, one per seed
    # seed..seed+P−1 and per combination of population_grid's values ({"agent.lr": [0.01, 0.1]}).
    population: int = 1
    population_grid: dict[str, Any] = field(default_factory=dict)
    # torch.compile a td population's step (its members' vmapped forward and backward): the same updates
    # up to rounding, 1.3-3.5x the steps/s on a CPU (docs/benchmarks.md), after compiling for 10-20 s
    # (again at each ccn stage). Only populations of agent td.
    compile: bool = False

    def __post_init__(self) -> None:
        if self.population < 1:
            raise ConfigError(f"train.population must be >= 1, got {self.population}")
        # train.population_grid.agent.lr=[..] on the command line nests; keys are dotted option names
        self.population_grid = dotted_keys(self.population_grid)
        if self.total_steps <= 0:
            raise ConfigError(f"train.total_steps must be positive, got {self.total_steps}")
        if self.checkpoint_every <= 0:
            raise ConfigError(f"train.checkpoint_every must be positive, got {self.checkpoint_every}")
        if self.torch_threads < 0:
            raise ConfigError(f"train.torch_threads must be >= 0, got {self.torch_threads}")
        if self.acting_threads < 0:
            raise ConfigError(f"train.acting_threads must be >= 0, got {self.acting_threads}")
        if not (self.device in ("cpu", "cuda", "auto") or self.device.startswith("cuda:")):
            raise ConfigError(f"train.device must be one of cpu, cuda, cuda:N, auto; got {self.device!r}")


def dotted_keys(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"agent": {"lr": [..]}}`` → ``{"agent.lr": [..]}`` (keys already dotted stay as they are)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(dotted_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, (list, tuple)) else value
    return flat


@dataclass
class RunConfig:
    """A fully resolved and validated run configuration."""

    memory: dict[str, Any]  # core spec for make_core: name + options
    env: dict[str, Any]  # env spec for make_env: name + options
    agent: dict[str, Any]  # learner name + options
    model: ModelOptions
    train: TrainOptions
    choices: dict[str, str] = field(default_factory=dict)  # the group choices that produced it

    def agent_options(self) -> Any:
        values = dict(self.agent)
        return LEARNERS.get(values.pop("name")).options(**values)

    def to_dict(self) -> dict[str, Any]:
        return {
            "memory": dict(self.memory),
            "env": dict(self.env),
            "agent": dict(self.agent),
            "model": dataclasses.asdict(self.model),
            "train": dataclasses.asdict(self.train),
            "choices": dict(self.choices),
        }

    def to_yaml(self) -> str:
        """The config as YAML (``config.yaml`` of a run). Written by PyYAML from plain data rather than
        through an OmegaConf object: a population writes one per member, and OmegaConf took 10x longer
        (6 of the 10 s a 256-member population spent before its first step)."""
        return yaml.dump(_plain(self.to_dict()), Dumper=_YAML_DUMPER, sort_keys=False)


_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _plain(value: Any) -> Any:
    """Dicts, lists and scalars only (tuples from dataclasses become lists, as OmegaConf wrote them)."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _registries() -> dict[str, tuple[Any, Any]]:
    """group -> (lookup(name) -> options class, list of valid names)."""
    return {
        "memory": (lambda n: CORES.get(n).options, CORES.names()),
        "env": (lambda n: envs.registry.env_entry(n).options, envs.ENVS.names()),
        "agent": (lambda n: LEARNERS.get(n).options, LEARNERS.names()),
    }


def packaged_configs() -> Path:
    """The configs that ship inside the package: group files and experiment files (the repository's
    ``configs/`` folder, reached through the ``rlmem/configs`` link in a checkout)."""
    return Path(str(resources.files("rlmem").joinpath("configs")))


def config_search_dirs(config_file: Path | None) -> list[Path]:
    """Where group files are looked up: next to the runnable file, then the packaged configs. The working
    directory plays no part, so a config resolves the same from any folder and any install."""
    dirs: list[Path] = []
    if config_file is not None:
        parent = config_file.resolve().parent
        dirs += [parent, parent / "configs", parent.parent / "configs"]
    dirs.append(packaged_configs().resolve())
    unique: list[Path] = []
    for d in dirs:
        if d not in unique and d.is_dir():
            unique.append(d)
    return unique


def experiment_names() -> list[str]:
    """The runnable experiment files that ship with the package, by name (``atari_pong_gru``, ...)."""
    return sorted(p.stem for p in packaged_configs().glob("*.yaml"))


def find_config_file(config_path: str) -> Path:
    """A runnable file: the path as given, else the packaged experiment file of that name, so that
    ``rlmem train configs/atari_pong_gru.yaml`` (or ``atari_pong_gru``) works from any folder."""
    path = Path(config_path)
    if path.is_file():
        return path
    name = path.name if path.parent in (Path("."), Path("configs")) else None
    if name is not None:
        packaged = packaged_configs() / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
        if packaged.is_file():
            return packaged
    raise ConfigError(
        f"config file not found: {config_path}; the packaged experiment files are: {', '.join(experiment_names())}"
    )


def group_choices_available(group: str, search_dirs: Sequence[Path]) -> list[str]:
    names = set(_registries()[group][1])
    for d in search_dirs:
        names.update(p.stem for p in (d / group).glob("*.yaml"))
    return sorted(names)


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (OmegaConfBaseException, OSError, ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read {what} {path}: {str(err).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of options, not {type(data).__name__}")
    return data


def _group_file(group: str, choice: str, search_dirs: Sequence[Path]) -> dict[str, Any]:
    for d in search_dirs:
        path = d / group / f"{choice}.yaml"
        if path.is_file():
            values = _read_yaml(path, f"{group} config")
            values.setdefault("name", choice)
            return values
    if choice in _registries()[group][1]:
        return {"name": choice}
    raise ConfigError(
        f"unknown {group} choice {choice!r}; valid choices: {', '.join(group_choices_available(group, search_dirs))}"
    )


def embedded_default() -> dict[str, Any]:
    """The runnable config that `rlmem train` uses when no file is given."""
    text = (packaged_configs() / "default.yaml").read_text()
    return OmegaConf.to_container(OmegaConf.create(text), resolve=True)  # type: ignore[return-value]


def parse_overrides(args: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Split command-line arguments into group choices (``memory=lstm``) and dotted overrides."""
    choices: dict[str, str] = {}
    dotted: list[str] = []
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"cannot read argument {arg!r}: expected group=choice or section.key=value")
        key, value = arg.split("=", 1)
        if "." not in key:
            if key not in GROUPS:
                raise ConfigError(
                    f"unknown group {key!r} in {arg!r}; groups: {', '.join(GROUPS)} "
                    f"(options are set as section.key=value, sections: {', '.join(SECTIONS)})"
                )
            choices[key] = value
        else:
            section = key.split(".", 1)[0]
            if section not in SECTIONS:
                raise ConfigError(f"unknown section {section!r} in {arg!r}; valid sections: {', '.join(SECTIONS)}")
            dotted.append(arg)
    return choices, dotted


def read_dotted(dotted: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", ...]`` → ``{"a": {"b": 1}}``, each value typed as YAML types it (1, 0.5, true, [1, 2])."""
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(dotted))) if dotted else {}  # type: ignore[return-value]
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise ConfigError(_unreadable(dotted, err)) from None


def _unreadable(dotted: Sequence[str], err: Exception) -> str:
    """Which override YAML cannot read, and what it found there."""
    for arg in dotted:  # the first that fails alone
        try:
            OmegaConf.from_dotlist([arg])
        except (OmegaConfBaseException, yaml.YAMLError) as alone:
            err = alone
            break
    else:
        arg = " ".join(dotted)
    problem = getattr(err, "problem", None)
    message = f"cannot read override {arg!r}: " + (f"{problem} {err.context}" if problem else str(err).splitlines()[0])
    if "{" in arg:  # the usual slip: YAML's flow mapping {key: value} needs the space after the colon
        message += "; a mapping is written {key: value}, with a space after the colon"
    return message


def _typed(section: str, options_cls: type, values: Mapping[str, Any]) -> Any:
    """Check ``values`` against ``options_cls`` (unknown keys, types) and build the dataclass."""
    valid = {f.name for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ConfigError(f"unknown key {section}.{unknown[0]}; valid keys: {', '.join(sorted(valid))}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(options_cls), OmegaConf.create(dict(values)))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        message = str(getattr(err, "msg", err)).splitlines()[0]
        raise ConfigError(f"{section}.{key}: {message}") from None
    except ValueError as err:  # __post_init__ validation (ConfigError, EnvError)
        raise ConfigError(str(err)) from None


def _section_dict(section: str, options: Any, name: str | None) -> dict[str, Any]:
    values = dataclasses.asdict(options)
    return {"name": name, **values} if name is not None else values


def resolve(
    base: Mapping[str, Any], args: Sequence[str] = (), config_file: Path | None = None
) -> RunConfig:
    """Compose a runnable config (``base``) with command-line ``args`` into a validated RunConfig."""
    base = dict(base)
    unknown = sorted(set(base) - {*SECTIONS, "defaults"})
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r}; valid sections: {', '.join((*SECTIONS, 'defaults'))}")
    for section in SECTIONS:
        if not isinstance(base.get(section) or {}, Mapping):
            raise ConfigError(f"section {section} must map its keys to values, e.g. {section}: {{key: value}}; "
                              f"got {base[section]!r}")
    defaults = base.get("defaults") or {}
    if not isinstance(defaults, Mapping) or set(defaults) - set(GROUPS):
        raise ConfigError(f"defaults must map groups to choices, e.g. {{memory: gru}}; groups: {', '.join(GROUPS)}")
    cli_choices, dotted = parse_overrides(args)
    cli_values = read_dotted(dotted)
    search_dirs = config_search_dirs(config_file)
    registries = _registries()

    sections: dict[str, Any] = {}
    choices: dict[str, str] = {}
    for group in GROUPS:
        choice = str(cli_choices.get(group, defaults.get(group, DEFAULT_CHOICES[group])))
        choices[group] = choice
        merged = OmegaConf.merge(
            _group_file(group, choice, search_dirs), base.get(group) or {}, cli_values.get(group) or {}
        )
        values = OmegaConf.to_container(merged, resolve=True)
        # the group file's own `name` says which registered component it configures
        name = str(values.pop("name", choice))
        lookup, names = registries[group]
        if name not in names:
            raise ConfigError(f"unknown {group} {name!r}; valid choices: {', '.join(names)}")
        sections[group] = _section_dict(group, _typed(group, lookup(name), values), name)

    for section, options_cls in (("model", ModelOptions), ("train", TrainOptions)):
        values = OmegaConf.to_container(
            OmegaConf.merge(base.get(section) or {}, cli_values.get(section) or {}), resolve=True
        )
        sections[section] = _typed(section, options_cls, values)

    config = RunConfig(choices=choices, **sections)
    check_combination(config)
    return config


def check_combination(config: RunConfig) -> None:
    """Cross-section checks that no single options dataclass can make."""
    core_cls = CORES.get(config.memory["name"]).cls
    if config.memory.get("grad") not in core_cls.grad_modes:
        raise ConfigError(
            f"memory.grad={config.memory.get('grad')!r} is not supported by core {config.memory['name']!r}; "
            f"valid choices: {', '.join(core_cls.grad_modes)}"
        )
    if config.train.compile and not (is_population(config) and config.agent["name"] == "td"):
        raise ConfigError("train.compile compiles the step of a population of td learners: set train.population "
                          "(> 1) with agent=td, or leave train.compile false")
    if is_population(config):
        check_population_grid(config.agent["name"], config.train.population_grid)
        members = population_members(config)
        for member in members:
            member.agent_options()  # each member's options are valid
        names = [member_name(m, config.train.population_grid) for m in members]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ConfigError(f"train.population_grid gives several members the name {repeated[0]}: "
                              "list each value once")


# --------------------------------------------------------------------------------------------------
# Populations


def is_population(config: RunConfig) -> bool:
    return config.train.population > 1 or bool(config.train.population_grid)


def population_members(config: RunConfig) -> list[RunConfig]:
    """The run config of every member of a population: for each combination of ``population_grid``'s
    values (in the grid's order, last key fastest), ``population`` seeds from ``train.seed`` on."""
    grid = config.train.population_grid
    members = []
    for values in itertools.product(*grid.values()):
        agent = dict(config.agent)
        agent.update({key.split(".", 1)[1]: value for key, value in zip(grid, values)})
        for offset in range(config.train.population):
            train = dataclasses.replace(config.train, seed=config.train.seed + offset, population=1,
                                        population_grid={}, compile=False, run_dir=None, name=None)
            members.append(RunConfig(memory=dict(config.memory), env=dict(config.env), agent=agent,
                                     model=config.model, train=train, choices=dict(config.choices)))
    return members


def member_name(member: RunConfig, grid: Mapping[str, Any]) -> str:
    """A member's sub-run name: its grid values and its seed (``lr0.01_s3``; ``member_s3`` without a
    grid), so that grouping by name (a trailing ``_s<seed>`` dropped) puts a grid point's seeds together."""
    values = [f"{key.split('.', 1)[1]}{member.agent[key.split('.', 1)[1]]:g}" for key in grid]
    return f"{'_'.join(values) or 'member'}_s{member.train.seed}"


def member_run_dir(run_dir: Path, member: RunConfig, grid: Mapping[str, Any]) -> Path:
    """Where a population run in ``run_dir`` keeps member ``member``'s sub-run (its TensorBoard events)."""
    return run_dir / "members" / member_name(member, grid)


def load(config_path: str | None, args: Sequence[str] = ()) -> RunConfig:
    """Load a runnable file (or the embedded default) and apply command-line arguments."""
    if config_path is None:
        return resolve(embedded_default(), args)
    path = find_config_file(config_path)
    data = _read_yaml(path, "config file")
    if "choices" not in data:
        return resolve(data, args, config_file=path)
    # A run's saved config.yaml used as the template of a new run (another seed, a changed option): it
    # starts a run dir of its own unless train.run_dir is given, since the saved one holds that run.
    return resolve_saved({**data, "train": {**(data.get("train") or {}), "run_dir": None}}, args)


# Options renamed since runs were saved: section -> {old name: new name}, applied to saved configs only.
RENAMED_OPTIONS: dict[str, dict[str, str]] = {"agent": {"lam": "trace_lambda"}}


def load_saved(run_dir: Path, args: Sequence[str] = ()) -> RunConfig:
    """The resolved config saved in a run directory (used by resume and eval), plus overrides."""
    return resolve_saved(_read_yaml(run_dir / "config.yaml", "run config"), args)


def resolve_saved(data: Mapping[str, Any], args: Sequence[str] = ()) -> RunConfig:
    """A saved config (``config.yaml`` of a run: complete sections and the group ``choices``) with
    command-line ``args``; a group chosen on the command line (``memory=gru``) replaces that saved section
    by the group's own file, so that a saved run can be repeated with another core."""
    choices = dict(data.get("choices") or {})
    cli_choices, _ = parse_overrides(args)
    base = {k: v for k, v in data.items() if k in SECTIONS and k not in cli_choices}
    for section, renames in RENAMED_OPTIONS.items():
        values = base.get(section) or {}
        for old, new in renames.items():
            if old in values and new not in values:
                values[new] = values.pop(old)
    # the saved sections are complete: resolve them against their registered names, not group files
    base["defaults"] = {
        group: str((base.get(group) or {}).get("name", DEFAULT_CHOICES[group])) for group in GROUPS if group in base
    }
    config = resolve(base, args)
    config.choices = {**choices, **cli_choices}
    return config


def as_plain(node: Any) -> Any:
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node
