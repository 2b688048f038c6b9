"""``make gpu-check`` / ``python -m rlmem.gpu_check``: everything rlmem does on a GPU, in one command.

GPU time comes in short windows, so the check is one prepared command that runs unchanged on a bare
machine whose Python has a CUDA build of torch (the optional extras, if any, put on ``PYTHONPATH``):

==================  ==========================================================================  =======
step                what it runs                                                                 limit
==================  ==========================================================================  =======
device              device name, compute capability, memory; sets ``TORCH_CUDA_ARCH_LIST``        20 s
kernels-build       ``rlmem kernels build`` (``kernels.loader.build_command``), that device only  105 s
pytest-gpu          ``pytest -m gpu -q`` (``-n 4`` with pytest-xdist) on the files with the marker 60 s
bench-kernels       ``rlmem bench kernels --forms real,complex --repeats 5 --warmup 1``           25 s
train-gru           ``rlmem train configs/atari_pong_gru.yaml train.device=cuda
                    train.total_steps=20000 train.progress=false``; ``charts/SPS`` read back      35 s
                    from the run's event files
train-elstm         the same with ``atari_pong_elstm.yaml`` (grad rtrl)                           35 s
train-lru           the same with ``atari_pong_lru.yaml``                                         35 s
train-elstm-bptt    ``atari_pong_elstm.yaml memory.grad=bptt``: the same iteration by BPTT         35 s
train-gru-envs64    ``atari_pong_gru.yaml env.num_envs=64``: the GPU's batch, not the CPU's         45 s
bench-population    ``rlmem bench population --members 1,256,2048 --methods elstm,ccn --device    30 s
                    cuda``: P in the thousands (rows print as they finish, so a timeout keeps 256)
bench-envs-atari    ``rlmem bench envs --sources atari --steps 100 --repeats 1``                  30 s
bench-envs-procgen  ``rlmem bench envs --sources procgen --steps 100 --repeats 1`` (skipped at once 5 s
                    without a procgen wheel, the usual case)
==================  ==========================================================================  =======

The limits sum to 460 s, inside the overall budget (``--budget``, 460 s by default, under 8 minutes):
each step gets the smaller of its own limit and what is left of the budget, so a hang in one step costs
that step's limit (and a 5 s grace after an interrupt) and no more, and the next step still runs.

Contract. The check imports only the standard library, so it starts wherever ``python3`` does. Every
step is a child process (``sys.executable``) in its own session, killed with its whole process group
(compilers, env workers) when its limit passes. A step ends in one of

* ``ok``: it exited 0 (and its output shows it did its work);
* ``failed``: it exited non-zero, or its output shows it could not do its work;
* ``timeout``: its limit passed; it is sent SIGINT (a training then closes its event files, so its SPS
  is still read), and killed 5 s later;
* ``skipped``: it cannot run here and says why: no CUDA device, or a module it needs is missing
  (checked before it starts, and recognised in its output when an import fails anyway).

Everything the steps print goes to ``<out>/gpu_check.log`` under one header per step;
``<out>/summary.json`` holds the device and, per step, its command, limit, status, seconds, reason and
the figures read from its output (SPS of the trainings, env steps/s, kernel speed-ups, test counts).
``summary.json`` also judges the figures against the targets rlmem sets itself on a GPU (``TARGETS``):
the fused window kernels at least 20x the engine's eager reference and 20x eager stepping, the
per-step kernel at least 70 % of a measured device-to-device copy's bandwidth, an elstm rtrl window
and training iteration at most 1.5x the same in bptt, and Atari Pong with a GRU at 5,000 env steps/s
or more.
The exit status is 0 when every step ran or was skipped, 1 when any step failed or timed out, and 2 for
a bad argument.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path("runs/gpu-check")
DEFAULT_BUDGET_S = 460.0
DEFAULT_TRAIN_STEPS = 20_000
# The trainings: (step name suffix, configs/atari_pong_<core>.yaml, overrides beyond the common ones,
# limit in seconds).
TRAININGS: tuple[tuple[str, str, tuple[str, ...], float], ...] = (
    ("gru", "gru", (), 35),
    ("elstm", "elstm", (), 35),
    ("lru", "lru", (), 35),
    ("elstm-bptt", "elstm", ("memory.grad=bptt",), 35),  # the same iteration by BPTT: the rtrl/bptt ratio
    ("gru-envs64", "gru", ("env.num_envs=64",), 45),  # a batch sized for the GPU; 64 emulators take longer to build
)
FIRST_PARTY = ("rlmem", "agents", "envs", "kernels")
NO_CUDA = "no CUDA device"
INTERRUPT_GRACE_S = 5.0
EXTENSION_NAME = "rlmem_sensitivity_kernels"  # kernels.loader.EXTENSION_NAME (not imported: it needs torch)
STATUSES = ("ok", "failed", "timeout", "skipped")
# The child processes' imports: each step names what it needs so that a missing one is a skip.
TRAIN_MODULES = ("numpy", "yaml", "omegaconf", "gymnasium", "ale_py", "tqdm", "tensorboard")
BENCH_ENVS_MODULES = ("numpy", "gymnasium")
# A stand-in for `rlmem bench <what>` that needs only the benchmark's own imports (the CLI module
# imports every command's dependencies).
BENCH_CODE = "import sys; from rlmem.bench.{module} import run; run(sys.argv[1:])"
KERNELS_BUILD_CODE = "import sys; from kernels.loader import build_command; sys.exit(build_command(sys.argv[1:]))"


@dataclass
class Step:
    """One child process of the check.

    ``requires``: top-level modules it imports (a missing one skips it); ``needs_cuda``: skipped
    without a CUDA device; ``read``: called with its output once it ends (or is stopped), gives the
    figures and an optional verdict, a ``(status, reason)`` pair that overrides an exit status of 0
    (and, when the status is "skipped", a non-zero one: a build tool that is absent)."""

    name: str
    command: list[str]
    limit_s: float
    requires: tuple[str, ...] = ()
    needs_cuda: bool = True
    read: Callable[[str], tuple[dict[str, Any], tuple[str, str] | None]] | None = None
    skip_reason: str = ""  # known before it starts (e.g. no test files)
    # An import error of a third-party module in the output means "skipped: <module> missing" (not for
    # pytest, where a test that fails on an import is a failure).
    missing_is_skip: bool = True


@dataclass
class StepResult:
    """What one step did; a row of ``summary.json``."""

    name: str
    command: str
    limit_s: float
    status: str
    seconds: float
    reason: str = ""
    figures: dict[str, Any] = field(default_factory=dict)


class StepRunner:
    """Runs steps one after another into one log, within an overall time budget."""

    def __init__(self, log_path: Path, budget_s: float, cuda: bool, env: dict[str, str] | None = None,
                 echo: Callable[[str], None] | None = None) -> None:
        self.log_path = log_path
        self.deadline = time.monotonic() + budget_s
        self.cuda = cuda
        self.env = dict(os.environ if env is None else env)
        self.echo = echo or (lambda line: print(line, flush=True))
        self.results: list[StepResult] = []

    def run(self, step: Step) -> StepResult:
        """Run ``step`` (or record why it cannot run) and return its result; never raises for a step."""
        command_text = shlex.join(step.command)
        limit = min(step.limit_s, max(0.0, self.deadline - time.monotonic()))
        self._write(f"\n===== {step.name} (limit {limit:.0f} s) =====\n$ {command_text}\n")
        reason = (NO_CUDA if step.needs_cuda and not self.cuda else "") or step.skip_reason
        if not reason:  # every missing module at once: all the wheels to bring next time
            missing = [name for name in step.requires if not module_available(name)]
            reason = f"{', '.join(missing)} missing" if missing else ""
        if reason:
            result = StepResult(step.name, command_text, step.limit_s, "skipped", 0.0, reason)
        elif limit < 1.0:
            result = StepResult(step.name, command_text, step.limit_s, "timeout", 0.0,
                                "no time left of the overall budget")
        else:
            result = self._execute(step, command_text, limit)
        self._write(f"----- {step.name}: {result.status} in {result.seconds:.1f} s"
                    + (f" ({result.reason})" if result.reason else "") + "\n")
        self.echo(f"[gpu-check] {result.name:<20} {result.status:<8} {result.seconds:6.1f} s  {result.reason}")
        self.results.append(result)
        return result

    def _write(self, text: str) -> None:
        with self.log_path.open("a", encoding="utf-8") as log:
            log.write(text)

    def _execute(self, step: Step, command_text: str, limit: float) -> StepResult:
        with self.log_path.open("a", encoding="utf-8") as log:
            start_offset = log.tell()
            started = time.monotonic()
            # Own session: on a timeout the whole group (compilers, env workers) goes, and no orphan
            # keeps writing to the log.
            process = subprocess.Popen(step.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       cwd=REPO_ROOT, env=self.env, start_new_session=True)
            try:
                returncode: int | None = process.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                returncode = None
                # An interrupt first: a training closes its event files, pytest prints its counts.
                interrupt_group(process, INTERRUPT_GRACE_S)
            finally:
                kill_group(process)
            seconds = time.monotonic() - started
        output = read_from(self.log_path, start_offset)
        figures: dict[str, Any] = {}
        verdict = None
        if step.read is not None:
            try:
                figures, verdict = step.read(output)
            except Exception as exc:  # a reader must not cost the rest of the check
                figures = {"read_error": f"{type(exc).__name__}: {exc}"}
        if returncode is None:
            status, reason = "timeout", f"still running after {limit:.0f} s"
        elif returncode != 0:
            missing = missing_module(output) if step.missing_is_skip else ""
            if missing:
                status, reason = "skipped", f"{missing} missing"
            elif verdict is not None and verdict[0] == "skipped":
                status, reason = verdict
            else:
                status, reason = "failed", f"exit status {returncode}"
        elif verdict is not None:
            status, reason = verdict
        else:
            status, reason = "ok", ""
        return StepResult(step.name, command_text, step.limit_s, status, round(seconds, 1), reason, figures)


def interrupt_group(process: subprocess.Popen, grace_s: float) -> None:
    """Send SIGINT to ``process``'s group and give it ``grace_s`` seconds to exit."""
    try:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=grace_s)
    except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
        pass


