"""The demo page in a real headless Chromium: draw a stroke, move the slider, see the answer change.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("Debian packages chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
        "--window-size=1000,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_draw_a_stroke_and_move_the_tolerance(browser: object, server: httpx.Client, tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    driver.get(str(server.base_url).rstrip("/") + "/")  # type: ignore[attr-defined]
    wait = WebDriverWait(driver, 20)
    text = lambda element_id: driver.find_element(By.ID, element_id).text  # type: ignore[attr-defined] # noqa: E731
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))

    pad = driver.find_element(By.ID, "pad")  # type: ignore[attr-defined]
    ActionChains(driver).move_to_element_with_offset(pad, 0, -90).click_and_hold().move_by_offset(0, 60).move_by_offset(
        0, 60
    ).move_by_offset(0, 60).release().perform()  # a vertical stroke: a "1"
    wait.until(lambda d: text("label") != "-")
    assert text("label") == "1"
    assert len(driver.find_elements(By.CSS_SELECTOR, "#bars .bar")) == 10  # type: ignore[attr-defined]
    at_1e3 = int(text("iterations"))

    slider = driver.find_element(By.ID, "tol")  # type: ignore[attr-defined]
    slider.send_keys(Keys.ARROW_LEFT, Keys.ARROW_LEFT, Keys.ARROW_LEFT)  # 1e-3 -> 1e-6
    wait.until(lambda d: text("tol-value") == "1e-6" and text("iterations") != str(at_1e3))
    at_1e6 = int(text("iterations"))
    slider.send_keys(*([Keys.ARROW_RIGHT] * 5))  # -> 1e-1
    wait.until(lambda d: text("tol-value") == "1e-1" and text("iterations") != str(at_1e6))
    at_1e1 = int(text("iterations"))
    assert at_1e1 < at_1e3 < at_1e6
    assert text("label") == "1" and text("converged") == "yes" and text("error") == ""
    driver.save_screenshot(str(tmp_path / "demo.png"))  # type: ignore[attr-defined]
