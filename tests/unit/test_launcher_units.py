from __future__ import annotations

import sys

import pytest

from server.launcher import TritonInstall, TritonProcess, parse_load_errors
from server.supervisor import restart_delay
from server.settings import TritonSettings


def test_parse_load_errors_reads_the_models_message():
    log = (
        'I1122 01:39:22.1 1 model_lifecycle.cc:472] "loading: tqn_decoder:1"\n'
        'E1122 01:39:22.4 1 model_lifecycle.cc:654] "failed to load \'tqn_decoder\' version 1: '
        'Internal: ValueError: bad \\"thing\\""\n'
        'E1122 01:39:22.5 1 tritonserver.cc:2607] "Internal: failed to load all models"\n'
    )
    assert parse_load_errors(log) == {"tqn_decoder": 'Internal: ValueError: bad "thing"'}


def test_install_is_derived_from_this_interpreter():
    install = TritonInstall.discover()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert install.binary.is_file()
    assert install.stub.parent.name == version
    assert (install.python_bin / "python").exists() or install.python_bin.exists()
    assert install.libs.is_dir()


def test_command_uses_explicit_local_ports(tmp_path):
    process = TritonProcess(TritonSettings(model_repository=tmp_path, grpc_port=9001))
    install = TritonInstall.discover()
    cmd = process.command(tmp_path / "backends", install)
    assert "--grpc-port=9001" in cmd
    assert all(p > 0 for p in (process.http_port, process.metrics_port))
    assert "--pinned-memory-pool-byte-size=0" in cmd
    assert all(f"--{k}-address=127.0.0.1" in cmd for k in ("http", "grpc", "metrics"))
    env = process.environment(install)
    assert env["PATH"].startswith(str(install.python_bin))
    assert env["LD_LIBRARY_PATH"].startswith(str(install.libs))


def test_restart_delay_doubles_from_one_second_up_to_thirty():
    assert [restart_delay(n, 1.0, 30.0) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert restart_delay(10_000, 1.0, 30.0) == 30  # a Triton crash-looping for days: no overflow
    assert restart_delay(3, first_s=0.5, max_s=60) == 4
    with pytest.raises(ValueError):
        restart_delay(-1, 1.0, 30.0)


def test_readiness_is_checked_once_over_grpc_and_failed_models_are_named(tmp_path):
    """The launcher has no readiness check of its own (it had an HTTP one beside the client's gRPC
    one); it judges the client's `Readiness`: a model that failed to load stops the wait."""
    import subprocess

    from server.launcher import TritonLaunchError
    from server.triton import Readiness

    assert not hasattr(TritonProcess, "repository_index")
    process = TritonProcess(TritonSettings(model_repository=tmp_path))
    process._process = subprocess.Popen(["sleep", "30"])
    try:
        process.check(Readiness(ready=False, failed={}))  # still loading: no error
        with pytest.raises(TritonLaunchError, match="tqn_decoder: bad config"):
            process.check(Readiness(ready=False, failed={"tqn_decoder": "bad config"}))
    finally:
        process._process.kill()
        process._process.wait()
    with pytest.raises(TritonLaunchError, match="exited with code"):
        process.check(Readiness(ready=False, failed={}))
