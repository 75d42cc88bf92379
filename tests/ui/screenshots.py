"""`make screenshots`: the README's pictures of the viewer (docs/screenshots/*.png), taken in headless
Chromium on a real stack: a pair set with a chained training and its base-vs-adapter evaluation, tiny-llava
on the bundled shapes data. Not collected by `make test` (the name does not start with test_); run it
explicitly (the Makefile passes the file to pytest).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from tests.e2e.conftest import redis_db, wait_for
from tests.ui.conftest import KEY, PAIRSET, make_driver, start_stack

OUT = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
LORA = {"lora_r": 8, "lora_alpha": 16, "learning_rate": 1e-3, "num_epochs": 1, "warmup_ratio": 0.0, "max_steps": 12}


def _request(dataset_id: str) -> dict[str, Any]:
    evaluation = {"dataset_id": dataset_id, "num": 12, "max_new_tokens": 8, "shard_size": 12, "seed": 1}
    return {
        "dataset_id": dataset_id,
        **PAIRSET,
        "augmentation": {**PAIRSET["augmentation"], "num": 32},
        "shard_size": 16,
        "train": {"hyperparameters": LORA, "checkpoint_every": 4, "evaluation": evaluation},
    }


def _shot(driver: Any, url: str, name: str, height: int = 900, ready: str = "return true") -> None:
    driver.set_window_size(1280, height)
    driver.get(url)
    wait_for(lambda: driver.execute_script("return [...document.images].every(i => i.complete)"), 30, f"{name}'s images")
    wait_for(lambda: driver.execute_script(ready), 30, f"{name} to be ready")
    OUT.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(OUT / f"{name}.png"))
    print(f"wrote {OUT / name}.png")


def test_screenshots(tmp_path: Path, redis_url: str, browser_executables: tuple[str, str]) -> None:
    stack = start_stack(tmp_path, redis_db(redis_url, 13), trainer=True, pairset=_request)
    driver = make_driver(*browser_executables)
    try:
        ps = stack.get(f"/v1/pairsets/{stack.pairset_id}")
        tid = wait_for(lambda: stack.get(f"/v1/pairsets/{stack.pairset_id}")["training_id"], 60, "the training")

        def evaluated() -> bool:
            tr = stack.get(f"/v1/trainings/{tid}")
            assert tr["status"] in ("queued", "running", "succeeded"), tr
            ev = tr.get("evaluation") or {}
            return all((ev.get(role) or {}).get("status") == "succeeded" for role in ("base", "adapter"))

        wait_for(evaluated, 900, "the training and its evaluations", interval=1)
        base = stack.get(f"/v1/trainings/{tid}")["evaluation"]["base"]["id"]

        driver.get(stack.url + "/ui/pairsets")
        _shot(driver, stack.url + "/ui/signin", "signin", 500)
        driver.find_element(By.ID, "api_key").send_keys(KEY)
        driver.find_element(By.ID, "signin").click()
        wait_for(lambda: urlparse(driver.current_url).path != "/ui/signin", 10, "signing in")
        _shot(driver, f"{stack.url}/ui/datasets/{stack.dataset_id}", "dataset", 700)
        _shot(driver, f"{stack.url}/ui/pairsets/{stack.pairset_id}", "pairset", 1500)
        driver.get(f"{stack.url}/ui/pairsets/{stack.pairset_id}/prompts")
        Select(driver.find_element(By.ID, "filter-format")).select_by_value("grid")
        driver.find_element(By.ID, "apply-filters").click()
        _shot(driver, driver.current_url, "prompts", 1100)
        uid = driver.find_element(By.CSS_SELECTOR, "#prompts .prompt-card").get_attribute("data-uid")
        _shot(driver, f"{stack.url}/ui/pairsets/{stack.pairset_id}/prompts/{uid}", "prompt", 1700)
        seq = stack.get(f"/v1/pairsets/{stack.pairset_id}/prompts", format="sequence", limit=1)["data"]
        if seq:
            _shot(driver, f"{stack.url}/ui/pairsets/{stack.pairset_id}/prompts/{seq[0]['uid']}", "prompt-sequence", 1300)
        curves = "return !!document.querySelector(\"svg[data-curve='loss'] polyline\")"
        _shot(driver, f"{stack.url}/ui/trainings/{tid}", "training", 1000, ready=curves)
        _shot(driver, f"{stack.url}/ui/evaluations/{base}", "evaluation", 1300)
        assert ps["status"] == "succeeded"
    finally:
        driver.quit()
        stack.stop()


if __name__ == "__main__":
    raise SystemExit(pytest.main(["-q", __file__]))
