"""The device service's API on a tiny random model: asking streams and stores exact ids, verdicts and hints, revisions,
deletion, the OpenAI-compatible route, adapter switches between requests, batching, and every bad request
answered with a 4xx that says why while nothing is stored."""

import json
import threading

import pytest
import torch
from helpers import single_thread
from serving import local_client, make_service

import spearfl.serve.engine
from spearfl.lm.models import get_adapter_state
from spearfl.serve.limits import Limits

OPTIONS = ["apple", "rock", "car"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


@pytest.fixture
def service(tokenizer, tmp_path):
    service = make_service(tokenizer, tmp_path)
    yield service
    service.engine.close()
    service.store.close()


@pytest.fixture
def client(service):
    with local_client(service) as client:
        yield client


def read_events(response) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[len("data: "):])))
    return events


def ask(client, question="Which is a fruit?", options=OPTIONS, person="ana") -> tuple[list, dict]:
    with client.stream("POST", "/ask", json={"question": question, "options": options, "person": person}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_events(response)
    assert events[-1][0] == "done", events
    return events, events[-1][1]


def stored_count(service) -> int:
    return len(service.store.recent(limit=10_000))


def test_an_answer_streams_and_is_stored_with_its_exact_ids(client, service):
    events, done = ask(client)
    streamed = "".join(data["text"] for name, data in events if name == "token")
    assert streamed == done["text"] and done["adapter_version"] == 0 and done["attempt"] == 0
    stored = service.store.get(done["interaction_id"])
    example = service.question("Which is a fruit?", OPTIONS)
    assert stored.first.prompt_ids == service.prompts.task(example)
    assert stored.first.text == done["text"] and len(stored.first.token_ids) == done["completion_tokens"]
    assert service.prompts.answer_text(service.prompts.tokenizer.decode(stored.first.token_ids, skip_special_tokens=True)) == done["text"]
    assert stored.options == tuple(OPTIONS) and stored.owner == "ana" and stored.first.verdict is None


def test_a_wrong_verdict_with_a_hint_leads_to_a_revision_that_sees_only_a_safe_hint(client, service):
    _, done = ask(client)
    result = client.post(f"/interactions/{done['interaction_id']}/verdict", json={"attempt": 0, "correct": False, "hint": "It grows on trees."})
    assert result.status_code == 200 and result.json()["hint_shown"] is True
    with client.stream("POST", f"/interactions/{done['interaction_id']}/revise") as response:
        revised = read_events(response)[-1][1]
    assert revised["attempt"] == 1
    stored = service.store.get(done["interaction_id"])
    revision_prompt = service.prompts.tokenizer.decode(stored.attempts[1].prompt_ids)
    assert "It grows on trees." in revision_prompt and "Which is a fruit?" in revision_prompt
    assert client.post(f"/interactions/{done['interaction_id']}/verdict", json={"attempt": 1, "correct": True}).status_code == 200
    assert [a.verdict for a in service.store.get(done["interaction_id"]).attempts] == [False, True]


def test_a_hint_that_names_an_option_is_kept_but_never_shown(client, service):
    _, done = ask(client)
    result = client.post(f"/interactions/{done['interaction_id']}/verdict", json={"attempt": 0, "correct": False, "hint": "It is the apple."})
    assert result.json()["hint_shown"] is False and "not shown to the model" in result.json()["note"]
    with client.stream("POST", f"/interactions/{done['interaction_id']}/revise") as response:
        read_events(response)
    stored = service.store.get(done["interaction_id"])
    assert stored.first.hint == "It is the apple." and stored.first.hint_withheld
    assert "It is the apple." not in service.prompts.tokenizer.decode(stored.attempts[1].prompt_ids)


def test_listing_and_deleting_ones_interactions(client, service):
    mine = ask(client, person="ana")[1]["interaction_id"]
    ask(client, person="ben")
    listed = client.get("/interactions", params={"person": "ana"}).json()
    assert [item["id"] for item in listed] == [mine] and listed[0]["attempts"][0]["verdict"] is None
    assert client.delete(f"/interactions/{mine}", params={"person": "ben"}).status_code == 404  # not ben's
    assert client.delete(f"/interactions/{mine}", params={"person": "ana"}).status_code == 204
    assert client.get(f"/interactions/{mine}").status_code == 404
    assert stored_count(service) == 1


def test_bad_requests_get_a_4xx_that_says_why_and_store_nothing(tokenizer, tmp_path):
    service = make_service(tokenizer, tmp_path, limits=Limits(max_body_bytes=2000, max_prompt_tokens=120))
    with local_client(service) as client:
        _, done = ask(client)
        interaction = done["interaction_id"]
        cases = [
            (client.post("/ask", content=b"{not json", headers={"content-type": "application/json"}), 422, "json"),
            (client.post("/ask", json={"question": "x" * 3000}), 413, "limit"),
            (client.post("/ask", json={"question": "q", "options": ["only one"]}), 422, "options"),
            (client.post("/ask", json={"question": "   "}), 422, "blank"),
            (client.post("/ask", json={"question": "q", "colour": "red"}), 422, "colour"),
            (client.post("/ask", json={"question": "word " * 300}), 422, "tokens"),
            (client.post("/interactions/nope/verdict", json={"attempt": 0, "correct": True}), 404, "no interaction nope"),
            (client.post(f"/interactions/{interaction}/verdict", json={"attempt": 4, "correct": True}), 404, "no attempt 4"),
            (client.post(f"/interactions/{interaction}/verdict", json={"attempt": 0}), 422, "correct"),
            (client.post(f"/interactions/{interaction}/revise"), 409, "judge attempt 0 first"),
        ]
        assert client.post(f"/interactions/{interaction}/verdict", json={"attempt": 0, "correct": True}).status_code == 200
        cases += [
            (client.post(f"/interactions/{interaction}/verdict", json={"attempt": 0, "correct": False}), 409, "already judged"),
            (client.post(f"/interactions/{interaction}/revise"), 409, "judged right"),
            (client.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "hi"}]}), 422, "no user message"),
        ]
        for response, status, words in cases:
            assert response.status_code == status, (words, response.text)
            assert words in response.text.lower() or words in response.text, (words, response.text)
        assert stored_count(service) == 1
        stored = service.store.get(interaction)
        assert len(stored.attempts) == 1 and stored.first.verdict is True
    service.engine.close()
    service.store.close()


