"""Shared by the serving benchmarks (e2e.py, profile_step.py, step_log.py, ...): machine facts,
a `vllm serve` process, tables, --dtypes variants.

Everything here stays on this machine: servers listen on 127.0.0.1 only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from importlib.metadata import entry_points
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {"vllm.general_plugins": "vllm_turboquant.plugin:register",
                "vllm.stat_logger_plugins": "vllm_turboquant.metrics:TurboQuantStatLogger"}


def run_worker(cmd: list[str], result_path: Path, log_path: Path, env: dict,
               timeout_s: float) -> dict:
    """Run a benchmark worker process (run_in_group) that saves its measurements as JSON in
    `result_path` as it goes; returns what it saved, plus an ``error`` when it timed out or
    exited non-zero (with the log's last lines), so one failing dtype never stops a run."""
    result_path.unlink(missing_ok=True)
    returncode, error = run_in_group(cmd, log_path, env, timeout_s)
    row: dict = {}
    try:
        row.update(json.loads(result_path.read_text()))
    except (OSError, ValueError):
        pass
    if error is None and returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-5:]
        error = f"worker exit {returncode}: {' | '.join(tail)}"
    if error:
        row["error"] = error
    return row


_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


def parse_variant(entry: str) -> tuple[str, dict[str, str]]:
    """One --dtypes entry -> (kv-cache dtype, environment overrides). ``NAME`` alone, or
    ``NAME@VAR=VALUE[@VAR=VALUE...]`` to run that dtype once more with its worker's
    environment changed, in the same call (an A/B of a knob: ``turboquant,
    turboquant@VLLM_TURBOQUANT_OWN_FA=0``); the row is labelled with the whole entry."""
    name, *pairs = entry.split("@")
    env = {}
    for pair in pairs:
        var, eq, value = pair.partition("=")
        if not (name and eq and _ENV_NAME.fullmatch(var)):
            raise ValueError(f"--dtypes entry {entry!r}: expected NAME or "
                             f"NAME@VAR=VALUE[@VAR=VALUE...] (VAR in capitals)")
        env[var] = value
    return name, env


def check_dtype_entries(ap, dtypes: list[str]) -> None:
    """Refuse (argparse error, exit 2) a malformed or repeated --dtypes entry before any model
    is built or engine started."""
    for d in dtypes:
        try:
            parse_variant(d)
        except ValueError as e:
            ap.error(str(e))
    if len(set(dtypes)) != len(dtypes):
        ap.error(f"--dtypes lists an entry twice: {','.join(dtypes)!r}")


def file_label(entry: str) -> str:
    """A --dtypes entry as a file-name part (variants' @ and = become _)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", entry)


def run_entry(script: str, prefix: str, entry: str, spec: dict, out_dir: Path,
              timeout_s: float, extra_env: dict | None = None,
              env_defaults: dict | None = None, env_drop: tuple = ()) -> dict:
    """`script --worker SPEC --worker-out FILE` for one --dtypes entry (a kv-cache dtype, or a
    variant NAME@VAR=VALUE: parse_variant) in a fresh process group (run_worker). The worker's
    spec gets the plain dtype and `label` (file_label: a prefix for any file it writes);
    result in out_dir/PREFIX_LABEL.json, log beside it. Environment, lowest priority first:
    env_defaults, ours, plugin_env, runner_env(dtype), extra_env, the variant's variables;
    then env_drop is removed. The row is labelled with the entry (after the worker's fields:
    its own "dtype" is the plain name)."""
    dtype, overrides = parse_variant(entry)
    label = file_label(entry)
    result_path = out_dir / f"{prefix}_{label}.json"
    log_path = out_dir / f"{prefix}_{label}.log"
    env = {**(env_defaults or {}), **os.environ, **plugin_env(), **runner_env(dtype),
           **(extra_env or {}), **overrides}
    for name in env_drop:
        env.pop(name, None)
    cmd = [sys.executable, script, "--worker", json.dumps({**spec, "dtype": dtype, "label": label}),
           "--worker-out", str(result_path)]
    return {**run_worker(cmd, result_path, log_path, env, timeout_s), "dtype": entry,
            "kv_cache_dtype": dtype}


def runner_env(dtype: str) -> dict[str, str]:
    """Per-dtype environment for vLLM 0.25 on GPU. gpu_suite.sh runs everything on the V1
    model runner (ours fails on V2, see there), but 0.25's V1 runner cannot build the cache of
    vLLM's own turboquant_* presets: _reshape_kv_cache_tensors passes cache dtype "auto" to
    TurboQuantBackend.get_kv_cache_shape ("Unknown TurboQuant cache dtype: 'auto'", seen on
    the H100 2026-11-23). They run on the V2 runner, vLLM's default for them."""
    if dtype.startswith("turboquant_"):
        return {"VLLM_USE_V2_MODEL_RUNNER": "1"}
    return {}


def run_in_group(cmd: list[str], log_path: Path, env: dict, timeout_s: float):
    """Run `cmd` as its own process group with its output in `log_path`, then kill the whole
    group (a child's engine-core and TP worker processes too, even when it crashed or hung).
    Returns (exit code, "timed out after N s" or None). A SIGTERM to us unwinds through the
    `finally`, so the group is killed then as well."""
    error = None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            proc.wait(timeout=max(timeout_s, 1))
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout_s:.0f} s"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
    return proc.returncode, error


