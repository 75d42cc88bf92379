"""The web viewer in a real headless Chromium, on the real stack (tests/ui/conftest.py), and the v1 prompt
listing it is built on.

One finished pair set made by the worker from the bundled shapes data serves every test. The running
training is a training record that the test moves on step by step through `records.report_training_step`,
the call the trainer makes after each optimizer step, so the page's curve is seen to grow while it runs
without racing a real trainer to the end.
"""

from __future__ import annotations

import io
import json
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from core import records
from tests.e2e.conftest import wait_for
from tests.ui.conftest import KEY, OTHER_KEY, Stack, auth

# One stack for the module: under xdist (`make test`, --dist loadgroup) all of it runs on one worker.
pytestmark = pytest.mark.xdist_group("viewer")


def _sign_in(driver: Any, stack: Stack, key: str, then: str = "/ui/pairsets") -> None:
    driver.delete_all_cookies()
    driver.get(stack.url + then)
    assert urlparse(driver.current_url).path == "/ui/signin"
    driver.find_element(By.ID, "api_key").send_keys(key)
    _follow(driver, driver.find_element(By.ID, "signin"), then)


def _wait(what: str, check: Any, timeout: float = 20) -> Any:
    return wait_for(check, timeout, what, interval=0.1)


def _follow(driver: Any, element: Any, path: str, query: str = "") -> None:
    """Click `element` and wait for the browser to be on the page `path` (with `query` in its URL)."""
    element.click()
    _wait(f"the page {path}", lambda: urlparse(driver.current_url).path == path and query in urlparse(driver.current_url).query)
    _wait("the page to load", lambda: driver.execute_script("return document.readyState") == "complete")


def _loaded_size(driver: Any, img: Any) -> tuple[int, int]:
    """The natural size of an <img> once the browser has decoded it ((0, 0) if it failed)."""
    _wait("the image to load", lambda: driver.execute_script("return arguments[0].complete", img))
    return tuple(driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img))  # type: ignore[return-value]


