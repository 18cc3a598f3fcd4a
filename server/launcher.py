"""Start the `tritonserver` bundled in nvidia-pytriton as a child process, with our model repository.

Everything is derived from the running interpreter (`sys.executable`, `sysconfig`) and the
installed `pytriton` package: a backends directory holding the python backend and the stub built
for this Python's major.minor, PATH with the interpreter's bin first (the stub finds its Python on
PATH), LD_LIBRARY_PATH with the wheel's bundled libraries and this Python's LIBDIR.

Readiness is `TritonClient.readiness()` (gRPC: server live and ready, every model READY); while
waiting for it, a server that exits or a model that fails to load raises `TritonLaunchError`
carrying the model's own load error from Triton's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from server.errors import BackendUnavailable
from server.settings import MODEL_REPOSITORY_VARIABLE, TritonSettings
from server.triton import Readiness, TritonClient

logger = logging.getLogger(__name__)

_HOST = "127.0.0.1"
_PR_SET_PDEATHSIG = 1
# `E1122 01:02:03.456 123 model_lifecycle.cc:654] "failed to load 'x' version 1: Internal: ..."`
_LOAD_ERROR = re.compile(r"failed to load '(?P<model>[^']+)' version \d+: (?P<reason>.*?)\"?$")


class TritonLaunchError(RuntimeError):
    """Triton did not become ready; the message names the failing models and their errors."""

    def __init__(self, message: str, log_tail: str = ""):
        super().__init__(message)
        self.log_tail = log_tail


@dataclass(frozen=True)
class TritonInstall:
    """Where the bundled server and its pieces live, for this interpreter."""

    binary: Path
    python_backend: Path
    stub: Path
    caches: Path
    libs: Path
    python_bin: Path
    python_libdir: Path | None

    @classmethod
    def discover(cls) -> TritonInstall:
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise TritonLaunchError("nvidia-pytriton is not installed in this environment")
        package = Path(next(iter(spec.submodule_search_locations)))
        server = package / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        libdir = sysconfig.get_config_var("LIBDIR")
        install = cls(
            binary=server / "bin" / "tritonserver",
            python_backend=server / "backends" / "python",
            stub=server / "python_backend_stubs" / version / "triton_python_backend_stub",
            caches=server / "caches",
            libs=package.parent / "nvidia_pytriton.libs",
            python_bin=Path(sys.executable).parent,
            python_libdir=Path(libdir) if libdir else None,
        )
        for path in (install.binary, install.python_backend, install.stub):
            if not path.exists():
                raise TritonLaunchError(
                    f"the bundled Triton is incomplete: {path} is missing "
                    f"(Python {version} needs a matching python backend stub)"
                )
        return install


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it if the thread that launched it dies (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def parse_load_errors(log: str) -> dict[str, str]:
    """Model name -> load error, from Triton's log output."""
    errors: dict[str, str] = {}
    for line in log.splitlines():
        match = _LOAD_ERROR.search(line.strip())
        if match:
            reason = match["reason"].replace('\\"', '"').replace("\\n", "\n").strip()
            errors.setdefault(match["model"], reason)
    return errors


