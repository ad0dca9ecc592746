"""The service's page in headless Chromium (Playwright's Python package driving Debian's chromium): a person asks, marks
the answer wrong with a hint, watches the revision stream, marks it right; a round then consumes exactly that
interaction and the page shows the new adapter version, the personal adapter the round trained (TAP, its stage 2
run by the notice that ended the run), and a reset to the global adapter."""

import shutil

import pytest
from helpers import end_to_end_assets, single_thread, write_run_config

from spearfl.config import load_config
from spearfl.runtime.local import run_local
from spearfl.serve.device import ServiceThread, build_service

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = pytest.mark.browser


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    assert shutil.which("chromium"), "Debian's chromium is missing: `make setup` installs it (apt-get install chromium)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield browser
        browser.close()


def test_ask_judge_hint_revise_then_a_round_and_the_new_version(browser, tmp_path):
    assets = end_to_end_assets()
    config_path = write_run_config(assets, tmp_path / "run.yaml", tmp_path / "run")
    with single_thread():
        # the device's own config: its local DP and how many judged interactions a round needs are its own settings
        own = [f"live.store={tmp_path / 'device.sqlite'}", "live.min_interactions=1", "privacy.mode=local", "privacy.noise_multiplier=1",
               # TAP keeps a share of the interactions, chosen by their random id, for validation: here almost none, so
               # that the one interaction of this test is trained on
               "personal.method=tap", "personal.after_steps=2", "personal.validation_fraction=1e-9"]
        device = ServiceThread(build_service(load_config(config_path, own), max_batch=4))
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone-sized screen
            page.goto(f"http://{device.address}/")
            page.wait_for_selector("#version:text('0')")
            page.wait_for_selector("#personal:has-text('no personal adapter yet')")
            assert page.locator("#reset-personal").is_hidden()
            page.fill("#question", "Which of these is a colour?")
            page.fill("#options", "red\ndog\npen")
            page.click("#ask")
            first = page.locator("section.attempt").nth(0)
            first.locator(".meta", has_text="adapter version 0").wait_for(timeout=60_000)
            assert first.locator(".answer").inner_text().strip()
            first.locator(".hint").fill("Think of what you see in a rainbow.")
            first.locator(".verdict-wrong").click()
            revision = page.locator("section.attempt").nth(1)
            revision.locator(".meta", has_text="adapter version 0").wait_for(timeout=60_000)
            revision.locator(".verdict-right").click()
            revision.locator(".meta", has_text="judged right").wait_for(timeout=30_000)

            stored = device.service.store.recent()
            assert len(stored) == 1 and [a.verdict for a in stored[0].attempts] == [False, True]
            assert stored[0].first.hint == "Think of what you see in a rainbow." and not stored[0].first.hint_withheld
            page.wait_for_function("document.querySelectorAll('#mine tbody tr').length === 1")  # the list refreshes

            config = load_config(config_path, [
                "data.num_clients=1", "server.clients_per_round=1", "server.rounds=1", f'live.devices=["{device.address}"]',
                "live.min_interactions=1", "eval.methods=[loglik]",
            ])
            run_local(config, show_progress=False)
            assert device.service.store.get(stored[0].id).consumed_round == 1
            page.reload()
            page.wait_for_selector("#version:text('1')")
            page.wait_for_function("document.querySelectorAll('#learning tbody tr').length === 1")  # judged: version 0
            # the round released one noised update, and the page shows the device's own ledger of it
            page.wait_for_selector("#privacy:has-text('1 updates released')")
            # the round trained the device's personal adapter, and the run's end its stage 2; it answers now
            page.wait_for_selector("#personal:has-text('personal adapter (tap), last trained in round 1')")
            page.wait_for_selector("#personal:has-text('after federation')")
            page.wait_for_selector("#personal:has-text('Global adapter: version 1')")
            assert device.service.rounds.personal.state is not None
            page.click("#reset-personal")
            page.wait_for_selector("#personal:has-text('Answers come from the global adapter')")
            assert device.service.rounds.personal.state is None
            assert not (tmp_path / "device.personal.safetensors").exists()
        finally:
            device.stop()