def test_openai_compatible_completion_carries_the_interaction_id(client, service):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Which is a fruit?"}], "options": OPTIONS}
    reply = client.post("/v1/chat/completions", json=body).json()
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["role"] == "assistant"
    stored = service.store.get(reply["interaction_id"])
    assert stored.first.text == reply["choices"][0]["message"]["content"]
    assert reply["usage"]["completion_tokens"] == len(stored.first.token_ids)
    with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as response:
        lines = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    streamed = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    assert service.store.get(chunks[-1]["interaction_id"]).first.text == streamed


def test_learning_so_far_per_adapter_version(client, service):
    for correct in (True, False):
        done = ask(client)[1]
        client.post(f"/interactions/{done['interaction_id']}/verdict", json={"attempt": 0, "correct": correct})
    learning = client.get("/learning").json()
    assert learning["versions"] == [{"version": 0, "judged": 2, "right": 1, "first_try_accuracy": 0.5}]
    plot = client.get("/learning.png")
    assert plot.status_code == 200 and plot.content.startswith(PNG_SIGNATURE)
    assert client.get("/").status_code == 200 and "Ask, judge, teach" in client.get("/").text
    assert client.get("/docs").status_code == 200


def test_a_new_adapter_answers_from_the_next_request_and_one_in_flight_finishes_on_its_own(tokenizer, tmp_path, monkeypatch):
    service = make_service(tokenizer, tmp_path, max_new_tokens=24)
    started, release = threading.Event(), threading.Event()
    original = spearfl.serve.engine.generate_batch

    def slow_generate(*args, **kwargs):  # holds the first batch until the new adapter is queued
        started.set()
        release.wait(timeout=30)
        return original(*args, **kwargs)

    monkeypatch.setattr(spearfl.serve.engine, "generate_batch", slow_generate)
    new_state = {name: value + 0.05 for name, value in get_adapter_state(service.engine.model).items()}
    with local_client(service) as client:
        first = {}
        thread = threading.Thread(target=lambda: first.update(ask(client)[1]))
        thread.start()
        assert started.wait(timeout=30)
        installed = service.engine.install(new_state, 1)  # arrives while the first request decodes
        release.set()
        thread.join(timeout=60)
        assert installed.result(timeout=30) == 1
        assert first["adapter_version"] == 0  # finished on the adapter it started with
        second = ask(client)[1]
        assert second["adapter_version"] == 1 and client.get("/health").json()["adapter_version"] == 1
        assert service.store.get(second["interaction_id"]).first.adapter_version == 1
        assert all(torch.equal(value, new_state[name]) for name, value in service.engine.adapter_state().items())
    service.engine.close()
    service.store.close()


