import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Every test session gets its own CLIPSE_CACHE: no test reads another run's caches."""
    os.environ["CLIPSE_CACHE"] = str(tmp_path_factory.mktemp("clipse-cache"))
    yield


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("CLIPSE_CACHE", str(folder))
    return folder


def tiny_config(tmp_path: Path, **changes):
    """A training config that runs in a second or two: tiny synthetic data, two epochs."""
    from clipse.config import TrainConfig

    settings = dict(pretrained="none", shapes_train_images=48, shapes_val_images=12, shapes_test_images=12, epochs=2,
                    batch_size=16, progress=False, data_root=str(tmp_path.parent / f"shapes-{tmp_path.name}"),
                    run_dir=str(tmp_path / "run"), registry=str(tmp_path / "registry.csv"), threads=1)
    settings.update(changes)
    return TrainConfig.from_mapping(settings, "test settings")


@pytest.fixture
def tiny(tmp_path):
    return lambda **changes: tiny_config(tmp_path, **changes)


PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture
def diverging_loss(monkeypatch):
    """Registers the loss ``diverges``: InfoNCE whose value turns NaN at step ``diverge_at``."""
    import dataclasses

    from clipse.losses import LOSSES, loss_param
    from clipse.losses.infonce import InfoNCE

    steps = [0]

    @dataclasses.dataclass(frozen=True)
    class DivergesAt(InfoNCE):
        diverge_at: int = loss_param(5, "the step (counted in this process) at which the loss turns NaN")
        name = "diverges"

        def __call__(self, image_emb, text_emb, scale):
            steps[0] += 1
            loss, stats = super().__call__(image_emb, text_emb, scale)
            return (loss * float("nan"), stats) if steps[0] == self.diverge_at else (loss, stats)

    monkeypatch.setitem(LOSSES, DivergesAt.name, DivergesAt)
    return DivergesAt


MISSING_SERVICES: dict[str, str] = {}


def services_required() -> bool:
    """CLIPSE_REQUIRE_SERVICES=1 (as .ci/run sets it): a missing service fails its tests."""
    return os.environ.get("CLIPSE_REQUIRE_SERVICES", "0").strip() not in ("", "0")


def skip_or_fail(service: str, reason: str):
    """Without a service its tests skip, and the run's summary says so, unless services are required."""
    if services_required():
        pytest.fail(f"{service}: {reason}")
    MISSING_SERVICES[service] = reason
    pytest.skip(f"{service}: {reason}")


def pytest_terminal_summary(terminalreporter):
    if MISSING_SERVICES:
        terminalreporter.write_line(
            "services missing, so their tests were skipped: "
            + "; ".join(f"{name} ({reason})" for name, reason in MISSING_SERVICES.items()), yellow=True, bold=True)


def _slurm_answers(env) -> bool:
    import subprocess

    try:
        return subprocess.run(["sinfo", "-h"], env=env, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A SLURM cluster for the slurm-marked tests: the one SLURM_CONF points at, if it answers;
    otherwise the one-node cluster of scripts/slurm_cluster.sh, brought up here and stopped at
    the end (only the processes it started). Skips when SLURM is not installed."""
    import shutil
    import subprocess

    if os.environ.get("SLURM_CONF") and _slurm_answers(os.environ):
        yield os.environ["SLURM_CONF"]
        return
    if not all(shutil.which(b) for b in ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd")) or os.geteuid() != 0:
        skip_or_fail("SLURM", "not installed, or not root (scripts/slurm_cluster.sh install, as root)")
    script = PROJECT / "scripts" / "slurm_cluster.sh"
    import tempfile

    # not under pytest's private tmp folder: munged and mariadbd run as their own users
    env = {**os.environ, "CLIPSE_SLURM_DIR": tempfile.mkdtemp(prefix="clipse-slurm-", dir="/tmp")}
    up = subprocess.run([str(script), "up"], env=env, capture_output=True, text=True, timeout=300)
    if up.returncode != 0:
        subprocess.run([str(script), "down"], env=env, capture_output=True, timeout=120)
        pytest.fail(f"SLURM did not come up: {up.stderr[-2000:]}")
    conf = subprocess.run([str(script), "conf"], env=env, capture_output=True, text=True).stdout.strip()
    os.environ["SLURM_CONF"] = conf
    try:
        yield conf
    finally:
        subprocess.run(["scancel", "-u", str(os.getuid())], capture_output=True)
        subprocess.run([str(script), "down"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(env["CLIPSE_SLURM_DIR"], ignore_errors=True)
        os.environ.pop("SLURM_CONF", None)


@pytest.fixture(scope="session")
def postgres_server():
    """A throw-away PostgreSQL server (``scripts/postgres_server.py``), stopped at the end. Yields
    (port, a function running SQL as postgres), which also has ``stop(fast=True)`` and ``start()``
    for outages."""
    import sys

    sys.path.insert(0, str(PROJECT / "scripts"))
    from postgres_server import ThrowawayPostgres

    server = ThrowawayPostgres.create()
    if server is None:
        skip_or_fail("PostgreSQL", "server binaries not installed, or not root (apt install postgresql)")

    class Server(tuple):
        """(port, sql), with the server's stop and start."""

    handle = Server((server.port, server.sql))
    handle.stop, handle.start = server.stop, server.start
    try:
        yield handle
    finally:
        server.close()


@pytest.fixture(scope="session")
def postgres_url(postgres_server):
    port, sql = postgres_server
    sql("CREATE DATABASE clipse")
    return f"postgresql://postgres@127.0.0.1:{port}/clipse"


@pytest.fixture
def postgres_secret(postgres_server, tmp_path):
    """(URL without the password, password) of a fresh role that must authenticate, owning a
    fresh database."""
    import secrets

    port, sql = postgres_server
    name = f"secret_{secrets.token_hex(4)}"
    password = f"pw-{secrets.token_hex(12)}"
    sql(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
    sql(f"CREATE DATABASE {name} OWNER {name}")
    return f"postgresql://{name}@127.0.0.1:{port}/{name}", password


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (SQLite store, proxied artifacts) on a free local port,
    for the session; yields its http URI. Stopped at the end: the process group it started."""
    import importlib.util
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    if importlib.util.find_spec("mlflow") is None:
        skip_or_fail("MLflow", "not installed (pip install 'clipse[trackers]')")
    folder = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = folder / "server.log"
    # (without its job runner, which would start a handful of task-queue processes for nothing)
    environment = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
             "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=folder, env=environment,
            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the MLflow server did not answer /health within 60 s:\n"
                            f"{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        group = server.pid  # its own process group (start_new_session): the server and its workers

        def signal_group(sig) -> bool:
            """Send ``sig`` to the group; False when no process of it is left."""
            try:
                os.killpg(group, sig)
                return True
            except ProcessLookupError:
                return False

        signal_group(signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            server.poll()  # reaps the leader once it exits
            if not signal_group(0):
                break
            time.sleep(0.2)
        else:
            signal_group(signal.SIGKILL)
        server.wait(timeout=10)