def kill_group(process: subprocess.Popen) -> None:
    """End ``process`` and everything it started (its session's process group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def extension_build_locks(env: dict[str, str]) -> list[Path]:
    """Lock files of the kernels' build in torch's extension folder (``TORCH_EXTENSIONS_DIR``, else
    ``<cache>/torch_extensions/<python+cuda tag>``). A build killed mid-way leaves its lock behind, and
    the next build of the extension then waits for it forever."""
    root = env.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torch_extensions")
    root_path = Path(root)
    return [*root_path.glob(f"{EXTENSION_NAME}/lock"), *root_path.glob(f"*/{EXTENSION_NAME}/lock")]


def with_pip_ninja(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the binary of a pip-installed ``ninja`` package on ``PATH`` when no ``ninja`` is on it
    (wheels installed with ``pip install --target DIR`` and put on ``PYTHONPATH`` leave their scripts in
    ``DIR/bin``, off the ``PATH`` that torch's build searches; older ninja wheels keep the binary in
    ``ninja/data/bin``)."""
    if shutil.which("ninja", path=env.get("PATH")):
        return env
    spec = importlib.util.find_spec("ninja") if module_available("ninja") else None
    for location in (spec.submodule_search_locations or []) if spec else []:
        for bin_dir in (Path(location).parent / "bin", Path(location) / "data" / "bin"):
            if os.access(bin_dir / "ninja", os.X_OK):
                return {**env, "PATH": os.pathsep.join(p for p in (str(bin_dir), env.get("PATH", "")) if p)}
    return env