class TritonProcess:
    """One tritonserver child process. `start()` then `wait_ready()`; `stop()` always.

    `start()` again after the process exited (or after `terminate()`) runs a new server on the
    same ports, so clients' URLs stay valid across restarts.
    """

    def __init__(self, settings: TritonSettings, *, log_path: Path | None = None):
        self.settings = settings
        self.model_repository = Path(settings.model_repository).resolve()
        self.grpc_port = settings.grpc_port or free_port()
        self.http_port = settings.http_port or free_port()
        self.metrics_port = settings.metrics_port or free_port()
        self._workdir: Path | None = None
        self._log_path = log_path
        self._log_file = None
        self._log_start = 0  # where this run's output begins in a log shared by several runs
        self._process: subprocess.Popen | None = None
        self._exit_code: int | None = None
        # stop() may run in a worker thread while a failing check() stops the server in another.
        self._lock = threading.RLock()

    @property
    def grpc_url(self) -> str:
        return f"{_HOST}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{_HOST}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_HOST}:{self.metrics_port}/metrics"

    @property
    def log_path(self) -> Path | None:
        """The given log file, else one in the work dir (removed by `stop()`)."""
        if self._log_path is None and self._workdir is not None:
            return self._workdir / "tritonserver.log"
        return self._log_path

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process else None

    @property
    def exit_code(self) -> int | None:
        """How the last run ended; None while it runs (or before the first start)."""
        process = self._process
        return process.poll() if process is not None else self._exit_code

    def log_text(self) -> str:
        """The current (or last) run's log output."""
        path = self.log_path
        if path is None or not path.exists():
            return ""
        with open(path, "rb") as log:
            log.seek(self._log_start)
            return log.read().decode(errors="replace")

    def command(self, backends: Path, install: TritonInstall) -> list[str]:
        return [
            str(install.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            f"--cache-directory={install.caches}",
            f"--http-address={_HOST}",
            f"--grpc-address={_HOST}",
            f"--metrics-address={_HOST}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--pinned-memory-pool-byte-size=0",
            # Per-model latency quantiles beside the cumulative counters (`vqs metrics` reads both).
            "--metrics-config=summary_latencies=true",
            # Keep serving so the repository index reports each model's load error, then stop.
            "--exit-on-error=false",
            "--strict-readiness=true",
            "--log-verbose=0",
        ]

    def environment(self, install: TritonInstall) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(install.python_bin), env.get("PATH", "")])
        libs = [str(install.libs)]
        if install.python_libdir:
            libs.append(str(install.python_libdir))
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
        return env

    def start(self) -> None:
        """Spawn the server (returns at once); again after it exited, on the same ports.

        Call from a long-lived thread, e.g. the main one: the child is signalled when the thread
        that spawned it ends.
        """
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                raise RuntimeError("Triton already running")
            self.terminate()  # the last run exited: collect its exit code, close its log
            self._spawn()

    def _spawn(self) -> None:
        if not self.model_repository.is_dir():
            raise TritonLaunchError(
                f"model repository {self.model_repository} does not exist; "
                f"set {MODEL_REPOSITORY_VARIABLE} to the folder holding the models"
            )
        install = TritonInstall.discover()
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="vqs-triton-"))
            python = self._workdir / "backends" / "python"
            shutil.copytree(
                install.python_backend, python, ignore=shutil.ignore_patterns("__pycache__")
            )
            shutil.copy2(install.stub, python / install.stub.name)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 (closed in terminate)
        self._log_start = self._log_file.tell()
        cmd = self.command(self._workdir / "backends", install)
        logger.info("starting Triton: grpc %s, http %s, metrics %s, repository %s, log %s",
                    self.grpc_url, self.http_url, self.metrics_url, self.model_repository,
                    self.log_path)
        self._exit_code = None
        self._process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=self.environment(install),
            cwd=self._workdir,
            start_new_session=True,  # Ctrl-C reaches us; we stop Triton in order.
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

    def check(self, state: Readiness) -> None:
        """Raise `TritonLaunchError` when this run exited or a model failed to load."""
        process = self._process
        if process is None:
            raise RuntimeError("Triton not started")
        code = process.poll()
        if code is not None:
            raise self.failure(f"tritonserver exited with code {code} before becoming ready")
        if state.failed:
            raise self.failure("model(s) failed to load", state.failed)

    def failure(self, headline: str, reasons: dict[str, str] | None = None) -> TritonLaunchError:
        """The error for a run that did not become ready, with each failing model's own error."""
        # The repository index may only say "load failed"; the log carries the model's own error.
        log = self.log_text()
        merged = dict(reasons or {})
        for model, reason in parse_load_errors(log).items():
            if len(reason) > len(merged.get(model, "")):
                merged[model] = reason
        tail = "\n".join(log.splitlines()[-60:])
        details = "".join(f"\n  {model}: {reason}" for model, reason in sorted(merged.items()))
        return TritonLaunchError(
            f"Triton failed to start ({self.model_repository}): {headline}{details}"
            + ("" if merged else f"\n--- tritonserver log (tail) ---\n{tail}"),
            log_tail=tail,
        )

    async def wait_ready_async(self, client: TritonClient, timeout_s: float | None = None) -> None:
        """Until `client` finds this run ready; on failure (exit, a model that failed to load,
        the timeout) stops the server and raises `TritonLaunchError`."""
        limit = timeout_s or self.settings.startup_timeout_s
        try:
            await client.wait_ready(limit, check=self.check)
        except TritonLaunchError as exc:
            error = exc
        except BackendUnavailable:
            error = self.failure(f"not ready after {limit} s")
        else:
            logger.info("Triton ready (pid %s)", self.pid)
            return
        await asyncio.to_thread(self.stop)  # in a thread: a hung server may take its grace period
        raise error

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """`wait_ready_async` for callers without an event loop (scripts, test fixtures)."""

        async def wait() -> None:
            client = TritonClient(self.grpc_url)
            try:
                await self.wait_ready_async(client, timeout_s)
            finally:
                await client.close()

        loop = asyncio.new_event_loop()  # not asyncio.run: leaves the thread's current loop alone
        try:
            loop.run_until_complete(wait())
        finally:
            loop.close()

    def terminate(self, grace_s: float = 15.0) -> int | None:
        """End the current run (SIGTERM, then SIGKILL after `grace_s`); returns its exit code.

        Keeps the work dir for the next `start()`. Safe to call more than once.
        """
        with self._lock:
            process, self._process = self._process, None
            if process is not None:
                if process.poll() is None:
                    logger.info("stopping Triton (pid %s)", process.pid)
                    process.send_signal(signal.SIGTERM)
                    # A stopped (SIGSTOP) server can act on the SIGTERM only once continued.
                    process.send_signal(signal.SIGCONT)
                    try:
                        process.wait(timeout=grace_s)
                    except subprocess.TimeoutExpired:
                        logger.warning("Triton did not stop in %.0f s; killing it", grace_s)
                        process.kill()
                        process.wait()
                self._exit_code = process.returncode
                # The model stubs are in the server's process group (start_new_session). They
                # outlive a server that was killed or stopped while loading models (they stayed
                # for good, polling), so end whatever is left of the group.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
            return self._exit_code

    def stop(self, grace_s: float = 15.0) -> None:
        """`terminate()` and remove the work dir. Safe to call more than once."""
        with self._lock:
            self.terminate(grace_s)
            if self._workdir is not None:
                # A default log (inside the work dir) goes with it; pass `log_path` to keep the log.
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None

    def __enter__(self) -> TritonProcess:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
