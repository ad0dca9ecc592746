"""The device's two credentials: the people's token reaches the page's routes, the server's token only /worker/* and
the pending count /health adds for it. Either one on the other's routes gets 403, none 401; beyond loopback both
are needed and must differ; with a people's token set, everyone's interactions are not listed at once."""

import pytest
from helpers import single_thread
from serving import RecordedRounds, local_client, make_service

from spearfl.data.store import Attempt
from spearfl.errors import UserError
from spearfl.runtime.worker import pack
from spearfl.serve.device import access_tokens

PEOPLE, SERVER = "people-s3cret", "server-s3cret"
OCTETS = {"Content-Type": "application/octet-stream"}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def guarded(tokenizer, tmp_path):
    """A service with both tokens and one interaction each of ana and ben."""
    with single_thread():
        service = make_service(tokenizer, tmp_path, token=PEOPLE, server_token=SERVER)
        service.rounds = RecordedRounds(service.engine)
        for person in ("ana", "ben"):
            service.store.add(f"{person}'s question?", Attempt([1, 2], "Answer: A", [3], 0), ["A", "B"], person)
        with local_client(service) as client:
            yield service, client
        service.engine.close()
        service.store.close()


def test_the_servers_token_never_reaches_interactions_and_the_peoples_never_reaches_work_orders(guarded):
    service, client = guarded
    interaction = service.store.recent(limit=1)[0].id
    peoples_routes = [("GET", "/interactions", None), ("GET", "/interactions?person=ana", None),
                      ("GET", f"/interactions/{interaction}", None), ("DELETE", f"/interactions/{interaction}", None),
                      ("GET", "/learning", None), ("POST", "/ask", {"question": "q?"}),
                      ("POST", f"/interactions/{interaction}/verdict", {"attempt": 0, "correct": True}),
                      ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "q?"}]})]
    for method, path, body in peoples_routes:
        response = client.request(method, path, json=body, headers=bearer(SERVER))
        assert response.status_code == 403 and "server's token does not reach" in response.text, (path, response.text)
    notice = pack({}, {"round": 1, "accepted": True, "version": 1})
    for path in ("/worker/train", "/worker/result"):
        response = client.post(path, content=notice, headers=bearer(PEOPLE) | OCTETS)
        assert response.status_code == 403 and "people's token does not reach" in response.text, (path, response.text)
    assert service.rounds.orders == [] and service.rounds.settled == []
    assert len(service.store.recent()) == 2 and service.store.get(interaction).first.verdict is None


def test_each_token_reaches_its_own_routes_and_without_one_they_are_closed(guarded):
    service, client = guarded
    assert client.get("/interactions", params={"person": "ana"}).status_code == 401
    assert client.post("/worker/result", content=pack({}, {"round": 1, "accepted": None}), headers=OCTETS).status_code == 401
    listed = client.get("/interactions", params={"person": "ana"}, headers=bearer(PEOPLE))
    assert listed.status_code == 200 and [item["person"] for item in listed.json()] == ["ana"]
    notice = client.post("/worker/result", content=pack({}, {"round": 1, "accepted": None}), headers=bearer(SERVER) | OCTETS)
    assert notice.status_code == 200 and service.rounds.settled == [(1, None, None)]
    assert "pending" not in client.get("/health").json() and "pending" not in client.get("/health", headers=bearer(PEOPLE)).json()
    assert client.get("/health", headers=bearer(SERVER)).json()["pending"] == 0
    assert client.get("/health").json()["token_required"] is True and client.get("/").status_code == 200


def test_with_a_peoples_token_everyones_interactions_are_listed_only_on_the_device(guarded):
    service, client = guarded
    everyone = client.get("/interactions", headers=bearer(PEOPLE))
    assert everyone.status_code == 403 and "name the person" in everyone.text
    service.token, service.server_token = None, None  # the loopback default: whoever reaches it is on the device
    assert sorted(item["person"] for item in client.get("/interactions").json()) == ["ana", "ben"]


def test_listening_beyond_loopback_needs_both_tokens_and_they_differ(monkeypatch):
    for variable in ("SPEARFL_PEOPLE_TOKEN", "SPEARFL_SERVER_TOKEN"):
        monkeypatch.delenv(variable, raising=False)
    assert access_tokens("127.0.0.1", None, None) == (None, None) and access_tokens("::1", None, None) == (None, None)
    with pytest.raises(UserError, match="--server-token or set SPEARFL_SERVER_TOKEN"):
        access_tokens("0.0.0.0", "p", None)
    with pytest.raises(UserError, match="--token or set SPEARFL_PEOPLE_TOKEN"):
        access_tokens("0.0.0.0", None, "s")
    with pytest.raises(UserError, match="must differ"):
        access_tokens("0.0.0.0", "same", "same")
    assert access_tokens("0.0.0.0", "p", "s") == ("p", "s")
    monkeypatch.setenv("SPEARFL_PEOPLE_TOKEN", "from-env")
    monkeypatch.setenv("SPEARFL_SERVER_TOKEN", "server-from-env")
    assert access_tokens("192.168.1.5", None, None) == ("from-env", "server-from-env")