def read_from(path: Path, offset: int) -> str:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", errors="replace")


def module_available(name: str) -> bool:
    """Whether the top-level module ``name`` can be imported (found on the path; not imported)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing_module(output: str) -> str:
    """The third-party module whose import failed in ``output`` ("" if none): the step is skipped, not
    failed. A first-party module that cannot be imported is a real failure."""
    for name in re.findall(r"ModuleNotFoundError: No module named '([^']+)'", output):
        top = name.split(".")[0]
        if top not in FIRST_PARTY:
            return top
    return ""


# ----------------------------------------------------------------------------------------------------
# Readers: figures from a step's output


def read_device(output: str) -> tuple[dict[str, Any], tuple[str, str] | None]:
    """The ``DEVICE {...}`` line the device step prints; skipped without a CUDA device."""
    lines = [line for line in output.splitlines() if line.startswith("DEVICE ")]
    if not lines:
        return {}, ("failed", "no device line in the output")
    info = json.loads(lines[-1][len("DEVICE "):])
    if not info.get("available"):
        return info, ("skipped", NO_CUDA)
    return info, None


def arch_list(info: dict[str, Any]) -> str:
    """``TORCH_CUDA_ARCH_LIST`` for the visible devices only, e.g. "9.0" (or "8.6;9.0")."""
    capabilities = sorted({tuple(d["capability"]) for d in info.get("devices", [])})
    return ";".join(f"{major}.{minor}" for major, minor in capabilities)


def missing_build_tool(output: str) -> str:
    """"nvcc missing" or "ninja missing" when the kernels' loader says a build tool is absent, else ""."""
    if "the CUDA toolkit (nvcc) was not found" in output:
        return "nvcc missing (the CUDA toolkit; set CUDA_HOME)"
    if "ninja is not installed" in output:
        return "ninja missing"
    return ""


