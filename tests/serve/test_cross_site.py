"""Requests that are not the device's own: a Host the device does not answer to (DNS rebinding) gets 421, a body of
another Content-Type 415, and a request from another origin 403, preflights included, with no CORS headers ever.
In Chromium, a page of another loopback origin can neither install an adapter, plant a question nor read the
interactions; the device's own page keeps working (test_page.py)."""

import base64
import http.server
import json
import shutil
import threading

import numpy as np
import pytest
from helpers import single_thread
from serving import RecordedRounds, local_client, make_service

from spearfl.data.store import Attempt
from spearfl.runtime.worker import pack
from spearfl.serve.device import ServiceThread

OCTETS = {"Content-Type": "application/octet-stream"}
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture
def device(tokenizer, tmp_path):
    """A service without tokens (the loopback default), one stored interaction, rounds that record their notices."""
    with single_thread():
        service = make_service(tokenizer, tmp_path)
        service.rounds = RecordedRounds(service.engine)
        service.store.add("A private question?", Attempt([1, 2], "Answer: A", [3], 0), ["A", "B"], "ana")
        yield service
        service.engine.close()
        service.store.close()


def new_adapter(service, version: int) -> bytes:
    arrays = {name: tensor.numpy() + np.float32(0.01) for name, tensor in service.engine.adapter_state().items()}
    return pack(arrays, {"round": version, "accepted": None, "version": version})


def untouched(service) -> bool:
    return service.engine.adapter_version == 0 and service.rounds.settled == [] and len(service.store.recent()) == 1


def test_a_host_the_device_does_not_answer_to_gets_421(device):
    with local_client(device) as client:
        for host in ("attacker.example", "attacker.example:8000", "192.168.1.9"):
            headers = {"Host": host}
            responses = [client.get("/", headers=headers), client.get("/interactions", headers=headers),
                         client.post("/worker/result", content=new_adapter(device, 1), headers=headers | OCTETS)]
            assert [r.status_code for r in responses] == [421] * 3 and "--allow-host" in responses[1].text
        assert untouched(device)
        for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
            assert client.get("/health", headers={"Host": host}).status_code == 200
    device.allowed_hosts = device.allowed_hosts | {"device.lan"}
    with local_client(device) as client:
        assert client.get("/health", headers={"Host": "device.lan:8000"}).status_code == 200


def test_a_body_of_another_content_type_gets_415_and_stores_nothing(device):
    with local_client(device) as client:
        interaction = device.store.recent()[0].id
        question = json.dumps({"question": "Planted?", "person": "ana"})
        cases = [
            client.post("/ask", content=question, headers={"Content-Type": "text/plain"}),
            client.post("/ask", content=question, headers={"Content-Type": "application/x-www-form-urlencoded"}),
            client.post("/ask", content=question.encode()),  # no Content-Type at all
            client.post(f"/interactions/{interaction}/verdict", content='{"attempt": 0, "correct": true}', headers={"Content-Type": "text/plain"}),
            client.post("/worker/result", content=new_adapter(device, 1), headers={"Content-Type": "text/plain"}),
            client.post("/worker/result", content=new_adapter(device, 1), headers={"Content-Type": "application/json"}),
            client.post("/worker/result", content=new_adapter(device, 1)),
        ]
        for response in cases:
            assert response.status_code == 415 and "takes application/" in response.text, response.text
        assert untouched(device) and device.store.get(interaction).first.verdict is None
        assert client.post("/ask", content=question, headers={"Content-Type": "application/json; charset=utf-8"}).status_code == 200


def test_requests_from_another_origin_are_refused_preflights_included_and_no_cors_header_is_sent(device):
    with local_client(device) as client:
        other = {"Origin": "http://127.0.0.1:9999"}
        responses = [
            client.options("/worker/result", headers=other | {"Access-Control-Request-Method": "POST",
                                                              "Access-Control-Request-Headers": "content-type"}),
            client.post("/worker/result", content=new_adapter(device, 1), headers=other | OCTETS),
            client.post("/ask", json={"question": "Planted?"}, headers=other),
            client.get("/interactions", headers=other),
            client.get("/interactions", headers={"Sec-Fetch-Site": "same-site"}),
            client.get("/interactions", headers={"Origin": "null"}),
        ]
        for response in responses:
            assert response.status_code == 403 and "another origin" in response.text, response.text
        assert untouched(device)
        same = client.post("/ask", json={"question": "Mine?"}, headers={"Origin": "http://127.0.0.1", "Sec-Fetch-Site": "same-origin"})
        assert same.status_code == 200
        for response in [*responses, same, client.get("/interactions")]:
            assert not any(name.lower().startswith("access-control-") for name in response.headers)


ATTACKER_PAGE = """<!doctype html><title>another site</title><script>
const device = "DEVICE", payload = Uint8Array.from(atob("PAYLOAD"), c => c.charCodeAt(0));
async function attempt(request) {
  try {
    const response = await request();
    let text = null;
    try { text = await response.text(); } catch (error) {}
    return {status: response.status, type: response.type, text};
  } catch (error) { return {failed: String(error)}; }
}
window.results = (async () => ({
  install: await attempt(() => fetch(device + "/worker/result", {method: "POST", headers: {"Content-Type": "application/octet-stream"}, body: payload})),
  install_blind: await attempt(() => fetch(device + "/worker/result", {method: "POST", mode: "no-cors", body: new Blob([payload])})),
  plant_blind: await attempt(() => fetch(device + "/ask", {method: "POST", mode: "no-cors", body: JSON.stringify({question: "Planted?"})})),
  plant_typed: await attempt(() => fetch(device + "/ask", {method: "POST", mode: "no-cors", body: new Blob([JSON.stringify({question: "Planted?"})])})),
  read: await attempt(() => fetch(device + "/interactions")),
  read_blind: await attempt(() => fetch(device + "/interactions", {mode: "no-cors"})),
}))();
</script>"""


@pytest.mark.browser
def test_a_page_of_another_origin_in_chromium_cannot_install_plant_or_read(device):
    from playwright.sync_api import sync_playwright

    assert shutil.which("chromium"), "Debian's chromium is missing: `make setup` installs it (apt-get install chromium)"
    served = ServiceThread(device)
    page_html = ATTACKER_PAGE.replace("DEVICE", f"http://{served.address}").replace(
        "PAYLOAD", base64.b64encode(new_adapter(device, 5)).decode())

    class AttackerPage(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = page_html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    attacker = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AttackerPage)
    threading.Thread(target=attacker.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                 args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{attacker.server_address[1]}/")
                results = page.evaluate("window.results")
            finally:
                browser.close()
    finally:
        attacker.shutdown()
        attacker.server_close()
        served.server.should_exit = True
        served.thread.join(timeout=30)
    assert "failed" in results["install"] and "failed" in results["read"], results  # no CORS: neither goes through
    for blind in ("install_blind", "plant_blind", "plant_typed", "read_blind"):
        assert results[blind]["type"] == "opaque" and not results[blind]["text"], results  # sent blind, read nothing
    assert untouched(device), (device.engine.adapter_version, device.rounds.settled, [i.question for i in device.store.recent()])