# -- making vLLM's processes find the plugin -------------------------------------------------------
def plugin_env() -> dict[str, str]:
    """Environment for vLLM processes so they load the plugin and its stat logger.

    Installed (``pip install -e .``): nothing to add but the repository on PYTHONPATH. A bare
    checkout: a temporary ``*.dist-info`` declaring our entry points goes on PYTHONPATH too
    (vLLM finds plugins through entry points only). Raises SystemExit when the checkout's
    ``vllm_turboquant.kernels`` (the top-level kernels/ folder) is not importable, which only
    an install maps.
    """
    if importlib.util.find_spec("vllm_turboquant.kernels") is None:
        raise SystemExit("vllm_turboquant.kernels is not importable: install the plugin "
                         "first (pip install --no-deps -e .)")
    paths = [str(REPO)]
    installed = all(any(ep.value == value for ep in entry_points(group=group))
                    for group, value in ENTRY_POINTS.items())
    if not installed:
        folder = Path(tempfile.mkdtemp(prefix="tq-entry-points-"))
        dist = folder / "vllm_turboquant_entry_points-0.0.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text("Metadata-Version: 2.1\n"
                                       "Name: vllm-turboquant-entry-points\nVersion: 0.0.0\n")
        (dist / "entry_points.txt").write_text("".join(
            f"[{group}]\nturboquant = {value}\n\n" for group, value in ENTRY_POINTS.items()))
        paths.insert(0, str(folder))
    old = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": os.pathsep.join(paths + ([old] if old else []))}


# -- facts for the report ------------------------------------------------------------------------
def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    """Accelerator, CPU, versions: what a reader needs to compare numbers across runs."""
    info = {"host": platform.node(), "python": platform.python_version(),
            "git_sha": git_sha(), "cpu": _cpu_model(), "cpus": os.cpu_count()}
    try:
        import torch
        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
            info["gpu_memory_gib"] = round(
                torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except ImportError:
        pass
    from vllm_cli import vllm_version  # beside this file (benchmarks/ is on sys.path)
    try:
        info["vllm"] = vllm_version()
    except Exception:  # noqa: BLE001 - report what we can
        info["vllm"] = None
    import vllm_turboquant
    info["vllm_turboquant"] = vllm_turboquant.__version__
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def on_gpu() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """rows -> a markdown table; columns = (key, header, format spec like '.1f')."""
    def cell(v, fmt):
        if v is None:
            return "-"
        return format(v, fmt) if fmt and isinstance(v, (int, float)) else str(v)
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(cell(r.get(k), f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def header_lines(info: dict, extra: dict) -> str:
    hw = info.get("gpu") or info.get("cpu")
    parts = [f"machine: {hw}" + (f" x{info['gpu_count']}" if info.get("gpu_count") else ""),
             f"vLLM {info.get('vllm')}", f"torch {info.get('torch')}",
             f"vllm-turboquant {info.get('vllm_turboquant')} ({info.get('git_sha')})"]
    parts += [f"{k}: {v}" for k, v in extra.items()]
    return "\n".join(f"- {p}" for p in parts)


def bar_plot(rows: list[dict], label_key: str, panels: list[tuple[str, str]],
             title: str, path: Path) -> bool:
    """One bar chart per (key, axis label); False (and a message) without matplotlib."""
    from load import pyplot
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    labels = [str(r[label_key]) for r in rows]
    for ax, (key, ylabel) in zip(axes if len(panels) > 1 else [axes], panels):
        ax.bar(labels, [r.get(key) or 0 for r in rows])
        ax.set_title(ylabel, fontsize=9)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- a `vllm serve` process ------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """``vllm serve MODEL ARGS`` on 127.0.0.1 in its own process group, log to `log_path`.

    Use as a context manager: waits for /health on enter, stops the whole group on exit
    (SIGTERM, then SIGKILL after `stop_timeout_s`).
    """

    def __init__(self, model: str, args: list[str], log_path: Path, port: int | None = None,
                 env: dict | None = None, startup_timeout_s: float = 900.0,
                 stop_timeout_s: float = 60.0):
        from vllm_cli import vllm_command
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [*vllm_command(), "serve", model, "--host", "127.0.0.1",
                    "--port", str(self.port), *args]
        self.log_path = Path(log_path)
        # vLLM's processes must find the plugin and the stat logger (see plugin_env).
        self.env = {**os.environ, **plugin_env(), **(env or {})}
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "VllmServer":
        try:
            self.start()
        except BaseException:  # SIGTERM/Ctrl-C during startup: no server left behind
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self._log.write("$ " + " ".join(self.cmd) + "\n")
        self._log.flush()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._close_log()
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode} during "
                                   f"startup; log: {self.log_path}\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vllm serve not healthy after {self.startup_timeout_s:.0f} s; "
                           f"log: {self.log_path}\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM the process group (server, engine core, workers), SIGKILL what is left."""
        if self.proc is not None:
            for sig, grace in ((signal.SIGTERM, self.stop_timeout_s), (signal.SIGKILL, 30.0)):
                if not self._signal_group(sig):
                    break
                deadline = time.monotonic() + grace
                while time.monotonic() < deadline and self._signal_group(0):
                    self.proc.poll()  # reap the leader so the group can empty
                    time.sleep(0.5)
            self.proc.poll()
        self._close_log()

    def _signal_group(self, sig: int) -> bool:
        """Send `sig` to our process group; False when the group is gone."""
        try:
            os.killpg(self.proc.pid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def _close_log(self) -> None:
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""
