"""The results page in a real headless Chromium (Debian's ``chromium``, driven by
Playwright with the system browser: a browser download at install time would fail without
network).  Upload a photo from ``examples/``: the first result is that photo at distance 0;
click a result; open ``/?id=...`` directly; look at the duplicates view.  Screenshots go
to ``test-artifacts/``."""

from __future__ import annotations

import shutil
from urllib.parse import quote

import pytest

from tests.helpers import REPO, SearchServer, built_once
from tests.test_duplicate_fit import encode_catalogues

EXAMPLES = REPO / "examples" / "images"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    # The sample and test photos with copies of 8 sample photos among them, encoded with the
    # trained backbone and the near-duplicate threshold fitted, as `imgenc encode` leaves a
    # destination: the catalogue the near-duplicate tests build, shared with them.
    built = built_once(tmp_path_factory, "dedup-catalogues", encode_catalogues)
    tmp = tmp_path_factory.mktemp("page")
    dest = tmp / "codes"
    shutil.copytree(built / "codes" / "with-copies", dest)  # this server's own destination
    server = SearchServer(str(dest), tmp / "serve.log", {}).start()
    yield built / "with-copies", server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium); .ci/run installs it")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield browser
        browser.close()


def result_ids(page) -> list[str]:
    return page.eval_on_selector_all("#results .result", "items => items.map(i => i.dataset.id)")


def test_uploading_a_photo_shows_it_first_at_distance_zero_and_a_click_shows_its_neighbours(
    site, browser
):
    folder, server = site
    photo = sorted(p for p in folder.iterdir() if not p.name.startswith("copy-"))[4]
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server.url + "/")
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#results .result")
    first = page.locator("#results .result").first
    assert first.get_attribute("data-id") == photo.name
    assert first.get_attribute("data-distance") == "0"
    assert page.locator("#status").inner_text().startswith("12 nearest")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    page.screenshot(path=str(ARTIFACTS / "search-by-photo.png"), full_page=True)

    second = page.locator("#results .result").nth(1)
    clicked = second.get_attribute("data-id")
    second.locator("a").click()
    page.wait_for_url(f"**/?id={quote(clicked, safe='')}")
    page.wait_for_function(
        "id => document.querySelector('#query-title').textContent === id", arg=clicked
    )
    page.wait_for_selector("#results .result")
    assert clicked not in result_ids(page) and len(result_ids(page)) == 12
    page.close()


def test_a_shared_link_opens_an_images_neighbours_directly(site, browser):
    folder, server = site
    name = sorted(p.name for p in folder.iterdir())[7]
    page = browser.new_page()
    page.goto(f"{server.url}/?id={quote(name, safe='')}")
    page.wait_for_selector("#results .result")
    assert page.locator("#query-title").inner_text() == name
    assert name not in result_ids(page)
    page.screenshot(path=str(ARTIFACTS / "neighbours-by-link.png"), full_page=True)
    page.goto(f"{server.url}/?id=no-such-image.jpg")
    page.wait_for_function("() => document.querySelector('#status').classList.contains('error')")
    assert "no image" in page.locator("#status").inner_text()
    page.close()


def test_the_duplicates_view_groups_a_recompressed_copy_with_its_original(site, browser):
    folder, server = site
    original = sorted(p.name for p in EXAMPLES.iterdir())[0]
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server.url + "/")
    page.click("#dup-link")
    page.wait_for_selector("#groups .group")
    groups = page.eval_on_selector_all(
        "#groups .group", "gs => gs.map(g => [...g.querySelectorAll('li')].map(l => l.dataset.id))"
    )
    assert any({original, f"copy-jpeg-{original}"} <= set(g) for g in groups)  # quality 35
    summary = page.locator("#dup-summary").inner_text()
    assert "files could go" in summary and "Threshold fitted on this catalogue" in summary
    page.screenshot(path=str(ARTIFACTS / "duplicates.png"), full_page=True)
    page.close()


def test_an_unreadable_upload_shows_the_loaders_reason(site, browser, tmp_path):
    _, server = site
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    page = browser.new_page()
    page.goto(server.url + "/")
    page.set_input_files("#file", str(bad))
    page.wait_for_function("() => document.querySelector('#status').classList.contains('error')")
    assert "not_an_image" in page.locator("#status").inner_text()
    assert result_ids(page) == []
    page.close()


def test_the_page_needs_nothing_from_outside_the_server(site):
    _, server = site
    import httpx

    html = httpx.get(server.url + "/").text + httpx.get(server.url + "/static/app.js").text
    assert "http://" not in html and "https://" not in html and "//cdn" not in html
