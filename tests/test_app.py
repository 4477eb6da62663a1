"""`moat app` in a real headless browser: Debian's chromium driven by selenium through
chromedriver (`.ci/run` installs both). The page loads; a real photograph shows the class
names and the overlays; a file that is not an image shows a message; two tabs at once both
get their answer; the server still answers afterwards; an upload over the limit is refused.
"""

from __future__ import annotations

import os
import shutil
import socket
import time

import httpx
import numpy as np
import pytest
import torch
from matplotlib import cbook

import moat
from moat.app import build_page, launch
from moat.data.transforms import eval_transform
from moat.explain import Explainer

CLASSES = ["admiral", "compiler", "flag"]
PHOTO = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)  # shipped with matplotlib
TIMEOUT = 240  # seconds for one answer on a busy 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    torch.manual_seed(0)
    model = moat.create_model("tiny_moat_0", num_classes=len(CLASSES))
    explainer = Explainer(model, transform=eval_transform(64, mean=(0.5,) * 3, std=(0.5,) * 3),
                          mean=(0.5,) * 3, std=(0.5,) * 3, class_names=CLASSES)
    port = _free_port()
    page = launch(build_page(explainer), port=port, max_upload_mb=1, block=False)
    yield f"http://127.0.0.1:{port}/"
    page.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        pytest.fail("chromium and chromedriver are needed: apt-get install -y chromium "
                    "chromium-driver (.ci/run does it)")
    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1300,1300"):
        options.add_argument(arg)
    options.binary_location = binary
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    yield chrome
    chrome.quit()


def _open(browser, url: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    WebDriverWait(browser, 60).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))


def _upload(browser, path) -> None:
    from selenium.webdriver.common.by import By

    browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(path))


def _status(browser, *words: str) -> str:
    """Wait until the status line holds one of `words`; return it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def found(d):
        text = d.find_element(By.ID, "status").text
        return text if any(w in text for w in words) else False
    return WebDriverWait(browser, TIMEOUT).until(found)


def _clear(browser) -> None:
    """Remove the uploaded file (the File component's clear button)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element(By.CSS_SELECTOR, "#upload button[aria-label='Clear']").click()
    WebDriverWait(browser, 30).until(lambda d: "Choose or drop" in d.find_element(
        By.ID, "status").text)


def test_page_explains_a_photo_and_survives_a_non_image(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    _open(browser, server)
    assert "MOAT" in browser.title or "MOAT" in browser.page_source
    _upload(browser, PHOTO)
    status = _status(browser, "Time taken")
    assert "Explained: class" in status
    labels = browser.find_element(By.ID, "labels").text
    assert sum(name in labels for name in CLASSES) == 3  # top-5 of 3 classes, by name
    captions = browser.find_element(By.ID, "gallery").text
    for caption in ("stage1 map", "stage5 map", "stages.2.6 attention", "stages.3.1 attention"):
        assert caption in captions
    overlays = browser.find_elements(By.CSS_SELECTOR, "#gallery img")
    assert len(overlays) >= 8
    assert all(img.get_attribute("naturalWidth") not in (None, "0") for img in overlays)

    text_file = tmp_path / "notes.txt"
    text_file.write_text("this is not a picture\n")
    _clear(browser)
    _upload(browser, text_file)
    message = _status(browser, "Not an image")
    assert "notes.txt" in message

    _clear(browser)  # the same page still works, and the server still answers
    _upload(browser, PHOTO)
    assert "Time taken" in _status(browser, "Time taken")
    assert httpx.get(server, timeout=30).status_code == 200


def test_two_tabs_at_once(server, browser):
    from selenium.webdriver.common.by import By

    _open(browser, server)
    first = browser.current_window_handle
    browser.switch_to.new_window("tab")
    second = browser.current_window_handle
    _open(browser, server)
    for handle in (first, second):  # both requests in flight before either is read
        browser.switch_to.window(handle)
        _upload(browser, PHOTO)
    for handle in (first, second):
        browser.switch_to.window(handle)
        assert "Time taken" in _status(browser, "Time taken")
        assert "admiral" in browser.find_element(By.ID, "labels").text
    browser.close()
    browser.switch_to.window(first)


def test_upload_over_the_limit_is_refused(server, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + os.urandom(int(1.5 * 1024 * 1024)))
    with big.open("rb") as f:
        response = httpx.post(server + "gradio_api/upload", files={"files": f}, timeout=60)
    assert response.status_code == 413, response.text
    start = time.time()
    assert httpx.get(server, timeout=30).status_code == 200 and time.time() - start < 30


def test_exported_models_give_the_same_top5_without_maps(tmp_path):
    """TorchScript of MOAT against the PyTorch model; ONNX (onnxruntime) on a small network,
    whose export takes seconds instead of minutes."""
    from PIL import Image

    from moat.app.exported import NO_MAPS, ExportedClassifier

    torch.manual_seed(0)
    half = dict(mean=(0.5,) * 3, std=(0.5,) * 3)
    photo = Image.open(PHOTO)
    small = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 6)).eval()
    moat_model = moat.create_model("tiny_moat_0", num_classes=10).eval()
    example = torch.randn(1, 3, 64, 64)
    torch.jit.trace(moat_model, example, check_trace=False).save(str(tmp_path / "moat.pt"))
    torch.onnx.export(small, (example,), str(tmp_path / "small.onnx"), dynamo=True)
    for model, file in ((moat_model, "moat.pt"), (small, "small.onnx")):
        exported = ExportedClassifier(tmp_path / file, img_size=64, **half)
        with torch.no_grad():
            probs = model(exported.transform(photo.convert("RGB"))[None]).softmax(-1)[0]
        values, indices = probs.topk(5)
        got = exported.explain(photo)
        assert [p["index"] for p in got.predictions] == indices.tolist()
        np.testing.assert_allclose([p["probability"] for p in got.predictions], values,
                                   atol=1e-4)
        assert got.target == NO_MAPS and got.cams == {} and got.image.shape == (64, 64, 3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ExportedClassifier(tmp_path / "missing.onnx")
