"""Make the README's pictures with the project's own commands: `moat explain` on an image,
and `moat app` photographed by headless Chromium after an upload.

    python docs/screenshots.py --checkpoint moat-demo/run IMAGE [--out docs/img]

Needs Debian's chromium and chromium-driver (as the page test) and the `test` extra.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def explain(checkpoint: str, image: str, out: Path) -> None:
    tmp = out / "explain-output"
    subprocess.run([sys.executable, "-m", "moat.cli", "explain", image, "--checkpoint",
                    checkpoint, "--output-dir", str(tmp)], check=True)
    stem = Path(image).stem
    shutil.copy(tmp / f"{stem}_cam.png", out / "explain_cam.png")
    block = sorted(tmp.glob(f"{stem}_attention_*.png"))[-1]
    shutil.copy(block, out / "explain_attention.png")
    shutil.rmtree(tmp)


def app(checkpoint: str, image: str, out: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moat.cli", "app", "--checkpoint",
                               checkpoint, "--port", str(port)])
    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,1150"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium")
    browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        deadline = time.time() + 300
        while True:
            try:
                browser.get(f"http://127.0.0.1:{port}/")
                break
            except Exception:  # noqa: BLE001 - the server is still loading the model
                if time.time() > deadline:
                    raise
                time.sleep(2)
        WebDriverWait(browser, 120).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
        browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(
            str(Path(image).resolve()))
        WebDriverWait(browser, 300).until(
            lambda d: "Time taken" in d.find_element(By.ID, "status").text)
        time.sleep(2)  # let the gallery's pictures load
        browser.save_screenshot(str(out / "app.png"))
    finally:
        browser.quit()
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", default="docs/img")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    explain(args.checkpoint, args.image, out)
    app(args.checkpoint, args.image, out)
    for png in out.glob("*.png"):  # small files in the repository: 256 colours
        Image.open(png).convert("RGB").quantize(256).save(png, optimize=True)
        print(f"wrote {png} ({png.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