def read_kernels_build(output: str) -> tuple[dict[str, Any], tuple[str, str] | None]:
    """The architectures built for; skipped (not failed) when nvcc or ninja is absent."""
    tool = missing_build_tool(output)
    if tool:
        return {}, ("skipped", tool)
    match = re.search(r"architectures: (.+)", output)
    return ({"architectures": match.group(1).strip()} if match else {}), None


def read_pytest(output: str) -> tuple[dict[str, Any], tuple[str, str] | None]:
    """Counts from pytest's last line ("3 passed, 2 skipped, 40 deselected in 5.1s")."""
    figures = {kind: int(n) for n, kind in re.findall(
        r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)", output)}
    return figures, None


def read_bench_kernels(output: str) -> tuple[dict[str, Any], tuple[str, str] | None]:
    """Per row ("<form> <T> <direction>"): the speed-up over the engine's reference and over eager
    stepping (None where not timed), G element-updates/s, and for the per-step rows the achieved
    bandwidth as a fraction of the measured copy; the measured copy; the elstm window's times (ms)."""
    if "the CUDA kernels are unavailable here" in output:
        tool = missing_build_tool(output)
        return {}, ("skipped", tool) if tool else ("failed", "the CUDA kernels are unavailable")
    if "no CUDA device is available here" in output:
        return {}, ("skipped", NO_CUDA)
    rows: dict[str, dict[str, float | None]] = {}
    row = re.compile(r"^(\w+)\s+(\d+)\s+(\S.*?)\s+[\d.]+m\s.*?([\d.]+)x\s+(?:([\d.]+)x|-)\s+([\d.]+)\s*$")
    bandwidth = re.compile(r"^\s+bandwidth\s+(\d+) GB/s = .*?(\d+)% of the measured copy")
    core_row = re.compile(r"^\s+(rtrl|rtrl \(kernels off\)|bptt)\s+([\d.]+) ms\s+[\d.]+x bptt")
    last_row = None
    elstm_window_ms: dict[str, float] = {}
    for line in output.splitlines():
        match = row.match(line)
        if match:
            form, T, direction, vs_ref, vs_step, rate = match.groups()
            last_row = rows[f"{form} T={T} {direction.strip()}"] = {
                "vs_reference": float(vs_ref), "vs_stepwise": float(vs_step) if vs_step else None,
                "G_per_s": float(rate)}
            continue
        match = bandwidth.match(line)
        if match and last_row is not None:
            last_row["GB_per_s"], last_row["of_copy"] = float(match.group(1)), int(match.group(2)) / 100
            continue
        match = core_row.match(line)
        if match:
            elstm_window_ms[match.group(1)] = float(match.group(2))
    copy = re.search(r"measured device-to-device copy (\d+) GB/s", output)
    figures: dict[str, Any] = {"rows": rows}
    if copy:
        figures["copy_GB_per_s"] = float(copy.group(1))
    if elstm_window_ms:
        figures["elstm_window_ms"] = elstm_window_ms
    return figures, None


def bench_envs_reader(source: str) -> Callable[[str], tuple[dict[str, Any], tuple[str, str] | None]]:
    """Env steps/s of ``source``'s row in ``rlmem bench envs``' table."""
    columns = ("raw", "vecenv", "policy", "rollout", "overlap")

    def read(output: str) -> tuple[dict[str, Any], tuple[str, str] | None]:
        for line in output.splitlines():
            fields = line.split()
            if not fields or fields[0] != source:
                continue
            skipped = re.search(r"skipped: (\S+) is not installed", line)
            if skipped:
                return {}, ("skipped", f"{skipped.group(1)} missing")
            values = fields[2:2 + len(columns)]
            figures = {"num_envs": int(fields[1])} if fields[1].isdigit() else {}
            for name, value in zip(columns, values):
                figures[name] = None if value == "-" else float(value.replace(",", ""))
            return figures, None
        return {}, ("failed", f"no {source} row in the table")

    return read


def read_bench_population(output: str) -> tuple[dict[str, Any], tuple[str, str] | None]:
    """Per method and population size: the alone rate, the member-steps/s and the speed-up."""
    rows = {}
    for method, size, alone, members, speedup in re.findall(r"^\s*(\w+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)x\s*$",
                                                           output, flags=re.MULTILINE):
        rows[f"{method} P={size}"] = {"alone_steps_per_s": float(alone), "member_steps_per_s": float(members),
                                      "speedup": float(speedup)}
    return ({"rows": rows}, None) if rows else ({}, ("failed", "no rows in the table"))


def read_sps(run_dir: Path) -> dict[str, Any]:
    """``charts/SPS`` of a run from its TensorBoard event files: the last value, the median over the
    second half of the run (past start-up and compilation), the number of points and the last step."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return {"note": "tensorboard missing: SPS not read"}
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    if "charts/SPS" not in accumulator.Tags().get("scalars", []):
        return {}
    events = accumulator.Scalars("charts/SPS")
    later = sorted(e.value for e in events[len(events) // 2:])
    return {"SPS": round(events[-1].value, 1), "SPS_median": round(later[len(later) // 2], 1),
            "points": len(events), "last_step": events[-1].step}


def train_reader(run_dir: Path) -> Callable[[str], tuple[dict[str, Any], tuple[str, str] | None]]:
    def read(output: str) -> tuple[dict[str, Any], tuple[str, str] | None]:
        figures = read_sps(run_dir)
        if "SPS" not in figures and "note" not in figures:
            return figures, ("failed", "no charts/SPS in the run's event files")
        return figures, None

    return read


# ----------------------------------------------------------------------------------------------------
# The steps


GPU_MARKER = re.compile(r"^\s*@pytest\.mark\.gpu\b|marks=\[?\s*pytest\.mark\.gpu\b|^pytestmark\b.*\bgpu\b",
                        re.MULTILINE)


def gpu_test_files(tests_dir: Path) -> tuple[list[str], dict[str, str]]:
    """Test files that carry the ``gpu`` marker and whose imports are all present here, and those left
    out with the module they miss (so that one missing extra does not stop the kernels' tests)."""
    chosen, left_out = [], {}
    for path in sorted(tests_dir.glob("test_*.py")):
        text = path.read_text(encoding="utf-8")
        if not GPU_MARKER.search(text):
            continue
        imported = re.findall(r"^(?:import|from) ([A-Za-z_]\w*)", text, flags=re.MULTILINE)
        missing = next((name for name in dict.fromkeys(imported)
                        if name != "__future__" and not module_available(name)), None)
        relative = str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)
        if missing:
            left_out[relative] = f"{missing} missing"
        else:
            chosen.append(relative)
    return chosen, left_out


def gpu_steps(out: Path, train_steps: int, tests_dir: Path = REPO_ROOT / "tests") -> list[Step]:
    """The check's steps after the device step, in order."""
    python = sys.executable
    test_files, left_out = gpu_test_files(tests_dir) if tests_dir.is_dir() else ([], {})

    def read_tests(output: str) -> tuple[dict[str, Any], tuple[str, str] | None]:
        figures, verdict = read_pytest(output)
        if left_out:
            figures["left_out"] = left_out
        return figures, verdict

    # pytest-xdist, where present, runs the GPU tests in 4 processes sharing the device
    parallel = ["-n", "4"] if module_available("xdist") else []
    steps = [
        Step("kernels-build", [python, "-c", KERNELS_BUILD_CODE], 105, requires=("torch",),
             read=read_kernels_build),
        Step("pytest-gpu",
             [python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *parallel, *test_files], 60,
             requires=("pytest", "numpy"), read=read_tests, missing_is_skip=False,
             skip_reason="" if test_files else f"no runnable gpu-marked test files ({left_out or 'tests/ absent'})"),
        Step("bench-kernels", [python, "-c", BENCH_CODE.format(module="kernels"), "--forms", "real,complex",
                               "--repeats", "5", "--warmup", "1"], 25, requires=("torch",), read=read_bench_kernels),
    ]
    for name, core, overrides, limit in TRAININGS:
        run_dir = out / "train" / name
        steps.append(Step(
            f"train-{name}",
            [python, "-m", "rlmem.cli", "train", f"configs/atari_pong_{core}.yaml", "train.device=cuda",
             f"train.total_steps={train_steps}", "train.progress=false", f"train.run_dir={run_dir}", *overrides],
            limit, requires=TRAIN_MODULES, read=train_reader(run_dir)))
    steps.append(Step(
        "bench-population",
        [python, "-c", BENCH_CODE.format(module="population"), "--members", "1,256,2048", "--methods", "elstm,ccn",
         "--steps", "10", "--repeats", "1", "--device", "cuda"],
        30, requires=("numpy", "omegaconf", "gymnasium", "tensorboard"), read=read_bench_population))
    for source, limit, package in (("atari", 30, "ale_py"), ("procgen", 5, "procgen")):
        steps.append(Step(
            f"bench-envs-{source}",
            [python, "-c", BENCH_CODE.format(module="envs"), "--sources", source, "--steps", "100",
             "--repeats", "1"],
            limit, requires=(*BENCH_ENVS_MODULES, package), read=bench_envs_reader(source)))
    return steps


def device_info() -> dict[str, Any]:
    """What torch sees: its version, CUDA version, and per visible device its name, compute capability
    and memory (the device step's child process runs this)."""
    import torch  # the only third-party import of the check, in its child process

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                            "available": torch.cuda.is_available(), "devices": []}
    if info["available"]:
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            info["devices"].append({"name": properties.name, "capability": [properties.major, properties.minor],
                                    "memory_gib": round(properties.total_memory / 2**30, 1),
                                    "multiprocessors": properties.multi_processor_count})
        info["free_gib"] = round(torch.cuda.mem_get_info(0)[0] / 2**30, 1)
    return info


