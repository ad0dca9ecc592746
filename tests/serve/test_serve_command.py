"""`spearfl serve` as a real process on 127.0.0.1, over http and over https: it answers /health and the page, stores
what it answers, and stops when its process is terminated by id; beyond loopback it refuses to start without both
tokens."""

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from helpers import end_to_end_assets, free_port, write_run_config
from serving import make_certificates
from typer.testing import CliRunner

from spearfl.cli import app

TOKEN_VARIABLES = ("SPEARFL_PEOPLE_TOKEN", "SPEARFL_SERVER_TOKEN")


def test_serving_beyond_loopback_without_both_tokens_is_refused(tmp_path, monkeypatch):
    for variable in TOKEN_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    config = write_run_config(end_to_end_assets(), tmp_path / "run.yaml", tmp_path / "run")
    for tokens, missing in (([], "--token"), (["--token", "p"], "--server-token"), (["--server-token", "s"], "--token")):
        result = CliRunner().invoke(app, ["serve", str(config), "--host", "0.0.0.0", *tokens])
        output = " ".join(result.output.split())
        assert result.exit_code == 2 and "needs an access token" in output and f"pass {missing} " in output, output


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_the_serve_command_answers_on_loopback_and_stops_by_its_id(tmp_path, scheme):
    config = write_run_config(end_to_end_assets(), tmp_path / "run.yaml", tmp_path / "run")
    port = free_port()
    environment = os.environ | dict.fromkeys(TOKEN_VARIABLES, "")
    tls, context = [], None
    if scheme == "https":
        authority, certificate, key = make_certificates(tmp_path)
        tls, context = ["--tls-cert", str(certificate), "--tls-key", str(key)], ssl.create_default_context(cafile=str(authority))
    process = subprocess.Popen(
        [sys.executable, "-m", "spearfl", "serve", str(config), "--port", str(port), "--set", "threads=1", *tls],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment,
    )
    try:
        deadline, health = time.monotonic() + 120, None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/health", timeout=5, context=context) as response:
                    health = json.load(response)
                break
            except OSError:
                time.sleep(0.5)
        assert health is not None, process.stdout.read() if process.poll() is not None else "no answer within 120 s"
        assert health["status"] == "ok" and health["adapter_version"] == 0 and health["token_required"] is False
        with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/", timeout=5, context=context) as page:
            assert b"Ask, judge, teach" in page.read()
        if scheme == "https":  # without the CA the certificate is refused
            with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
                urllib.request.urlopen(f"https://127.0.0.1:{port}/health", timeout=5)
        request = urllib.request.Request(
            f"{scheme}://127.0.0.1:{port}/ask", data=json.dumps({"question": "Which is red?", "options": ["sky", "blood"]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120, context=context) as response:
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
