"""`finetune ui` in a real browser (Debian's headless Chromium through Selenium): the server as a user
starts it, pages driven by clicks and keys. A dataset check's findings; a tiny-model training started
from the quickstart recipe, watched, stopped (its checkpoint), resumed and finished; an image
generated with the new adapter and found by the watermark check; a refused prompt that writes nothing.
Screenshots of each page go to $FINETUNE_UI_SCREENSHOTS (the README's are made so), else a tmp folder."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .helpers import draw_subject

pytestmark = pytest.mark.browser
REPO = Path(__file__).resolve().parents[1]
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER) and not os.environ.get("CI"):  # CI installs them (.ci/run): there it must run
    pytest.skip("needs chromium and chromium-driver (apt install chromium chromium-driver)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-root")
    shutil.copytree(REPO / "datasets" / "robot", root / "datasets" / "robot")
    messy = root / "datasets" / "messy"
    messy.mkdir()
    for i in range(3):
        draw_subject(i, (64, 64)).save(messy / f"img{i}.png")
        (messy / f"img{i}.txt").write_text("a photo of sks ball")
    draw_subject(5, (64, 64)).save(messy / "uncaptioned.png")
    (messy / "broken.png").write_bytes(b"not an image at all")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "finetune", "ui", "--port", str(port), "--root", str(root)],
                            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError("finetune ui did not start:\n" + (root / "server.log").read_text())
            time.sleep(0.5)
    yield url, root
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("FINETUNE_UI_SCREENSHOTS") or tmp_path_factory.mktemp("screens"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ------------------------------------------------------------------ driving Gradio by its elem_ids


def css(driver, selector, timeout=30):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: d.find_element(By.CSS_SELECTOR, selector))


def tab(driver, name):
    from selenium.webdriver.common.by import By

    button = next(b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text.strip() == name)
    button.click()
    time.sleep(0.5)


def fill(driver, elem_id, text, enter=False):
    from selenium.webdriver.common.keys import Keys

    box = css(driver, f"#{elem_id} textarea, #{elem_id} input")
    box.clear()
    box.send_keys(text)
    if enter:
        box.send_keys(Keys.ENTER)


def text_of(driver, elem_id) -> str:
    from selenium.webdriver.common.by import By

    el = driver.find_element(By.CSS_SELECTOR, f"#{elem_id}")
    boxes = el.find_elements(By.CSS_SELECTOR, "textarea")
    return boxes[0].get_attribute("value") if boxes else el.text


def wait_for(driver, elem_id, fragment, timeout=60) -> str:
    """The element's text once it holds `fragment`; else a failure naming what it held (and a screenshot)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, timeout, poll_frequency=0.5).until(lambda d: fragment in text_of(d, elem_id))
    except TimeoutException:
        driver.save_screenshot(os.environ.get("FINETUNE_UI_FAILURE", "/tmp/finetune-ui-failure.png"))
        raise AssertionError(f"#{elem_id} never held {fragment!r}; it holds {text_of(driver, elem_id)!r}") from None
    return text_of(driver, elem_id)


def images_in(driver, elem_id) -> int:
    from selenium.webdriver.common.by import By

    return len(driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} img"))


# ------------------------------------------------------------------ the pages


def test_dataset_check_shows_the_findings(server, browser, shots):
    url, root = server
    browser.get(url)
    css(browser, "button[role=tab]")
    tab(browser, "Datasets")
    fill(browser, "dataset-folder", str(root / "datasets" / "messy"))
    css(browser, "#dataset-check").click()
    summary = wait_for(browser, "dataset-summary", "dataset check:")
    assert "broken.png" in summary and "uncaptioned.png" in summary
    assert "4 usable" in summary
    browser.save_screenshot(str(shots / "datasets.png"))
    # Upload into a new folder: the image is added, the file that only claims to be one is skipped.
    fill(browser, "dataset-folder", str(root / "datasets" / "fresh"))
    css(browser, "#dataset-uploads input[type=file]").send_keys(f"{root / 'datasets' / 'messy' / 'img0.png'}\n"
                                                               f"{root / 'datasets' / 'messy' / 'broken.png'}")
    css(browser, "#dataset-add").click()
    added = wait_for(browser, "dataset-added", "skipped broken.png")
    assert "added img0.png" in added
    assert sorted(p.name for p in (root / "datasets" / "fresh").iterdir()) == ["img0.png"]