def device_step() -> Step:
    return Step("device", [sys.executable, "-m", "rlmem.gpu_check", "--device-info"], 20, requires=("torch",),
                needs_cuda=False, read=read_device)


STEP_NAMES = ("device", "kernels-build", "pytest-gpu", "bench-kernels", *(f"train-{t[0]}" for t in TRAININGS),
              "bench-population",
              "bench-envs-atari", "bench-envs-procgen")


# ----------------------------------------------------------------------------------------------------
# Summary and entry point


# ----------------------------------------------------------------------------------------------------
# Targets: what the figures are judged against

# name: (comparison, threshold, what it is)
TARGETS: dict[str, tuple[str, float, str]] = {
    "window_kernels_vs_reference": (">=", 20.0, "fused window kernels (T > 1) over the engine's eager reference, "
                                                 "the smallest ratio of all forms and directions"),
    "window_kernels_vs_eager_stepping": (">=", 20.0, "fused window forward (T > 1) over recursion (1) stepped "
                                                      "eagerly, the smallest ratio of all forms"),
    "step_kernel_of_copy": (">=", 0.70, "per-step kernel's bandwidth over a measured device-to-device copy's, "
                                        "the smallest of all forms"),
    "elstm_window_rtrl_over_bptt": ("<=", 1.5, "elstm window forward + backward, time rtrl / time bptt"),
    "elstm_training_rtrl_over_bptt": ("<=", 1.5, "elstm Pong training iteration, time rtrl / time bptt "
                                                 "(median SPS of bptt over rtrl)"),
    "pong_gru_sps": (">=", 5000.0, "Atari Pong GRU training, env steps/s (median over the run's second "
                                   "half, the best of the GRU trainings)"),
}


