"""The container image: `make image` builds the Dockerfile with buildah on a base made locally with
debootstrap (no daemon, no registry), then `vqs serve` runs inside it and answers over loopback.

Slow (minutes: the build installs every dependency from the package index). The container runs
with chroot isolation and the host's network, so the gateway is told to bind 127.0.0.1 (the
image's default, 0.0.0.0, is for a container with its own network namespace).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from server.launcher import free_port
from server.settings import REPO_ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="buildah with vfs storage and chroot isolation runs as root"),
    pytest.mark.skipif(shutil.which("make") is None, reason="needs make"),
]

IMAGE = "localhost/vqs:test"
BUILDAH = ["buildah", "--storage-driver", "vfs"]
BUILD_TIMEOUT_S = 3600


def _buildah(*args: str, timeout: float = 300) -> str:
    result = subprocess.run([*BUILDAH, *args], capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"buildah {' '.join(args)} failed:\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    """`make image` (installs buildah and debootstrap if missing, makes the base once)."""
    log = tmp_path_factory.mktemp("image") / "make-image.log"
    start = time.monotonic()
    with open(log, "wb") as out:
        result = subprocess.run(
            ["make", "-C", str(REPO_ROOT), "image", f"IMAGE={IMAGE}"],
            stdout=out, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S,
        )
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
    assert result.returncode == 0, f"make image failed:\n{tail}"
    print(f"\nmake image: {time.monotonic() - start:.0f} s")
    return IMAGE


@pytest.fixture
def container(image: str):
    name = f"vqs-test-{uuid.uuid4().hex[:8]}"
    _buildah("from", "--pull=never", "--name", name, image)
    yield name
    _buildah("rm", name)


def _run_in(container: str, *command: str, options: tuple[str, ...] = ()) -> None:
    _buildah("run", "--isolation", "chroot", "--network", "host", *options, container, "--", *command)


def test_image_holds_the_installed_package_and_its_models(container, tmp_path):
    # The results come back in a mounted file rather than through the output of `buildah run`.
    _run_in(container, "python", "-c", (
        "import json, os, sys, server; repository = os.environ['VQS_TRITON__MODEL_REPOSITORY']; "
        "json.dump({'server': server.__file__, 'python': sys.version_info[:2], 'cwd': os.getcwd(), "
        "'models': os.listdir(repository)}, open('/tmp/out/found.json', 'w'))"
    ), options=("--volume", f"{tmp_path}:/tmp/out"))
    found = json.loads((tmp_path / "found.json").read_text())

    assert found["server"].startswith("/opt/venv/lib/python3.11/site-packages/server/")
    assert found["python"] == [3, 11]  # the Triton python-backend stub is built per major.minor
    assert not Path(found["cwd"], "server").exists()
    assert {"clip_encoder_s3d", "tqn_decoder"} <= set(found["models"])


def test_vqs_serve_in_the_image_answers_over_loopback(container, image, videos, served_gateway):
    port = free_port()
    settings = {"VQS_HOST": "127.0.0.1", "VQS_GRPC_PORT": str(port), "VQS_METRICS_PORT": "0",
                "VQS_DECODE__WORKERS": "1",
                "VQS_LIMITS__MAX_CONCURRENT_STREAMS": "0"}
    command = [*BUILDAH, "run", "--isolation", "chroot", "--network", "host",
               *(f"--env={key}={value}" for key, value in settings.items()), container,
               "--", "vqs", "serve"]
    gateway = served_gateway(command, env=dict(os.environ), port=port, cwd=REPO_ROOT)
    gateway.wait_serving()

    response = gateway.analyze(videos["normal"])

    assert response.answers and all(a.attribute in a.distribution for a in response.answers)
    assert response.video.clips >= 2
    # The image's own HEALTHCHECK command agrees.
    config = json.loads(_buildah("inspect", "--type", "image", image))["Docker"]["config"]
    kind, check = config["Healthcheck"]["Test"]
    assert kind == "CMD-SHELL"
    _run_in(container, "sh", "-c", check, options=(f"--env=VQS_GRPC_PORT={port}",))
    assert gateway.stop() == 0  # SIGTERM, as `docker stop` sends it: a clean exit
