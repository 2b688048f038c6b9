"""Config composition and the errors a user can cause (each one message, exit status 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlmem import config as cfg
from rlmem.cli import main
from rlmem.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_embedded_default_resolves_to_typed_sections():
    config = cfg.load(None)
    assert config.memory["name"] == "gru" and config.memory["grad"] == "bptt"
    assert config.env["name"] == "cue_recall"
    assert config.agent["name"] == "actor_critic"
    assert config.train.total_steps > 0
    # the saved YAML round-trips to the same resolved config
    assert cfg.resolve(
        {**{k: v for k, v in config.to_dict().items() if k in cfg.SECTIONS}, "defaults": config.choices}
    ).to_dict() == config.to_dict()


def test_group_choice_and_dotted_overrides(tmp_path: Path):
    run_file = tmp_path / "exp.yaml"
    run_file.write_text("defaults: {memory: gru, env: cue_recall}\nmemory: {hidden_size: 32}\ntrain: {seed: 3}\n")
    config = cfg.load(str(run_file), ["memory=lstm", "memory.hidden_size=64", "env.num_envs=4", "train.seed=7"])
    assert config.memory["name"] == "lstm"
    assert config.memory["hidden_size"] == 64
    assert config.env["num_envs"] == 4
    assert config.train.seed == 7
    assert config.choices["memory"] == "lstm"


def test_group_file_is_found_next_to_runnable_file(tmp_path: Path):
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "tiny.yaml").write_text("name: gru\nhidden_size: 5\n")
    run_file = tmp_path / "exp.yaml"
    run_file.write_text("defaults: {memory: tiny}\n")
    config = cfg.load(str(run_file))
    assert config.memory == {"name": "gru", "hidden_size": 5, "grad": "bptt", "encoder_grad": "window"}


def test_registered_name_works_without_a_group_file():
    assert cfg.load(None, ["memory=none"]).memory["name"] == "none"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["memory.hidden_sise=3"], "unknown key memory.hidden_sise; valid keys:"),
        (["memory.hidden_size=abc"], "memory.hidden_size"),
        (["memory.hidden_size=-4"], "memory.hidden_size must be a positive integer"),
        (["memory=transformerxl"], "unknown memory choice 'transformerxl'; valid choices:"),
        (["env=atlantis"], "unknown env choice 'atlantis'; valid choices:"),
        (["agent=dqn"], "unknown agent choice 'dqn'; valid choices:"),
        (["memory.grad=rtrl"], "memory.grad='rtrl' is not supported by core 'gru'; valid choices: bptt"),
        (["memory.grad=magic"], "memory.grad must be one of"),
        (["train.total_steps=0"], "train.total_steps must be positive"),
        (["trian.seed=1"], "unknown section 'trian'"),
        (["hidden_size=3"], "unknown group 'hidden_size'"),
        (["memory"], "expected group=choice or section.key=value"),
        (["env.num_envs=-2"], "env.num_envs must be a positive integer"),
        (["env.overlap=sometimes"], "env.overlap must be true, false or auto"),
        (["train.acting_threads=-1"], "train.acting_threads must be >= 0"),
        (["model.encoder=resnet999"], "model.encoder must be one of"),
        (["memory.init_std=[1"], "cannot read override 'memory.init_std=[1': did not find expected ',' or ']'"),
        (["train.seed=3", "train.population_grid={agent.lr:[1,2]}"],  # the override that fails, and the usual slip
         "cannot read override 'train.population_grid={agent.lr:[1,2]}': found unexpected ':' while scanning a plain "
         "scalar; a mapping is written {key: value}, with a space after the colon"),
    ],
)
def test_config_errors_name_the_key(args, fragment):
    with pytest.raises(ConfigError) as err:
        cfg.load(None, args)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "memory.hidden_sise=3"],
        ["train", "memory.hidden_size=[3"],
        ["bench", "trace_patterning", "--set", "columnar.init_scale=[1"],
        ["train", "memory=nope"],
        ["train", "does/not/exist.yaml"],
        ["train", "--resume", "no/such/run"],
        ["eval", "no/such/run"],
        ["bench", "warp-drive"],
        ["plot", "no/such/run"],
        ["frobnicate"],
    ],
)
def test_cli_user_errors_exit_2_with_one_message(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlmem: error:")
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "what"),
    [
        (["train", "train.total_steps=8", "train.run_dir={blocked}/run"], "the run"),
        (["plot", "{run}", "-o", "{blocked}/curves.png"], "the figure"),
        (["bench", "population", "--members", "1", "--methods", "elstm", "--out", "{blocked}/table.json"], "the table"),
        (["bench", "trace_patterning", "--methods", "elstm", "--out", "{blocked}/study"], "the runs, table and figure"),
        (["bench", "trace_patterning", "--methods", "elstm", "--results", "{blocked}/saved"], "the finished runs"),
        (["bench", "popgym", "--out", "{blocked}/suite"], "the runs, table and figure"),
        (["bench", "robustness", "{run}", "--out", "{blocked}/report"], "the report"),
    ],
)
def test_an_output_folder_that_cannot_be_written_is_one_message_before_any_work(argv, what, tmp_path: Path,
                                                                                capsys):
    """A file where a folder must go, or a folder this process may not write in: the command says so and
    stops before it trains or measures anything."""
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    run = tmp_path / "run"
    run.mkdir()
    argv = [arg.format(blocked=blocked, run=run) for arg in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rlmem: error: cannot write {what} in {blocked}") and len(err.splitlines()) == 1
    assert err.endswith(f"{blocked} is a file, not a folder")


def test_a_folder_that_cannot_be_written_says_why(tmp_path: Path, monkeypatch):
    from rlmem.errors import writable_dir

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.TemporaryFile", refused)  # as for a folder without write permission
    with pytest.raises(ConfigError, match=r"cannot write the run in .*/run: Permission denied$"):
        writable_dir(tmp_path / "run", "the run")


def test_broken_yaml_is_a_config_error(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("memory: {hidden_size: [\n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        cfg.load(str(bad))
    bad.write_text("memory: [1, 2]\n")  # valid YAML, but not a section
    with pytest.raises(ConfigError, match=r"section memory must map its keys to values, .*; got \[1, 2\]"):
        cfg.load(str(bad))


def _resolves(config_path: str | None, args: list[str]) -> None:
    try:
        cfg.load(config_path, args)
    except ConfigError as err:
        # an optional environment package that is not installed here is the one acceptable refusal
        if "pip install" not in str(err):
            raise


def test_every_shipped_config_resolves():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        _resolves(str(path), [])
    for group in cfg.GROUPS:
        for path in sorted((REPO / "configs" / group).glob("*.yaml")):
            _resolves(None, [f"{group}={path.stem}"])


def test_a_saved_run_with_a_renamed_option_still_loads(tmp_path: Path):
    config = cfg.load(None, ["agent=td", "env=trace_patterning", "memory=ccn", "model.encoder=identity"])
    text = config.to_yaml().replace("trace_lambda:", "lam:")
    assert "lam:" in text
    (tmp_path / "config.yaml").write_text(text)
    assert cfg.load_saved(tmp_path).agent["trace_lambda"] == config.agent["trace_lambda"]


def test_a_saved_run_config_is_the_template_of_a_new_run(tmp_path: Path):
    """``rlmem train RUN/config.yaml train.seed=7``: the saved run again with another seed, in a run dir of
    its own; a group chosen on the command line replaces that saved section by the group's file."""
    saved = cfg.load(str(REPO / "configs" / "trace_patterning_ccn.yaml"),
                     ["memory.normalizer_decay=1.0", "agent.lr=0.003", f"train.run_dir={tmp_path / 'run'}"])
    (tmp_path / "config.yaml").write_text(saved.to_yaml())

    again = cfg.load(str(tmp_path / "config.yaml"), ["train.seed=7"])
    assert again.train.seed == 7 and again.train.run_dir is None
    assert again.memory == saved.memory and again.agent == saved.agent and again.env == saved.env
    assert again.choices == saved.choices
    assert cfg.load(str(tmp_path / "config.yaml"), ["train.run_dir=elsewhere"]).train.run_dir == "elsewhere"

    other_core = cfg.load(str(tmp_path / "config.yaml"), ["memory=elstm"])
    assert other_core.memory == cfg.resolve({"defaults": {"memory": "elstm"}}).memory
    assert other_core.agent == saved.agent and other_core.choices["memory"] == "elstm"


def test_a_saved_config_loads_back_equal_for_every_shipped_config(tmp_path: Path):
    """``config.yaml`` (written by PyYAML from plain data) resolves back to the same config, for every
    experiment file and a population grid (a nested mapping in ``train``)."""
    paths = [str(path) for path in sorted((REPO / "configs").glob("*.yaml"))]
    cases = [(path, []) for path in paths] + [
        (str(REPO / "configs" / "trace_patterning_ccn.yaml"),
         ["train.population=3", "train.population_grid={agent.lr: [0.003, 0.01]}", "agent.lr=1.0e-5"])]
    for path, args in cases:
        config = cfg.load(path, args)
        (tmp_path / "config.yaml").write_text(config.to_yaml())
        assert cfg.load_saved(tmp_path).to_dict() == config.to_dict(), path