def target_values(results: Sequence[StepResult]) -> dict[str, float | None]:
    """The value of each target from the steps' figures (None where the steps that give it did not run)."""
    by_name = {r.name: r.figures for r in results if r.status == "ok"}
    kernels = by_name.get("bench-kernels", {})
    rows = kernels.get("rows", {})
    windows = [r["vs_reference"] for key, r in rows.items() if key.split()[1] != "T=1"]
    stepwise = [r["vs_stepwise"] for key, r in rows.items() if key.split()[1] != "T=1" and r.get("vs_stepwise")]
    steps = [r["of_copy"] for r in rows.values() if "of_copy" in r]
    window_ms = kernels.get("elstm_window_ms", {})
    sps = {name: figures.get("SPS_median") for name, figures in by_name.items() if name.startswith("train-")}
    gru = [value for name, value in sps.items() if name.startswith("train-gru") and value]
    return {
        "window_kernels_vs_reference": min(windows) if windows else None,
        "window_kernels_vs_eager_stepping": min(stepwise) if stepwise else None,
        "step_kernel_of_copy": min(steps) if steps else None,
        "elstm_window_rtrl_over_bptt": (window_ms["rtrl"] / window_ms["bptt"]
                                        if {"rtrl", "bptt"} <= set(window_ms) else None),
        "elstm_training_rtrl_over_bptt": (sps["train-elstm-bptt"] / sps["train-elstm"]
                                          if sps.get("train-elstm") and sps.get("train-elstm-bptt") else None),
        "pong_gru_sps": max(gru) if gru else None,
    }


