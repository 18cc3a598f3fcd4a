"""The package as a user installs it: a wheel, installed non-editable into a fresh venv, serving
from a directory outside the checkout.

The venv gets the wheel alone (`pip install --no-deps`); its dependencies come from this test's
environment through a `.pth` line, which adds that site-packages to `sys.path` without running its
`.pth` files, so the checkout's editable hook stays out. The test checks that every dependency the
wheel declares is satisfied there and that `server` is imported from the venv. Resolving the
dependencies from the index is left to the image test (`test_image.py`, slow), which installs
them for real.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from server.launcher import free_port
from server.settings import REPO_ROOT, Settings

pytestmark = pytest.mark.integration

SOURCES = ("pyproject.toml", "README.md", "server", "clients", "export")


def _run(command: list, **kwargs) -> str:
    result = subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=300, **kwargs
    )
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A venv holding only the built wheel, with this environment's packages as its dependencies."""
    work = tmp_path_factory.mktemp("installed")
    # Build from a copy: building in the checkout would leave build/ and *.egg-info in it.
    source = work / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(
                REPO_ROOT / name, source / name,
                ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
            )
        else:
            shutil.copy2(REPO_ROOT / name, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "--wheel-dir", work / "dist", source])
    (wheel,) = (work / "dist").glob("vqs-*.whl")

    venv = work / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
          "-q", wheel])
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    (site / "_vqs_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def _installed_requirements(venv: Path) -> list[Requirement]:
    python = venv / "bin" / "python"
    text = _run([python, "-c", "import importlib.metadata as m; print(m.metadata('vqs').as_string())"])
    return [
        Requirement(line.split(":", 1)[1].strip())
        for line in text.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]


def test_the_wheel_is_imported_from_the_venv_with_its_declared_dependencies(
    venv, tmp_path, clean_environment
):
    python = venv / "bin" / "python"
    files = _run(
        [python, "-c", "import server, clients; print(server.__file__); print(clients.__file__)"],
        cwd=tmp_path, env=clean_environment(),
    ).split()
    site = venv.resolve()
    assert all(Path(f).resolve().is_relative_to(site) for f in files), files

    requirements = _installed_requirements(venv)
    assert requirements, "the wheel declares no dependencies"
    for requirement in requirements:
        version = importlib.metadata.version(requirement.name)
        assert requirement.specifier.contains(version, prereleases=True), (requirement, version)


def test_installed_default_repository_is_the_current_directorys(venv, tmp_path, clean_environment):
    python = venv / "bin" / "python"
    code = "from server.settings import Settings; print(Settings().triton.model_repository)"
    printed = _run([python, "-c", code], cwd=tmp_path, env=clean_environment())
    assert Path(printed.strip()) == tmp_path / "model_repository"


def test_checkout_default_repository_is_the_checkouts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VQS_TRITON__MODEL_REPOSITORY", raising=False)
    assert Settings().triton.model_repository == REPO_ROOT / "model_repository"


def test_installed_without_a_repository_names_the_setting(venv, tmp_path, clean_environment):
    env = clean_environment(venv / "bin", VQS_GRPC_PORT="0", VQS_METRICS_PORT="0")
    result = subprocess.run([venv / "bin" / "vqs", "serve"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "VQS_TRITON__MODEL_REPOSITORY" in result.stderr
    assert str(tmp_path / "model_repository") in result.stderr
    assert "Traceback" not in result.stderr


def test_installed_package_serves_from_outside_the_checkout(
    venv, tmp_path, trained_models, videos, served_gateway, clean_environment
):
    port = free_port()
    env = clean_environment(
        venv / "bin",
        VQS_TRITON__MODEL_REPOSITORY=str(trained_models),
        VQS_HOST="127.0.0.1", VQS_GRPC_PORT=str(port), VQS_METRICS_PORT="0",
        VQS_DECODE__WORKERS="1", VQS_LIMITS__MAX_CONCURRENT_STREAMS="0",
    )
    gateway = served_gateway([venv / "bin" / "vqs", "serve"], env=env, port=port, cwd=tmp_path)
    gateway.wait_serving()

    response = gateway.analyze(videos["normal"])

    assert response.answers and all(a.attribute in a.distribution for a in response.answers)
    assert response.video.clips >= 2
    assert gateway.stop() == 0
