"""Real Flower processes on 127.0.0.1 for the integration tests: a SuperLink, SuperNodes, client workers.

Every process is started by this module, remembered by its id, and stopped by it together with the
children it left behind (a SuperNode leaves a `flower-superexec`, which leaves ClientApp processes).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from helpers import free_port

BIN = Path(sys.executable).parent  # flwr starts flower-superexec and friends by name from PATH


def flower_environment(home: Path) -> dict[str, str]:
    """Offline, quiet Flower with its state in `home`, and no per-run dependency install (it would fetch torch)."""
    return os.environ | {
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise TimeoutError(f"{what} not ready after {timeout:g} s")


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


@dataclass
class Processes:
    """The processes a test started, with their logs; `stop` ends them and everything they spawned."""

    root: Path
    started: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def start(self, name: str, command: list[str], home: Path) -> subprocess.Popen:
        home.mkdir(parents=True, exist_ok=True)
        log = self.root / f"{name}.log"
        with open(log, "wb") as output:
            process = subprocess.Popen(
                command, cwd=home, env=flower_environment(home), stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.started.append(process)
        self.logs.append(log)
        return process

    def descendants(self) -> list[psutil.Process]:
        found = []
        for process in self.started:
            try:
                found += psutil.Process(process.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        return found

    def stop(self) -> list[int]:
        """SIGTERM every started process, then SIGKILL whatever of them or their children is left; returns the
        ids still alive afterwards (none, unless something could not be stopped)."""
        children = self.descendants()
        for process in reversed(self.started):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.started:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        _, alive = psutil.wait_procs(children, timeout=20)
        for child in alive:
            child.kill()
        _, alive = psutil.wait_procs(alive, timeout=10)
        return [child.pid for child in alive if child.status() != psutil.STATUS_ZOMBIE]

    def tail(self, lines: int = 40) -> str:
        parts = []
        for log in self.logs:
            text = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else []
            parts.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(parts)


def start_superlink(processes: Processes, port: int) -> None:
    processes.start(
        "superlink",
        [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port)],
        processes.root / "superlink",
    )
    wait_until(lambda: answers(f"http://127.0.0.1:{port}/health"), 60, "SuperLink")


def start_worker(processes: Processes, index: int) -> int:
    port = free_port()
    processes.start(f"worker{index}", [str(BIN / "spearfl"), "client-worker", "--port", str(port)], processes.root / f"worker{index}")
    wait_until(lambda: answers(f"http://127.0.0.1:{port}/health"), 60, f"client worker {index}")
    return port


def start_supernode(processes: Processes, superlink_port: int, node_config: str, index: int) -> None:
    processes.start(
        f"supernode{index}",
        [
            str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{superlink_port}",
            "--host", "127.0.0.1", "--port", str(free_port()), "--node-config", node_config,
        ],
        processes.root / f"supernode{index}",
    )


def write_connection(home: Path, name: str, superlink_port: int) -> None:
    """A `flwr run` connection to the test's SuperLink (Flower reads connections from $FLWR_HOME/config.toml)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "127.0.0.1:{superlink_port}"\ninsecure = true\n'
    )


def flwr(home: Path, *arguments: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "flwr"), *arguments], env=flower_environment(home), capture_output=True, text=True, timeout=timeout
    )


APP = Path(__file__).resolve().parents[2]  # the Flower app: the project folder with pyproject.toml


def run_id_of(output: str) -> int:
    match = re.search(r"run (\d+)", output)
    assert match, f"no run id in flwr's output:\n{output}"
    return int(match.group(1))


def run_status(home: Path, run_id: int) -> str:
    listing = flwr(home, "ls", "--run-id", str(run_id), "--format", "json")
    assert listing.returncode == 0, listing.stdout + listing.stderr
    return json.loads(listing.stdout)["runs"][0]["status"]


def run_app(processes: Processes, home: Path, name: str, superlink_port: int, config_path: Path) -> None:
    """`flwr run` of spearfl's app with this config on the test's SuperLink, to completion."""
    write_connection(home, name, superlink_port)
    started = flwr(home, "run", str(APP), name, "--stream", "--run-config", f"config='{config_path}'")
    assert started.returncode == 0, started.stdout + started.stderr
    assert run_status(home, run_id_of(started.stdout)) == "finished:completed", started.stdout + processes.tail()