def judge_targets(results: Sequence[StepResult]) -> dict[str, dict[str, Any]]:
    """Per target: its value, the threshold, whether it is met (None when not measured) and what it is."""
    judged = {}
    for name, value in target_values(results).items():
        comparison, threshold, what = TARGETS[name]
        met = None if value is None else (value >= threshold if comparison == ">=" else value <= threshold)
        judged[name] = {"value": None if value is None else round(value, 3), "target": f"{comparison} {threshold:g}",
                        "met": met, "what": what}
    return judged


def write_summary(path: Path, device: dict[str, Any], results: Sequence[StepResult], budget_s: float) -> dict:
    """``summary.json``: the device, the overall verdict and one entry per step (see the module
    docstring). Returns what it wrote."""
    summary = {
        "device": device,
        "budget_s": budget_s,
        "seconds": round(sum(r.seconds for r in results), 1),
        "ok": all(r.status in ("ok", "skipped") for r in results),
        "counts": {status: sum(r.status == status for r in results) for status in STATUSES},
        "steps": [asdict(r) for r in results],
        "targets": judge_targets(results),
    }
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def summary_table(results: Sequence[StepResult]) -> str:
    """One line per step: status, seconds against the limit, the reason or the main figures."""
    lines = [f"{'step':<20} {'status':<8} {'seconds':>11}  figures / reason", "-" * 72]
    for r in results:
        if r.reason:
            note = r.reason
        elif "SPS" in r.figures:
            note = f"SPS {r.figures['SPS']:,.0f} (median {r.figures['SPS_median']:,.0f})"
        elif r.name == "device" and r.figures.get("devices"):
            d = r.figures["devices"][0]
            note = f"{d['name']}, sm_{d['capability'][0]}{d['capability'][1]}, {d['memory_gib']} GiB"
        elif r.name.startswith("bench-envs") and r.figures:
            note = ", ".join(f"{k} {v:,.0f}" for k, v in r.figures.items() if isinstance(v, float))
        elif r.name == "bench-population" and r.figures.get("rows"):
            note = ", ".join(f"{k} {v['member_steps_per_s']:,.0f}/s ({v['speedup']:.1f}x)"
                             for k, v in r.figures["rows"].items() if not k.endswith("P=1"))
        elif r.name == "pytest-gpu":
            note = ", ".join(f"{v} {k}" for k, v in r.figures.items() if isinstance(v, int))
            note += "".join(f"; left out {Path(f).name} ({why})" for f, why in r.figures.get("left_out", {}).items())
        else:
            note = ""
        lines.append(f"{r.name:<20} {r.status:<8} {r.seconds:5.1f}/{r.limit_s:<5.0f}  {note}")
    return "\n".join(lines)