def test_a_page_without_a_session_redirects_to_sign_in(driver: Any, stack: Stack) -> None:
    driver.delete_all_cookies()
    for path in ("/ui/", f"/ui/pairsets/{stack.pairset_id}", f"/ui/pairsets/{stack.pairset_id}/prompts?format=grid"):
        driver.get(stack.url + path)
        assert urlparse(driver.current_url).path == "/ui/signin", (path, driver.current_url)
    # A wrong key is refused on the page, and no session cookie is set.
    driver.find_element(By.ID, "api_key").send_keys("not-a-key")
    driver.find_element(By.ID, "signin").click()
    error = _wait("the error", lambda: driver.find_elements(By.ID, "signin-error"))
    assert "not valid" in error[0].text
    assert driver.get_cookie("miadpo_session") is None
    # Images and the event stream want a session too (no cookie: redirected, nothing served).
    r = httpx.get(f"{stack.url}/ui/pairsets/{stack.pairset_id}/prompts/0-0000000/images/0", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/signin?next=")


def test_sign_in_filter_to_grid_pairs_and_see_a_heat_map(driver: Any, stack: Stack) -> None:
    _sign_in(driver, stack, KEY)
    cookie = driver.get_cookie("miadpo_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie.get("expiry"), cookie
    assert KEY not in str(driver.get_cookies())  # the browser never holds the API key

    ps_path = f"/ui/pairsets/{stack.pairset_id}"
    _follow(driver, driver.find_element(By.LINK_TEXT, stack.pairset_id), ps_path)
    assert "succeeded" in driver.find_element(By.ID, "ps-status").text
    assert driver.find_elements(By.CSS_SELECTOR, "#post-selection tr")[1:], "no post-selection rows"
    histograms = driver.find_elements(By.CSS_SELECTOR, ".histograms img")
    assert histograms and all(_loaded_size(driver, img)[0] > 0 for img in histograms)

    _follow(driver, driver.find_element(By.ID, "browse"), f"{ps_path}/prompts")
    Select(driver.find_element(By.ID, "filter-format")).select_by_value("grid")
    _follow(driver, driver.find_element(By.ID, "apply-filters"), f"{ps_path}/prompts", "format=grid")
    cards = driver.find_elements(By.CSS_SELECTOR, "#prompts .prompt-card")
    assert cards and {c.get_attribute("data-format") for c in cards} == {"grid"}
    expected = stack.get(f"/v1/pairsets/{stack.pairset_id}/prompts", format="grid", limit=100)
    assert driver.find_element(By.ID, "total").text.startswith(f"{expected['total']} prompt")
    assert [c.get_attribute("data-uid") for c in cards] == [p["uid"] for p in expected["data"]][: len(cards)]

    uid = cards[0].get_attribute("data-uid")
    _follow(driver, cards[0], f"{ps_path}/prompts/{uid}")
    prompt = next(p for p in expected["data"] if p["uid"] == uid)
    assert driver.find_element(By.ID, "chosen").text == prompt["answer"].strip()
    assert len(driver.find_elements(By.CSS_SELECTOR, "#candidates tr")) == len(prompt["candidates"]) + 1
    image = driver.find_element(By.CSS_SELECTOR, "#images img")
    width, height = _loaded_size(driver, image)
    heatmap = driver.find_element(By.CSS_SELECTOR, "img.heatmap")
    # The heat map lies over the collage: loaded, the collage's size, and not one flat colour.
    assert _loaded_size(driver, heatmap) == (width, height) and width > 100
    r = httpx.get(heatmap.get_attribute("src"), cookies={"miadpo_session": cookie["value"]})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    pixels = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=np.float64)
    assert pixels.shape == (height, width, 3) and pixels.std() > 5
    # The same heat map through the v1 API, byte for byte (rendered once, cached).
    v1 = httpx.get(stack.url + prompt["candidates"][0]["heatmap_urls"][0], headers=auth())
    assert v1.status_code == 200 and v1.content == r.content


def test_a_running_trainings_curves_grow_as_it_steps(driver: Any, stack: Stack) -> None:
    r = stack.conn
    training = records.create(
        r, records.TRAINING,
        records.new_training(records.owner_of(KEY), pairset_id=stack.pairset_id, model="tiny-llava", hyperparameters={"max_steps": 6}, checkpoint_every=0),
    )
    tid = training["id"]
    records.start_training(r, tid, step=0)

    def step(n: int) -> None:
        metrics = {"loss": 0.69 - 0.05 * n, "rewards/accuracies": min(1.0, 0.2 * n), "rewards/margins": 0.1 * n}
        records.report_training_step(r, tid, step=n, total_steps=6, metrics=metrics, event={"epoch": 0.1 * n})

    _sign_in(driver, stack, KEY, then=f"/ui/trainings/{tid}")
    svg = driver.find_element(By.CSS_SELECTOR, "svg[data-curve='loss']")
    _wait("the empty curve", lambda: svg.get_attribute("data-points") == "0")
    for n in (1, 2):
        step(n)
    _wait("two points", lambda: svg.get_attribute("data-points") == "2")
    step(3)
    _wait("a third point", lambda: svg.get_attribute("data-points") == "3")
    assert driver.find_element(By.ID, "tr-step").text == "3"
    margins = driver.find_element(By.CSS_SELECTOR, "svg[data-curve='rewards/margins']")
    assert margins.get_attribute("data-points") == "3" and margins.find_elements(By.TAG_NAME, "polyline")
    records.set_training_status(r, tid, "cancelled")
    _wait("the status to follow", lambda: "cancelled" in driver.find_element(By.ID, "tr-status").text)


def test_a_running_pair_sets_progress_follows_its_event_stream(driver: Any, stack: Stack) -> None:
    """The page listens to the pair set's events (SSE): stage, progress and, at the end, the status.
    The record moves as the pipeline's jobs move it (`records.start_pairset`, `report_shard_progress`)."""
    r = stack.conn
    ps = records.create(r, records.PAIRSET, records.new_pairset(records.owner_of(KEY), dataset_id=stack.dataset_id, model="tiny-llava", config={}))
    pid = ps["id"]
    _sign_in(driver, stack, KEY, then=f"/ui/pairsets/{pid}")
    records.start_pairset(r, pid, total=40, num_shards=2)
    _wait("the running status", lambda: "running" in driver.find_element(By.ID, "ps-status").text)
    records.report_shard_progress(r, pid, 0, 20, event_every_s=0.001)
    _wait("progress 20/40", lambda: driver.find_element(By.ID, "ps-done").text == "20")
    assert driver.find_element(By.ID, "ps-progress").get_attribute("value") == "20"
    records.set_pairset_stage(r, pid, "select")
    _wait("the select stage", lambda: driver.find_element(By.ID, "ps-stage").text == "select")
    records.set_pairset_status(r, pid, "cancelled")
    _wait("the cancelled status", lambda: "cancelled" in driver.find_element(By.ID, "ps-status").text)


def test_another_keys_resources_are_not_reachable(driver: Any, stack: Stack) -> None:
    _sign_in(driver, stack, OTHER_KEY)
    assert stack.pairset_id not in driver.page_source  # not in B's list
    uid = stack.get(f"/v1/pairsets/{stack.pairset_id}/prompts", limit=1)["data"][0]["uid"]
    for path in (
        f"/ui/pairsets/{stack.pairset_id}",
        f"/ui/pairsets/{stack.pairset_id}/prompts",
        f"/ui/pairsets/{stack.pairset_id}/prompts/{uid}",
        f"/ui/datasets/{stack.dataset_id}",
    ):
        driver.get(stack.url + path)
        assert driver.find_element(By.TAG_NAME, "h1").text == "404", path
    session = driver.get_cookie("miadpo_session")["value"]
    for path in (f"/ui/pairsets/{stack.pairset_id}/prompts/{uid}/candidates/0/heatmaps/0", f"/ui/pairsets/{stack.pairset_id}/events"):
        assert httpx.get(stack.url + path, cookies={"miadpo_session": session}).status_code == 404, path
    # Signing out ends the session on the server: the old cookie no longer opens anything.
    driver.get(stack.url + "/ui/pairsets")
    _follow(driver, driver.find_element(By.ID, "signout"), "/ui/signin")
    assert httpx.get(stack.url + "/ui/pairsets", cookies={"miadpo_session": session}).status_code == 303


def test_state_changing_forms_need_the_csrf_token(stack: Stack) -> None:
    """Without the session's token, or from another origin, sign-out and cancel are refused (403)."""
    with httpx.Client(base_url=stack.url) as client:
        page = client.get("/ui/signin")
        token = page.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        r = client.post("/ui/signin", data={"api_key": KEY, "csrf": token, "next": "/ui/trainings"}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/ui/trainings"
        # The session lives in Redis with an expiry (MIADPO_UI_SESSION_TTL_S, 8 h by default); its key is the
        # token's sha256, so Redis holds nothing a cookie could be made from.
        ttls = [stack.conn.ttl(k) for k in stack.conn.scan_iter("miadpo:session:*")]
        assert ttls and all(0 < t <= 8 * 3600 for t in ttls)
        assert not any(client.cookies["miadpo_session"] in k.decode() for k in stack.conn.scan_iter("miadpo:session:*"))
        assert client.post("/ui/signin", data={"api_key": KEY, "csrf": "forged"}).status_code == 403
        csrf = client.get("/ui/pairsets").text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        assert client.post("/ui/signout", data={}).status_code == 403
        assert client.post("/ui/signout", data={"csrf": "x" * len(csrf)}).status_code == 403
        assert client.post("/ui/signout", data={"csrf": csrf}, headers={"Origin": "https://evil.example"}).status_code == 403
        assert client.get("/ui/pairsets", follow_redirects=False).status_code == 200  # still signed in
        r = client.post("/ui/signout", data={"csrf": csrf}, headers={"Origin": stack.url}, follow_redirects=False)
        assert r.status_code == 303 and client.get("/ui/pairsets", follow_redirects=False).status_code == 303


def test_the_v1_prompt_listing_pages_filters_and_hides_other_keys(stack: Stack) -> None:
    path = f"/v1/pairsets/{stack.pairset_id}/prompts"
    everything = stack.get(path, limit=100)
    prompts = everything["data"]
    assert everything["total"] == len(prompts) == stack.get(f"/v1/pairsets/{stack.pairset_id}")["counts"]["prompts"]
    assert [p["uid"] for p in prompts] == sorted(p["uid"] for p in prompts)
    assert {p["outcome"] for p in prompts} <= {"exported", "no_pair", "perplexity_gate", "perplexity", "length_ratio", "edit_distance"}
    assert sum(p["outcome"] == "exported" for p in prompts) == stack.get(f"/v1/pairsets/{stack.pairset_id}")["counts"]["pairs"]
    # Pages of 5 with the cursor give the same prompts; a filter combines with the cursor.
    seen, after = [], None
    while True:
        page = stack.get(path, limit=5, **({"after": after} if after else {}))
        seen += page["data"]
        if not page["has_more"]:
            break
        after = page["data"][-1]["uid"]
    assert [p["uid"] for p in seen] == [p["uid"] for p in prompts]
    grid = [p for p in prompts if p["format"] == "grid"]
    n = grid[0]["n_images"]
    page = stack.get(path, format="grid", n_images=n, limit=2)
    assert [p["uid"] for p in page["data"]] == [p["uid"] for p in grid if p["n_images"] == n][:2]
    assert all(p["format"] == "grid" and len(p["image_urls"]) == 1 for p in page["data"])
    seq = next(p for p in prompts if p["format"] == "sequence")
    assert len(seq["image_urls"]) == seq["n_images"] and len(seq["candidates"][0]["heatmap_urls"]) == seq["n_images"]
    image = httpx.get(stack.url + seq["image_urls"][0], headers=auth())
    assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size[0] > 0
    # Bad filters are a 422 envelope; another key sees no such pair set; a missing prompt is a 404.
    r = stack.client.get(path, params={"format": "mosaic"}, headers=auth())
    assert r.status_code == 422 and r.json()["error"]["param"] == "format"
    r = stack.client.get(path, headers=auth(OTHER_KEY))
    assert r.status_code == 404 and r.json()["error"]["code"] == "pairset_not_found"
    r = stack.client.get(f"{path}/9-9999999/images/0", headers=auth())
    assert r.status_code == 404 and r.json()["error"]["code"] == "prompt_not_found"
    # Before it has succeeded there is nothing to list; a pair set merged before the index existed says so.
    queued = records.create(stack.conn, records.PAIRSET, records.new_pairset(records.owner_of(KEY), dataset_id=stack.dataset_id, model="tiny-llava", config={}))
    r = stack.client.get(f"/v1/pairsets/{queued['id']}/prompts", headers=auth())
    assert r.status_code == 409 and r.json()["error"]["code"] == "pairset_not_succeeded"
    stack.conn.set(records.record_key(records.PAIRSET, queued["id"]), json.dumps({**queued, "status": "succeeded"}))
    r = stack.client.get(f"/v1/pairsets/{queued['id']}/prompts", headers=auth())
    assert r.status_code == 409 and r.json()["error"]["code"] == "no_prompt_index"
