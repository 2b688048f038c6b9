"""A non-editable install resolves every group file and experiment config the same as the checkout does,
from a folder that is not the repository (the configs ship inside the package)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from rlmem import config as cfg

REPO = Path(__file__).resolve().parent.parent

# Runs inside the installed copy: every experiment file by name and by its checkout-relative path, and
# every group file as a command-line choice, each as its resolved dict.
RESOLVE_ALL = """
import json, sys
from pathlib import Path
import rlmem
from rlmem import config as cfg
assert Path(rlmem.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve()), rlmem.__file__
def resolved(*args):
    try:
        return cfg.load(*args).to_dict()
    except cfg.ConfigError as err:  # e.g. an optional env library missing: the same message either way
        return str(err)
root = cfg.packaged_configs()
out = {}
for name in cfg.experiment_names():
    out["file:" + name] = resolved(name)
    out["path:" + name] = resolved(f"configs/{name}.yaml")
for group in cfg.GROUPS:
    for path in sorted((root / group).glob("*.yaml")):
        out[f"{group}={path.stem}"] = resolved(None, [f"{group}={path.stem}"])
print(json.dumps(out))
"""


def resolved(*args) -> dict | str:
    try:
        return cfg.load(*args).to_dict()
    except cfg.ConfigError as err:
        return str(err)


def resolve_in_checkout() -> dict:
    out = {}
    for name in cfg.experiment_names():
        out["file:" + name] = out["path:" + name] = resolved(str(REPO / "configs" / f"{name}.yaml"))
    for group in cfg.GROUPS:
        for path in sorted((REPO / "configs" / group).glob("*.yaml")):
            out[f"{group}={path.stem}"] = resolved(None, [f"{group}={path.stem}"])
    return json.loads(json.dumps(out))


def test_a_non_editable_install_resolves_every_config_from_another_folder(tmp_path: Path):
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(REPO)],
        capture_output=True, text=True,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    assert (site / "rlmem" / "configs" / "memory" / "elstm.yaml").is_file()
    assert not (site / "rlmem" / "configs").is_symlink()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-c", RESOLVE_ALL, str(site)], cwd=elsewhere, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    installed = json.loads(result.stdout)
    expected = resolve_in_checkout()
    assert sorted(installed) == sorted(expected)
    for key, value in expected.items():
        assert installed[key] == value, f"{key} resolves differently in the installed package"
    # the group files are really read, not replaced by a registered name's dataclass defaults
    assert installed["memory=cfc_lowrank"]["memory"]["name"] == "cfc"
    assert installed["file:atari_pong_elstm"]["memory"]["grad"] == "rtrl"