def targets_table(targets: dict[str, dict[str, Any]]) -> str:
    """One line per target: value, threshold, met / missed / not measured."""
    lines = [f"{'target':<32} {'value':>10} {'wanted':>9}  verdict", "-" * 64]
    for name, t in targets.items():
        verdict = "not measured" if t["met"] is None else ("met" if t["met"] else "MISSED")
        value = "-" if t["value"] is None else f"{t['value']:,.3g}" if t["value"] < 1000 else f"{t['value']:,.0f}"
        lines.append(f"{name:<32} {value:>10} {t['target']:>9}  {verdict}")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, like every other user error
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="rlmem.gpu_check", description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--only", default=None, metavar="STEP,...",
                        help=f"run only these steps (device always runs): {', '.join(STEP_NAMES[1:])}")
    parser.add_argument("--train-steps", type=int, default=DEFAULT_TRAIN_STEPS,
                        help=f"agent steps of each training (default {DEFAULT_TRAIN_STEPS})")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for the whole check (default {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--device-info", action="store_true", help=argparse.SUPPRESS)  # the device step's child
    ns = parser.parse_args(argv)
    if ns.only is not None:
        ns.only = [name.strip() for name in ns.only.split(",") if name.strip()]
        unknown = [name for name in ns.only if name not in STEP_NAMES]
        if unknown or not ns.only:
            parser.error(f"--only: unknown step {unknown[0] if unknown else ns.only!r}; "
                         f"valid: {', '.join(STEP_NAMES)}")
    if ns.train_steps <= 0:
        parser.error(f"--train-steps must be positive, got {ns.train_steps}")
    if ns.budget <= 0:
        parser.error(f"--budget must be positive, got {ns.budget}")
    return ns


def run_check(runner: StepRunner, out: Path, only: Sequence[str] | None, train_steps: int) -> dict[str, Any]:
    """The device step, then (with ``TORCH_CUDA_ARCH_LIST`` set from it) the steps named in ``only``, or all;
    returns what the device step saw. Results accumulate in ``runner.results``."""
    device_result = runner.run(device_step())
    device = device_result.figures
    runner.cuda = bool(device.get("available")) and device_result.status == "ok"
    if runner.cuda:
        arch = arch_list(device)
        runner.env["TORCH_CUDA_ARCH_LIST"] = arch  # build for the visible device only
        device["TORCH_CUDA_ARCH_LIST"] = arch
    for step in gpu_steps(out, train_steps):
        if only is not None and step.name not in only:
            continue
        if step.name.startswith("train-"):  # a run dir holding a run would be refused
            shutil.rmtree(out / "train" / step.name.removeprefix("train-"), ignore_errors=True)
        if step.name == "kernels-build" and runner.cuda:
            for lock in extension_build_locks(runner.env):
                runner.echo(f"[gpu-check] removing a lock left by an interrupted build: {lock}")
                lock.unlink(missing_ok=True)
        result = runner.run(step)
        if step.name == "kernels-build" and result.status in ("failed", "timeout"):
            for lock in extension_build_locks(runner.env):
                lock.unlink(missing_ok=True)
            # Without this every later process would try (and wait for) the build again.
            runner.env["RLMEM_KERNELS"] = "0"
            runner.echo("[gpu-check] the kernels are off (RLMEM_KERNELS=0) from here on: their build did not finish")
    return device


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    if ns.device_info:
        print("DEVICE " + json.dumps(device_info()), flush=True)
        return 0
    out = ns.out.resolve()
    log_path = out / "gpu_check.log"
    try:  # before any step runs: on a lent machine a late failure costs the whole window
        out.mkdir(parents=True, exist_ok=True)
        log_path.write_text(f"rlmem gpu check: {sys.executable} (Python {sys.version.split()[0]}), "
                            f"repository {REPO_ROOT}\n", encoding="utf-8")
    except OSError as err:
        print(f"rlmem.gpu_check: error: cannot write in --out {out}: {err.strerror or err}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    # The children import the repository's packages, whatever the working folder.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Where site-packages is read-only (a bare GPU image), every step would compile torch's modules
    # again (about 7 s a process): cache the byte code under the output folder instead.
    env.setdefault("PYTHONPYCACHEPREFIX", str(out / "pycache"))
    runner = StepRunner(log_path, ns.budget, cuda=False, env=with_pip_ninja(env))
    device: dict[str, Any] = {}
    interrupted = False
    try:
        device = run_check(runner, out, ns.only, ns.train_steps)
    except KeyboardInterrupt:  # the running step's group is gone already (StepRunner kills it on the way out)
        interrupted = True
        print("[gpu-check] interrupted: the summary holds the steps that ended", flush=True)
        device = runner.results[0].figures if runner.results else {}

    summary = write_summary(out / "summary.json", device, runner.results, ns.budget)
    print()
    print(summary_table(runner.results))
    print()
    print(targets_table(summary["targets"]))
    print(f"\nlog: {log_path}\nsummary: {out / 'summary.json'}")
    if interrupted:
        return 130
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
