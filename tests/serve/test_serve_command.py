"""`spearfl serve` as a real process on 127.0.0.1: it answers /health and the page, stores what it answers, and stops
when its process is terminated by id; beyond loopback it refuses to start without a token."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from helpers import end_to_end_assets, free_port, write_run_config
from typer.testing import CliRunner

from spearfl.cli import app


def test_serving_beyond_loopback_without_a_token_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("SPEARFL_TOKEN", raising=False)
    config = write_run_config(end_to_end_assets(), tmp_path / "run.yaml", tmp_path / "run")
    result = CliRunner().invoke(app, ["serve", str(config), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "needs an access token" in " ".join(result.output.split())


def test_the_serve_command_answers_on_loopback_and_stops_by_its_id(tmp_path):
    config = write_run_config(end_to_end_assets(), tmp_path / "run.yaml", tmp_path / "run")
    port = free_port()
    environment = os.environ | {"SPEARFL_TOKEN": ""}
    process = subprocess.Popen(
        [sys.executable, "-m", "spearfl", "serve", str(config), "--port", str(port), "--set", "threads=1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment,
    )
    try:
        deadline, health = time.monotonic() + 120, None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    health = json.load(response)
                break
            except OSError:
                time.sleep(0.5)
        assert health is not None, process.stdout.read() if process.poll() is not None else "no answer within 120 s"
        assert health["status"] == "ok" and health["adapter_version"] == 0 and health["token_required"] is False
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as page:
            assert b"Ask, judge, teach" in page.read()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/ask", data=json.dumps({"question": "Which is red?", "options": ["sky", "blood"]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            events = response.read().decode()
        assert "event: done" in events and (tmp_path / "run" / "interactions.sqlite").is_file()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
            stopped_by_term = True
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            stopped_by_term = False
    assert stopped_by_term, "spearfl serve did not stop on SIGTERM within 30 s"
