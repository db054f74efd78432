"""The demo page in a real headless Chromium: draw a stroke, move the slider, see the answer change;
the trace chart follows the answer (one point and one label per iteration, the first certified one
marked), the certified-stop toggle stops there. A screenshot is kept as the test's artifact.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
        "--window-size=1000,1250",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_draw_a_stroke_and_move_the_tolerance(
    browser: object, server: httpx.Client, tmp_path_factory: pytest.TempPathFactory
) -> None:
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
    assert text("stop") == "tol" and "calibrated at tol 1e-1" in text("calibration")
    _check_trace(driver, at_1e1)

    toggle = driver.find_element(By.ID, "certified-stop")  # type: ignore[attr-defined]
    toggle.click()
    wait.until(lambda d: text("stop") == "certified")
    first = driver.find_element(By.ID, "trace").get_attribute("data-certified-at")  # type: ignore[attr-defined]
    assert text("certified") == "yes" and text("iterations") == first  # stopped at the first certified label
    _check_trace(driver, int(text("iterations")))
    toggle.click()
    wait.until(lambda d: text("stop") == "tol")
    # a target accuracy instead of the slider: the server picks the tol, the page says so
    from selenium.webdriver.support.ui import Select

    targets = server.get("/models").json()[0]["targets"]
    choice = Select(driver.find_element(By.ID, "target"))  # type: ignore[attr-defined]
    bounds = sorted({r["accuracy_lower_bound"] for r in targets})
    assert [o.get_attribute("value") for o in choice.options][1:] == [str(b) for b in bounds]
    choice.select_by_index(len(choice.options) - 1)  # the highest bound the model offers
    wait.until(lambda d: "chosen by target_accuracy" in text("stop"))
    loosest = max(r["tol"] for r in targets if r["accuracy_lower_bound"] >= bounds[-1])
    assert f"tol {loosest:.0e}".replace("e-0", "e-") in text("stop").replace("e-0", "e-")
    assert not driver.find_element(By.ID, "tol").is_enabled()  # type: ignore[attr-defined]
    choice.select_by_index(0)
    wait.until(lambda d: text("stop") == "tol")
    slider.send_keys(*([Keys.ARROW_LEFT] * 4))  # -> 1e-5: a longer trace for the picture
    wait.until(lambda d: text("tol-value") == "1e-5" and text("stop") == "tol")
    wait.until(lambda d: int(text("iterations")) > at_1e1 + 3)
    _check_trace(driver, int(text("iterations")))
    assert text("label") == "1" and text("error") == ""
    shot = tmp_path_factory.getbasetemp() / "artifacts" / "demo_page.png"
    shot.parent.mkdir(exist_ok=True)
    driver.save_screenshot(str(shot))  # type: ignore[attr-defined]
    print(f"demo page screenshot: {shot}")


def _check_trace(driver: Any, iterations: int) -> None:
    """The chart and the step list show one point and one label per iteration, the first
    certified step marked, and agree with the answer's certificate."""
    from selenium.webdriver.common.by import By

    chart = driver.find_element(By.ID, "trace")
    assert chart.get_attribute("data-points") == str(iterations)
    step_list = driver.find_elements(By.CSS_SELECTOR, "#steps .step")
    assert [s.text.split(": ")[0] for s in step_list] == [str(k) for k in range(1, iterations + 1)]
    assert all(s.text.split(": ")[1] in "0123456789" for s in step_list)
    certified = ["certified" in (s.get_attribute("class") or "") for s in step_list]
    first = chart.get_attribute("data-certified-at")
    assert first == (str(certified.index(True) + 1) if any(certified) else "")
    assert certified[-1] is (driver.find_element(By.ID, "certified").text == "yes")