def test_concurrent_requests_decode_as_one_batch(tokenizer, tmp_path, monkeypatch):
    service = make_service(tokenizer, tmp_path, batch_window=0.5)
    sizes = []
    original = spearfl.serve.engine.generate_batch
    monkeypatch.setattr(spearfl.serve.engine, "generate_batch", lambda model, tokenizer, prompts, *a, **k: sizes.append(len(prompts)) or original(model, tokenizer, prompts, *a, **k))
    with local_client(service) as client:
        results = []
        threads = [threading.Thread(target=lambda i=i: results.append(ask(client, question=f"Question {i}?")[1])) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert len(results) == 4 and len({r["interaction_id"] for r in results}) == 4
    assert sizes == [4]
    service.engine.close()
    service.store.close()


def test_an_answer_prefix_streams_first_marked_as_written_by_the_prompt(tokenizer, tmp_path):
    service = make_service(tokenizer, tmp_path, None, None, 6, 0.02, "prompt.answer_prefix=true")
    with local_client(service) as client:
        events, done = ask(client)
    assert events[0] == ("token", {"text": "Answer:", "prefix": True})
    assert all("prefix" not in data for name, data in events[1:] if name == "token")
    assert "".join(data["text"] for name, data in events if name == "token") == done["text"]
    assert service.store.get(done["interaction_id"]).first.text.startswith("Answer:")
    service.engine.close()
    service.store.close()


def test_a_lone_surrogate_gets_422_and_stores_nothing(client, service):
    _, done = ask(client)
    bodies = [("/ask", '{"question": "Which \\ud800 is red?"}'), ("/ask", '{"question": "Which is red?", "person": "\\udfff"}'),
              ("/ask", '{"question": "Which is red?", "options": ["\\ud800", "blue"]}'),
              ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "Which \\ud800?"}]}'),
              ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "Which?"}], "user": "\\ud800"}'),
              (f"/interactions/{done['interaction_id']}/verdict", '{"attempt": 0, "correct": false, "hint": "\\ud800"}')]
    for path, body in bodies:
        response = client.post(path, content=body.encode(), headers={"content-type": "application/json"})
        assert response.status_code == 422 and "unicode string" in response.text, (path, response.text)
    assert stored_count(service) == 1 and service.store.get(done["interaction_id"]).first.verdict is None


def test_when_the_queue_is_full_a_request_gets_503_with_retry_after_and_stores_nothing(tokenizer, tmp_path, monkeypatch):
    service = make_service(tokenizer, tmp_path, limits=Limits(max_waiting_requests=1))
    started, release = threading.Event(), threading.Event()
    original = spearfl.serve.engine.generate_batch

    def held_generate(*args, **kwargs):  # the first request stays in the engine until released
        started.set()
        release.wait(timeout=30)
        return original(*args, **kwargs)

    monkeypatch.setattr(spearfl.serve.engine, "generate_batch", held_generate)
    with local_client(service) as client:
        first = {}
        thread = threading.Thread(target=lambda: first.update(ask(client)[1]))
        thread.start()
        assert started.wait(timeout=30)
        chat = {"messages": [{"role": "user", "content": "Which is a fruit?"}]}
        for response in (client.post("/ask", json={"question": "Which is red?"}), client.post("/v1/chat/completions", json=chat),
                         client.post("/v1/chat/completions", json=chat | {"stream": True})):
            assert response.status_code == 503 and response.headers["retry-after"].isdigit() and "waiting" in response.text
        release.set()
        thread.join(timeout=60)
        assert first["attempt"] == 0 and stored_count(service) == 1
        ask(client, question="Which is red?")  # the place is free again
        assert stored_count(service) == 2 and service.waiting == 0
    service.engine.close()
    service.store.close()


def test_a_person_past_the_answers_a_minute_gets_429_with_retry_after_and_stores_nothing(tokenizer, tmp_path):
    service = make_service(tokenizer, tmp_path, limits=Limits(answers_per_minute=2))
    now = [1000.0]
    service.clock = lambda: now[0]
    chat = {"messages": [{"role": "user", "content": "Which is a fruit?"}], "user": "ana"}
    with local_client(service) as client:
        ask(client)
        now[0] += 20.0
        _, done = ask(client)
        for response in (client.post("/ask", json={"question": "Which is red?", "person": "ana"}),
                         client.post("/v1/chat/completions", json=chat),
                         client.post("/v1/chat/completions", json=chat | {"stream": True})):
            # the first answer leaves the window 60 s after it started: 40 s from now
            assert response.status_code == 429 and response.headers["retry-after"] == "40", response.text
            assert "'ana'" in response.json()["detail"] and "answers_per_minute" in response.json()["detail"]
        client.post(f"/interactions/{done['interaction_id']}/verdict", json={"attempt": 0, "correct": False})
        assert client.post(f"/interactions/{done['interaction_id']}/revise").status_code == 429  # a revision is an answer
        assert stored_count(service) == 2
        ask(client, person="ben")  # another person is not held back
        now[0] += 40.0  # the first answer has left the window: one more for ana
        ask(client)
        assert client.post("/ask", json={"question": "Which is red?", "person": "ana"}).status_code == 429
        assert stored_count(service) == 4
    service.engine.close()
    service.store.close()
