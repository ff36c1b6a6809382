"""The viewer in a real browser: Debian's headless Chromium, driven by Selenium, against the live test server.

WebGL2 runs on SwiftShader (Chromium's software renderer): no GPU needed. The page uploads a generated DICOM series,
the mask must then be drawn over the organ (checked pixel by pixel against the phantom's truth, through niivue's
own screen-to-world mapping), a review made in the page must reach the API, and a wrong key must be said so. The
worklist must list results newest first with a shadow candidate beside its live result, and open the next result
awaiting review after each verdict.
"""

import gzip
import io
import json
import os
import shutil
import time
import uuid

import httpx
import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from helpers import MODEL, SEGMENT, ZIP, auth, skip_unless_installed, zip_files
from serve_app.config import EMBEDDED_MODEL_REPOSITORY
from serve_app.model_repository import ModelRepository
from serve_app.results import ResultStore
from serve_app.tenancy.gatekeeper import ANONYMOUS

pytestmark = pytest.mark.slow
# Label 1's colour in viewer.js's palette, blended over grey at the page's opacity: red well above green and blue.
_MASK_RED = 60


# One browser a test: a browser's keep-alive connection to Ray's HAProxy outlives a reload of its routes (the old
# HAProxy process keeps serving it), so a browser from before the tenant application was deployed would still be
# sent to the application at / for the tenants' prefix.
@pytest.fixture
def browser():
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        skip_unless_installed("chromium", "Chromium and its driver are not installed (Debian chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--use-angle=swiftshader",  # WebGL2 in software
        "--enable-unsafe-swiftshader",
        "--window-size=1400,1000",
        "--force-device-scale-factor=1",  # canvas pixels = screenshot pixels
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def open_viewer(browser, base_url: str) -> None:
    """The viewer of the application at ``base_url``, once that application answers for it: right after an
    application is deployed, Ray's HAProxy may route its prefix to the application at / for a moment."""
    deadline = time.monotonic() + 60
    while "medserve viewer" not in (page := httpx.get(f"{base_url}/viewer/", timeout=30)).text:
        assert time.monotonic() < deadline, f"no viewer at {base_url}/viewer/: {page.status_code} {page.text[:200]}"
        time.sleep(0.5)
    browser.get(f"{base_url}/viewer/")


def wait_until(browser, condition: str, timeout_s: float = 300) -> None:
    """Wait until the JavaScript expression ``condition`` is true in the page; fail saying what the page says."""
    deadline = time.monotonic() + timeout_s
    while not browser.execute_script(f"try {{ return Boolean({condition}) }} catch {{ return false }}"):
        message = browser.execute_script("return document.getElementById('message')?.textContent")
        assert time.monotonic() < deadline, (
            f"timed out waiting for {condition} at {browser.current_url}; the page says: {message!r}; "
            f"its source begins {browser.page_source[:300]!r}"
        )
        time.sleep(0.5)


def canvas_pixels(browser) -> np.ndarray:
    """The canvas as the screen shows it: (rows, columns, RGB)."""
    from selenium.webdriver.common.by import By

    png = browser.find_element(By.ID, "gl").screenshot_as_png
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def mask_coloured(pixels: np.ndarray) -> np.ndarray:
    """(row, column) of the pixels the mask colours: red well above green and blue (the image is grey)."""
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return np.argwhere((r - g > _MASK_RED) & (r - b > _MASK_RED))


def voxels_under(browser, positions: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The image voxels (i, j, k) that niivue draws at canvas ``positions`` (row, column), by its own mapping."""
    world = browser.execute_script(
        "const nv = window.medserveViewer.niivue;"
        "return arguments[0].map(([y, x]) => Array.from(nv.frac2mm(nv.canvasPos2frac([x + 0.5, y + 0.5]))));",
        positions.tolist(),
    )
    ras = np.c_[np.asarray(world)[:, :3], np.ones(len(world))]
    return np.rint((np.linalg.inv(affine) @ ras.T).T[:, :3]).astype(int)


def set_opacity(browser, value: float) -> None:
    browser.execute_script(
        "const slider = document.getElementById('opacity');"
        "slider.value = arguments[0]; slider.dispatchEvent(new Event('input'));",
        value,
    )
    time.sleep(1)  # a frame drawn by SwiftShader


def test_upload_shows_the_mask_over_the_organ_and_a_review_reaches_the_api(
    browser, server_url, client, phantom, phantom_series, tmp_path
):
    from selenium.webdriver.common.by import By

    open_viewer(browser, server_url)
    wait_until(browser, "document.getElementById('model').options.length > 0", timeout_s=60)
    assert browser.find_element(By.ID, "model").get_attribute("value") == MODEL
    browser.find_element(By.ID, "study").send_keys("\n".join(str(p) for p in phantom_series))
    browser.find_element(By.ID, "segment").click()
    wait_until(browser, "document.body.dataset.overlay === 'shown'")
    time.sleep(2)  # the first frames drawn by SwiftShader

    result_id = browser.find_element(By.ID, "shown-result-id").text
    legend = browser.find_element(By.ID, "legend").text
    assert "organ" in legend
    pixels = canvas_pixels(browser)
    Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "viewer.png")  # kept by pytest, to look at
    coloured = mask_coloured(pixels)
    assert len(coloured) > 500, f"only {len(coloured)} mask-coloured pixels in the canvas"

    # Where the mask is drawn, the phantom has its organ (the model's mask within a voxel or two of the truth).
    affine = np.asarray(phantom.volume.affine)  # the grid the series was written from, and read back on
    sample = coloured[np.random.default_rng(0).choice(len(coloured), size=200, replace=False)]
    voxels = voxels_under(browser, sample, affine)
    inside_grid = np.all((voxels >= 0) & (voxels < phantom.label.shape), axis=1)
    assert inside_grid.all(), "mask-coloured pixels outside the image"
    organ = ndimage.binary_dilation(phantom.label > 0, iterations=2)
    on_organ = organ[tuple(voxels.T)].mean()
    assert on_organ > 0.9, f"only {on_organ:.0%} of mask-coloured pixels lie on the organ"
    # And the organ is drawn whole, not a speck of it: of the canvas pixels over the organ's core (two voxels in
    # from its edge, in whichever view and slice niivue shows), most are mask-coloured.
    every = np.argwhere(np.ones(pixels.shape[:2], bool))
    grid = every[:: max(1, len(every) // 20_000)]
    voxels = voxels_under(browser, grid, affine)
    inside_grid = np.all((voxels >= 0) & (voxels < phantom.label.shape), axis=1)
    core = ndimage.binary_erosion(phantom.label > 0, iterations=2)
    over_core = grid[inside_grid][core[tuple(voxels[inside_grid].T)]]
    drawn = np.zeros(pixels.shape[:2], bool)
    drawn[tuple(coloured.T)] = True
    assert len(over_core) > 50, f"only {len(over_core)} sampled canvas pixels lie over the organ's core"
    covered = drawn[tuple(over_core.T)].mean()
    assert covered > 0.8, f"only {covered:.0%} of the organ's core is drawn with the mask"

    # The slider takes the mask away: those pixels were the mask, not the image.
    set_opacity(browser, 0)
    assert len(mask_coloured(canvas_pixels(browser))) < 0.02 * len(coloured)
    set_opacity(browser, 0.6)

    browser.find_element(By.ID, "reviewer").send_keys("Dr Grey")
    browser.find_element(By.ID, "comment").send_keys("outline follows the organ")
    browser.find_element(By.ID, "accept").click()
    wait_until(browser, "document.getElementById('reviews').children.length === 1", timeout_s=60)
    browser.save_screenshot(str(tmp_path / "viewer-page.png"))  # the README's docs/viewer.png is one of these
    (review,) = client.get(f"/v1/results/{result_id}/reviews").json()["reviews"]
    assert (review["verdict"], review["reviewer"], review["comment"]) == (
        "accept",
        "Dr Grey",
        "outline follows the organ",
    )

    # Reopened by id (a fresh page): the image, the mask and the review come back.
    open_viewer(browser, server_url)
    wait_until(browser, "document.getElementById('model').options.length > 0", timeout_s=60)
    browser.find_element(By.ID, "result-id").send_keys(result_id)
    browser.find_element(By.ID, "open").click()
    wait_until(browser, "document.body.dataset.overlay === 'shown'")
    time.sleep(2)
    assert "accept by Dr Grey" in browser.find_element(By.ID, "reviews").text
    assert browser.current_url.endswith(f"/viewer/#result={result_id}")  # a link to the result
    assert len(mask_coloured(canvas_pixels(browser))) > 500
    assert browser.find_element(By.ID, "no-image").get_attribute("hidden") is not None


def test_a_wrong_key_is_said_in_the_page_and_a_right_one_lists_the_models(browser, tenant_url, tenant_keys):
    from selenium.webdriver.common.by import By

    open_viewer(browser, tenant_url)
    wait_until(browser, "document.getElementById('message').textContent.includes('needs an API key')", 60)
    browser.find_element(By.ID, "api-key").send_keys("msk_not-a-key")
    browser.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
    wait_until(browser, "document.getElementById('message').textContent.includes('refused')", 60)
    assert "not valid" in browser.find_element(By.ID, "message").text
    # The key is kept for the tab only, and never put in the page's address.
    assert browser.execute_script("return sessionStorage.getItem('medserve-api-key')") == "msk_not-a-key"
    assert browser.execute_script("return localStorage.length") == 0

    browser.find_element(By.ID, "api-key").send_keys(tenant_keys["research-lab"])
    browser.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
    wait_until(browser, "document.getElementById('model').options.length > 0", 60)
    assert "Key accepted" in browser.find_element(By.ID, "message").text
    with httpx.Client(base_url=tenant_url, timeout=60) as api:
        listed = api.get("/v1/models", headers=auth(tenant_keys["research-lab"])).json()["models"]
    assert browser.find_element(By.ID, "model").get_attribute("value") in {m["name"] for m in listed}


def worklist_ids(browser) -> list[str]:
    """The result ids of the worklist's rows, top to bottom (candidates beside their live result included)."""
    return browser.execute_script(
        "return [...document.querySelectorAll('#worklist tbody tr')].map((tr) => tr.dataset.resultId)"
    )


def stored_shadow_of(app_config, client, live_id: str) -> str:
    """A shadow candidate's result of the study of ``live_id``, committed as a rollout's shadow run commits one (the
    open test app runs no rollout): the live result's mask, made by version 2.0.0 of its model."""
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(client.get(f"/v1/results/{live_id}/mask.nii.gz").content))
    labels = client.get(f"/v1/results/{live_id}").json()["labels"]
    candidate = ModelRepository(EMBEDDED_MODEL_REPOSITORY).get(MODEL).model_copy(update={"version": "2.0.0"})
    shadow_id = uuid.uuid4().hex
    previous = os.umask(0o077)  # as the replicas write: patient data is private
    try:
        store = ResultStore.of(app_config.storage)
        box = np.asanyarray(mask.dataobj)
        store.save(shadow_id, box, (0, 0, 0), box.shape, mask.affine, {"labels": labels}, candidate)
        marker = {"role": "shadow", "version": "2.0.0", "paired_result_id": live_id}
        store.commit(shadow_id, ANONYMOUS, None, marker)
    finally:
        os.umask(previous)
    return shadow_id


def test_the_worklist_filters_and_opens_the_next_result_awaiting_review_after_each_verdict(
    browser, server_url, client, phantom_series, app_config
):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    study = zip_files(phantom_series)
    made = []  # oldest first
    for _ in range(2):
        answer = client.post(SEGMENT, content=study, headers=ZIP)
        assert answer.status_code == 200, answer.text
        made.append(answer.json()["result_id"])
    shadow = stored_shadow_of(app_config, client, made[0])

    open_viewer(browser, server_url)
    wait_until(browser, "Number(document.body.dataset.worklist) >= 1", timeout_s=60)
    Select(browser.find_element(By.ID, "worklist-model")).select_by_value(MODEL)
    Select(browser.find_element(By.ID, "worklist-version")).select_by_value("1.0.0")
    browser.find_element(By.ID, "worklist-refresh").click()
    wait_until(browser, "Number(document.body.dataset.worklist) >= 2", timeout_s=60)
    # Newest first, the shadow candidate's result beside the live result of the same study.
    assert worklist_ids(browser)[:3] == [made[1], made[0], shadow]
    beside = browser.find_element(By.CSS_SELECTOR, f"#worklist tr[data-result-id='{shadow}']")
    assert "candidate" in beside.get_attribute("class") and "shadow" in beside.text and "2.0.0" in beside.text

    def shown_is(result_id: str) -> None:
        wait_until(browser, f"document.getElementById('shown-result-id').textContent === '{result_id}'", 60)

    def row_gone(result_id: str) -> None:
        wait_until(browser, f"!document.querySelector(\"#worklist tr[data-result-id='{result_id}']\")", 60)

    browser.find_element(By.CSS_SELECTOR, f"#worklist tr[data-result-id='{made[1]}']").click()
    shown_is(made[1])
    browser.find_element(By.ID, "reviewer").send_keys("Dr Grey")
    browser.execute_script("document.activeElement.blur()")
    ActionChains(browser).send_keys("a").perform()  # accept: the next result awaiting review opens
    shown_is(made[0])
    row_gone(made[1])
    current = browser.find_element(By.CSS_SELECTOR, f"#worklist tr[data-result-id='{made[0]}']")
    assert "current" in current.get_attribute("class")
    browser.find_element(By.ID, "reject").click()
    shown_is(shadow)  # its live result reviewed, the candidate beside it is next
    assert worklist_ids(browser)[:2] == [made[0], shadow]  # still awaiting: the candidate is
    ActionChains(browser).send_keys("a").perform()
    row_gone(made[0])

    verdicts = [client.get(f"/v1/results/{r}/reviews").json()["reviews"] for r in (*made, shadow)]
    assert [[(v["verdict"], v["reviewer"]) for v in reviews] for reviews in verdicts] == [
        [("reject", "Dr Grey")],
        [("accept", "Dr Grey")],
        [("accept", "Dr Grey")],
    ]
    Select(browser.find_element(By.ID, "worklist-state")).select_by_value("reviewed")
    browser.find_element(By.ID, "worklist-refresh").click()
    top = "[...document.querySelectorAll('#worklist tbody tr')].slice(0, 3).map((tr) => tr.dataset.resultId)"
    newest_first = json.dumps([made[1], made[0], shadow], separators=(",", ":"))
    wait_until(browser, f"JSON.stringify({top}) === '{newest_first}'", timeout_s=60)