def test_train_watch_stop_resume_then_generate_and_find_the_watermark(server, browser, shots):
    from selenium.webdriver.support.ui import WebDriverWait

    url, root = server
    run = root / "outputs" / "ui-run"
    browser.get(url)
    css(browser, "button[role=tab]")
    tab(browser, "Train")
    overrides = [f"data.path={root / 'datasets' / 'robot'}", f"output.dir={root / 'outputs'}", "output.run_name=ui-run",
                 "training.max_steps=40", "validation.every_n_steps=5", "output.save_every_n_steps=5",
                 "validation.num_inference_steps=2", 'validation.prompts=["a photo of sks robot"]']
    fill(browser, "field-training-batch_size", "0")
    css(browser, "#train-validate").click()
    wait_for(browser, "train-report", "training.batch_size: expected greater than or equal to 1")
    assert "⚠ expected greater than or equal to 1" in wait_for(browser, "field-training-batch_size", "⚠")
    fill(browser, "field-training-batch_size", "2")
    fill(browser, "train-extra", "\n".join(overrides))
    css(browser, "#train-start").click()
    wait_for(browser, "train-report", "ui-run")
    browser.save_screenshot(str(shots / "train.png"))

    tab(browser, "Runs")
    wait_for(browser, "runs-table", "ui-run")
    fill(browser, "runs-chosen", "ui-run", enter=True)
    wait_for(browser, "runs-progress", "running")
    WebDriverWait(browser, 120, poll_frequency=0.5).until(lambda d: images_in(d, "runs-samples") > 0)
    css(browser, "#runs-stop").click()
    wait_for(browser, "runs-progress", "stopped", timeout=120)
    assert list((run / "checkpoints").glob("step-*")), "the stop saved no checkpoint"
    assert not (run / "pytorch_lora_weights.safetensors").exists()
    browser.save_screenshot(str(shots / "runs.png"))
    css(browser, "#runs-resume").click()
    wait_for(browser, "runs-progress", "finished", timeout=240)
    assert (run / "pytorch_lora_weights.safetensors").is_file()

    tab(browser, "Generate")
    fill(browser, "gen-adapters", str(run))
    fill(browser, "gen-prompt", "a photo of sks robot")
    for elem_id, value in (("gen-steps", "2"), ("gen-width", "64"), ("gen-height", "64")):
        fill(browser, elem_id, value)
    css(browser, "#gen-go").click()
    said = wait_for(browser, "gen-log", "written:", timeout=120)
    made = sorted((root / "outputs" / ".finetune-ui" / "generated").glob("*.png"))
    assert len(made) == 1 and made[0].name in said
    css(browser, "#wm-upload input[type=file]").send_keys(str(made[0]))
    assert "found, payload" in wait_for(browser, "wm-verdict", "found")
    browser.save_screenshot(str(shots / "generate.png"))

    tab(browser, "Compare")
    fill(browser, "cmp-runs", f"{run}\n{sorted((run / 'checkpoints').glob('step-*'))[0]}")
    fill(browser, "cmp-prompts", "a photo of sks robot")
    css(browser, "#cmp-go").click()
    css(browser, "#cmp-grid img", timeout=120)
    assert (root / "outputs" / ".finetune-ui" / "compare").is_dir()
    browser.save_screenshot(str(shots / "compare.png"))

    tab(browser, "Generate")
    fill(browser, "gen-block", "forbidden")
    fill(browser, "gen-prompt", "a forbidden robot")
    css(browser, "#gen-go").click()
    assert "refused" in wait_for(browser, "gen-log", "nothing written", timeout=60)
    assert sorted((root / "outputs" / ".finetune-ui" / "generated").glob("*.png")) == made
