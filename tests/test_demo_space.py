"""The demo Space (``spaces/demo``): its card, every public endpoint through ``gradio_client``, and a real browser.

One server is started on 127.0.0.1 (a free port) for the module and closed at the end. The
ground truth is the Middlebury motorcycle stereo pair's disparity map (scikit-image data): a
transfer counts as right within 0.05 x the image's longer side (37 pixels, PCK@0.05), and the
median error must stay under :data:`MEDIAN_ERROR_PX`.

The browser test drives Debian's ``chromium`` + ``chromium-driver`` with selenium (``.ci/run``
installs them). Without them it is skipped, unless ``SEMCORR_REQUIRE_BROWSER`` is set (as in CI),
where it fails. Its screenshot is written to ``$SEMCORR_TEST_ARTIFACTS`` (default: the test's
temporary folder) and the path printed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

gr = pytest.importorskip("gradio", reason='the demo Space needs gradio: pip install "semcorr[test]"')
gradio_client = pytest.importorskip("gradio_client")

from semcorr.hub_datasets.skimage_pairs import skimage_data_dir, stereo_pair  # noqa: E402
from semcorr.spaces.demo import app, engine  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")

SPACE_DIR = Path(__file__).resolve().parents[1] / "spaces" / "demo"
LEFT, RIGHT = skimage_data_dir() / "motorcycle_left.png", skimage_data_dir() / "motorcycle_right.png"
#: A transfer is right within this many pixels (0.05 x the 741-pixel longer side: PCK@0.05).
PCK_RADIUS_PX = 0.05 * 741
#: Median transfer error on the stereo pair must be below this (the default model gets ~3 px).
MEDIAN_ERROR_PX = 6.0
#: The point the browser clicks (image pixels of the left view): a textured spot on the motorcycle.
CLICK_XY = (337.0, 256.0)
#: The browser's transfer must land this close to the ground truth.
CLICK_ERROR_PX = 10.0
PUBLIC_ENDPOINTS = {"/match", "/heatmap", "/dense"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _true_match(x: float, y: float) -> np.ndarray:
    """Ground truth in the right view of a continuous point of the left view (its pixel's disparity)."""
    disparity = np.load(skimage_data_dir() / "motorcycle_disp.npz")["arr_0"]
    d = float(disparity[int(y), int(x)])
    assert np.isfinite(d), f"no disparity at {(x, y)}"
    return np.array([x - d, y])


@pytest.fixture(scope="module")
def server():
    """``(url, client)`` of the Space served on a free local port (the default model loaded first)."""
    from gradio_client import Client

    engine.clear_caches()
    app.warm_up()
    demo = app.build_demo()
    port = _free_port()
    app.launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        yield url, Client(url, verbose=False, download_files=False)
    finally:
        demo.close()
        engine.clear_caches()


def _file(path):
    from gradio_client import handle_file

    return handle_file(str(path))


def _fetch_json(file_value) -> dict:
    with urllib.request.urlopen(file_value["url"], timeout=30) as response:
        return json.loads(response.read().decode("utf-8"))


def _match(client, points="", mode="points", top_k=30, threshold=0.0, model=engine.DEFAULT_MODEL, source=LEFT, target=RIGHT):
    return client.predict(_file(source), _file(target), points, mode, top_k, threshold, model, api_name="/match")


# -- the card ---------------------------------------------------------------------------------------
def test_space_card_parses_and_names_the_app():
    from huggingface_hub import SpaceCard

    card = SpaceCard.load(SPACE_DIR / "README.md")
    data = card.data
    assert data.sdk == "gradio" and data.sdk_version == "6.31.0"
    assert data.app_file == "app.py" and (SPACE_DIR / data.app_file).is_file()
    assert data.title and data.emoji and len(data.to_dict()["short_description"]) <= 60
    assert "semcorr" in (SPACE_DIR / "requirements.txt").read_text().split("[")[0]
    assert (SPACE_DIR / "screenshot.png").is_file() and "](screenshot.png)" in card.text


# -- the API ----------------------------------------------------------------------------------------
def test_public_endpoints_are_the_documented_ones(server):
    _, client = server
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(endpoints) == PUBLIC_ENDPOINTS
    names = [parameter["parameter_name"] for parameter in endpoints["/match"]["parameters"]]
    assert names == ["source", "target", "points", "mode", "top_k", "score_threshold", "model"]


def test_match_transfers_stereo_points_to_the_ground_truth(server):
    _, client = server
    pair = stereo_pair(20, seed=3)
    picture, table, json_file, png_file, status = _match(client, engine.format_points(pair.source_keypoints))
    assert status.startswith("20 point(s) transferred"), status
    rows = np.array(table["data"], dtype=np.float64)
    assert rows.shape == (20, 6) and rows[:, 0].tolist() == list(range(1, 21))
    np.testing.assert_allclose(rows[:, 1:3], pair.source_keypoints, atol=0.051)  # "%.1f" of the given points
    error = np.linalg.norm(rows[:, 3:5] - pair.target_keypoints, axis=1)
    assert np.median(error) < MEDIAN_ERROR_PX, error
    assert np.mean(error <= PCK_RADIUS_PX) >= 0.95, error
    assert ((rows[:, 5] >= 0) & (rows[:, 5] <= 1)).all()
    assert picture["url"] and png_file["url"]


def test_json_download_matches_the_shown_points(server):
    _, client = server
    pair = stereo_pair(5, seed=1)
    _, table, json_file, png_file, _ = _match(client, engine.format_points(pair.source_keypoints))
    payload = _fetch_json(json_file)
    assert payload["mode"] == "points" and payload["source_image_size"] == [741, 500]
    rows = np.array(table["data"], dtype=np.float64)
    np.testing.assert_allclose(np.array(payload["source_keypoints"]), rows[:, 1:3], atol=0.051)
    np.testing.assert_allclose(np.array(payload["target_keypoints"]), rows[:, 3:5], atol=0.051)
    np.testing.assert_allclose(np.array(payload["scores"]), rows[:, 5], atol=0.00051)
    with urllib.request.urlopen(png_file["url"], timeout=30) as response:
        assert response.read(8) == b"\x89PNG\r\n\x1a\n"


def test_auto_mode_respects_k_and_the_threshold(server):
    _, client = server
    _, table, json_file, _, status = _match(client, mode="auto", top_k=12, threshold=0.4)
    payload = _fetch_json(json_file)
    scores = payload["scores"]
    assert 0 < len(scores) <= 12 and min(scores) >= 0.4 and scores == sorted(scores, reverse=True), status
    expected_by = "pipeline" if engine.get_matcher().pipeline_takes_threshold else "space"
    assert payload["score_threshold_applied_by"] == expected_by and payload["top_k"] == 12
    assert len(table["data"]) == len(scores)
    # matches of the stereo pair stay on their row and move left by a disparity
    source, target = np.array(payload["source_keypoints"]), np.array(payload["target_keypoints"])
    truth = np.array([_true_match(x, y) for x, y in source if np.isfinite(_disparity_at(x, y))])
    assert len(truth) >= len(source) // 2
    kept = np.array([np.isfinite(_disparity_at(x, y)) for x, y in source])
    assert np.median(np.linalg.norm(target[kept] - truth, axis=1)) < 2 * MEDIAN_ERROR_PX


def _disparity_at(x, y) -> float:
    disparity = np.load(skimage_data_dir() / "motorcycle_disp.npz")["arr_0"]
    return float(disparity[min(int(y), disparity.shape[0] - 1), min(int(x), disparity.shape[1] - 1)])


def test_heatmap_and_dense_endpoints(server):
    from PIL import Image

    _, client = server
    heat, caption = client.predict(_file(LEFT), _file(RIGHT), "100,100; 337,256", engine.DEFAULT_MODEL, api_name="/heatmap")
    assert caption.startswith("Match scores of point 2 (337.0, 256.0)"), caption
    with urllib.request.urlopen(heat["url"], timeout=30) as response, Image.open(response) as picture:
        assert picture.size == (741, 500)
        pixels = np.asarray(picture.convert("L"), dtype=np.float64)
    # the heat is brightest near the true match of the last point
    tx, ty = _true_match(337.0, 256.0)
    bright_y, bright_x = np.unravel_index(np.argmax(pixels), pixels.shape)
    assert np.hypot(bright_x - tx, bright_y - ty) < PCK_RADIUS_PX
    for view in app.DENSE_VIEWS:
        picture, caption = client.predict(_file(LEFT), _file(RIGHT), view, engine.DEFAULT_MODEL, api_name="/dense")
        assert picture is not None and caption.startswith("Left: the source"), caption
    none, text = client.predict(None, _file(RIGHT), "", engine.DEFAULT_MODEL, api_name="/heatmap")
    assert none is None and "Upload a source and a target image" in text


def test_a_non_image_upload_is_refused_with_a_message(server, tmp_path):
    from gradio_client.exceptions import AppError

    _, client = server
    fake = tmp_path / "notes.png"
    fake.write_text("this is not a picture")
    with pytest.raises(AppError, match=r"'notes.png' is not an image this demo can read"):
        _match(client, "10,10", source=fake)


def test_an_unknown_hub_model_offline_gives_a_clear_message(server, tmp_path):
    _, client = server
    *_, status = _match(client, "10,10", model="someone/no-such-semcorr-model")
    assert "not in the Hugging Face cache while the Hub is offline" in status and "Traceback" not in status
    *_, status = _match(client, "10,10", model=str(tmp_path))
    assert "holds no config.json" in status
    *_, status = _match(client, "10,10; 9999,5")
    assert "lies outside the 741x500 image" in status


def test_upload_size_limit(server, tmp_path):
    _, client = server
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + os.urandom(11 * 1024 * 1024))
    with pytest.raises(Exception, match=r"(?i)size|large|413"):
        _match(client, "10,10", source=big)


# -- the engine behind the page ---------------------------------------------------------------------
def test_cached_clicks_equal_the_pipeline(default_pipe):
    """The click shortcut (the pair's kept dense field) gives what pipeline("semantic-correspondence") gives."""
    pair = stereo_pair(12, seed=5)
    session = engine.get_session(LEFT, RIGHT)
    assert session.matcher.fast_clicks
    fast = session.transfer(pair.source_keypoints.tolist())
    reference = default_pipe({"source_image": str(LEFT), "target_image": str(RIGHT), "source_keypoints": pair.source_keypoints})
    np.testing.assert_allclose(fast["target_keypoints"], reference["target_keypoints"], atol=1e-3)
    np.testing.assert_allclose(fast["scores"], reference["scores"], atol=1e-5)


class _PipelineWithThreshold:
    """Stands in for a pipeline that takes ``score_threshold``; records what it was called with."""

    RESULT = {"source_keypoints": [[10.0, 10.0], [20.0, 20.0], [30.0, 30.0]],
              "target_keypoints": [[11.0, 10.0], [21.0, 20.0], [31.0, 30.0]], "scores": [0.9, 0.6, 0.2]}

    def __init__(self):
        self.calls = []

    def _sanitize_parameters(self, top_k=None, cycle_tolerance=None, score_threshold=None, **kwargs):
        return {}, {}, {}

    def __call__(self, inputs, **kwargs):
        self.calls.append(kwargs)
        threshold = kwargs.get("score_threshold", 0.0)
        keep = [i for i, score in enumerate(self.RESULT["scores"]) if score >= threshold]
        return {key: [values[i] for i in keep] for key, values in self.RESULT.items()}


class _PipelineWithoutThreshold(_PipelineWithThreshold):
    def _sanitize_parameters(self, top_k=None, cycle_tolerance=None, **kwargs):
        return {}, {}, {}


@pytest.mark.parametrize("pipe_class, applied_by", [(_PipelineWithThreshold, "pipeline"), (_PipelineWithoutThreshold, "space")])
def test_auto_mode_passes_score_threshold_when_the_pipeline_takes_it(pipe_class, applied_by):
    pipe = pipe_class()
    matcher = engine.Matcher("stub", pipe, model=None, processor=None, model_id="stub")
    image = engine.open_image(LEFT)
    session = engine.PairSession(matcher, image, image)
    result, how = session.auto(top_k=5, score_threshold=0.5)
    assert how == applied_by and result["scores"] == [0.9, 0.6]
    assert result["target_keypoints"] == [[11.0, 10.0], [21.0, 20.0]]
    assert pipe.calls[-1]["top_k"] == engine.TOP_K_MAX
    assert ("score_threshold" in pipe.calls[-1]) == (applied_by == "pipeline")
    assert session.auto(top_k=1, score_threshold=0.5)[0]["scores"] == [0.9]  # cut from the kept answer
    assert len(pipe.calls) == 1


def test_large_images_are_downscaled_and_points_mapped_back(tmp_path):
    from PIL import Image

    with Image.open(LEFT) as left, Image.open(RIGHT) as right:
        big_left, big_right = tmp_path / "left.png", tmp_path / "right.png"
        left.convert("RGB").resize((1482, 1000), Image.BICUBIC).save(big_left)
        right.convert("RGB").resize((1482, 1000), Image.BICUBIC).save(big_right)
    session = engine.get_session(big_left, big_right)
    assert max(session.source.image.size) == engine.MAX_SIDE and session.source.original_size == (1482, 1000)
    pair = stereo_pair(10, seed=2)
    big = session.transfer((pair.source_keypoints * 2).tolist())
    small = engine.get_session(LEFT, RIGHT).transfer(pair.source_keypoints.tolist())
    np.testing.assert_allclose(np.array(big["source_keypoints"]), pair.source_keypoints * 2, atol=1e-3)
    error = np.linalg.norm(np.array(big["target_keypoints"]) / 2 - pair.target_keypoints, axis=1)
    assert np.median(error) < MEDIAN_ERROR_PX
    assert np.median(np.linalg.norm(np.array(big["target_keypoints"]) / 2 - np.array(small["target_keypoints"]), axis=1)) < 3


def test_click_handlers_add_undo_and_map_points():
    select = gr.SelectData(None, {"index": [337, 256], "value": None, "selected": True})
    points, mode = app.add_point(str(LEFT), "10.0,20.0", select)
    assert engine.parse_points(points) == [[10.0, 20.0], [337.0, 256.0]] and mode == "points"
    assert app.undo_point(points) == "10.0,20.0" and app.undo_point("") == ""
    # a click on the left half of the matches picture lands on the source at the same place
    layout = engine.pair_layout(engine.open_image(LEFT), engine.open_image(RIGHT))
    scale = layout.source_size[0] / 741
    view_click = gr.SelectData(None, {"index": [round(337 * scale), round(256 * scale)], "value": None, "selected": True})
    points, _ = app.add_point_from_view(str(LEFT), str(RIGHT), "", view_click)
    (x, y), = engine.parse_points(points)
    assert abs(x - 337) < 1.5 / scale and abs(y - 256) < 1.5 / scale
    right_half = gr.SelectData(None, {"index": [layout.source_size[0] + 5, 10], "value": None, "selected": True})
    assert app.add_point_from_view(str(LEFT), str(RIGHT), "", right_half)[0] == gr.update()
    with pytest.raises(ValueError, match="points entry 0"):
        engine.parse_points("1,2,3")


def test_space_command_checks_its_options(capsys):
    from semcorr.pipelines.cli import main

    assert main(["space", "--port", "70000"]) == 2
    assert "--port must be between 1 and 65535" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["space", "--help"])
    assert "--host" in capsys.readouterr().out


# -- a real browser ---------------------------------------------------------------------------------
def _browser():
    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (chromium and driver):
        message = "needs Debian's chromium and chromium-driver (.ci/run installs them: apt-get install chromium chromium-driver)"
        if os.environ.get("SEMCORR_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    webdriver = pytest.importorskip("selenium.webdriver")
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must not look for drivers online
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1360,1700", "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=options)


def _click_image_pixel(browser, element_css: str, x: float, y: float) -> None:
    """Click image pixel ``(x, y)`` of the ``<img>`` in ``element_css``: the displayed image is scaled
    (and letterboxed) in the page, so the pixel is mapped through its rendered and natural sizes."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    image = browser.find_element(By.CSS_SELECTOR, f"{element_css} img")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", image)
    left, top, width, height, natural_width, natural_height = browser.execute_script(
        "const r = arguments[0].getBoundingClientRect();"
        "return [r.left, r.top, r.width, r.height, arguments[0].naturalWidth, arguments[0].naturalHeight];", image)
    scale = min(width / natural_width, height / natural_height, 1.0)  # how the page fits the image in its box
    viewport_x = left + (width - natural_width * scale) / 2 + x * scale
    viewport_y = top + (height - natural_height * scale) / 2 + y * scale
    actions = ActionChains(browser)
    actions.w3c_actions.pointer_action.move_to_location(round(viewport_x), round(viewport_y)).click()
    actions.perform()


def _artifact_dir(tmp_path_factory) -> Path:
    folder = os.environ.get("SEMCORR_TEST_ARTIFACTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        return Path(folder)
    return tmp_path_factory.mktemp("space-artifacts")


def test_browser_click_a_point_and_read_its_match(server, tmp_path_factory):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as conditions
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = server
    browser = _browser()
    artifacts = _artifact_dir(tmp_path_factory)
    wait = WebDriverWait(browser, 60)

    def text(css):
        return browser.execute_script("const e = document.querySelector(arguments[0]); return e ? e.innerText : '';", css)

    def json_link():  # read in the page: the element is replaced whenever a result arrives
        return browser.execute_script("const a = document.querySelector('#json-file a[href]'); return a ? a.href : null;")

    def natural_width(css):
        return browser.execute_script(
            "const i = document.querySelector(arguments[0] + ' img'); return i && i.complete ? i.naturalWidth : 0;", css)

    try:
        browser.get(url)
        try:
            wait.until(conditions.presence_of_element_located((By.CSS_SELECTOR, "#source-image input[type=file]")))
        except TimeoutException:
            pytest.fail(f"the page at {url} did not load (no source upload field)")
        browser.find_element(By.CSS_SELECTOR, "#source-image input[type=file]").send_keys(str(LEFT))
        browser.find_element(By.CSS_SELECTOR, "#target-image input[type=file]").send_keys(str(RIGHT))
        wait.until(lambda _: natural_width("#source-image") == 741 and natural_width("#target-image") == 741)
        wait.until(lambda _: "Click points on the source" in text("#status"))  # the pair is matched and kept
        wait.until(lambda _: "Pair ready: source 741×500" in text("#pair-info"))  # matched, its dense field kept

        browser.execute_script(  # time the click in the page: mousedown -> the status shows its transfer
            "window.__down = null; window.__shown = null;"
            "document.querySelector('#source-image').addEventListener('mousedown', () => { window.__down = performance.now(); }, true);"
            "new MutationObserver(() => { if (window.__shown === null && document.querySelector('#status').innerText"
            ".includes('1 point(s) transferred')) window.__shown = performance.now(); })"
            ".observe(document.querySelector('#status'), {subtree: true, childList: true, characterData: true});")
        start = time.perf_counter()
        _click_image_pixel(browser, "#source-image", *CLICK_XY)
        try:
            WebDriverWait(browser, 30).until(lambda _: "1 point(s) transferred" in text("#status"))
        except TimeoutException:
            pytest.fail(f"the click on the source image did not register; status: {text('#status')!r}")
        click_seconds = time.perf_counter() - start
        in_page = browser.execute_script("return window.__shown && window.__down ? (window.__shown - window.__down) / 1000 : null;")
        clicked = engine.parse_points(browser.find_element(By.CSS_SELECTOR, "#points textarea, #points input").get_attribute("value"))
        assert len(clicked) == 1 and np.hypot(clicked[0][0] - CLICK_XY[0], clicked[0][1] - CLICK_XY[1]) <= 2.0, clicked

        before = json_link()
        browser.find_element(By.CSS_SELECTOR, "#match-button").click()
        wait.until(lambda _: json_link() not in (None, before))
        with urllib.request.urlopen(json_link(), timeout=30) as response:
            payload = json.loads(response.read().decode("utf-8"))
        (source,), (target,) = payload["source_keypoints"], payload["target_keypoints"]
        assert np.allclose(source, clicked[0], atol=0.051)
        error = float(np.linalg.norm(np.array(target) - _true_match(*source)))
        assert error <= CLICK_ERROR_PX, f"the page transferred {source} to {target}: {error:.1f} px from the ground truth"
        shown = [float(value) for value in text("#match-table").split() if value.replace(".", "", 1).isdigit()]
        assert any(abs(value - target[0]) < 0.051 for value in shown), (target, shown)  # the table shows the JSON's point
        assert any(abs(value - target[1]) < 0.051 for value in shown), (target, shown)

        # a cross-instance example pair, four clicks: the picture shown in the README
        if len(app.example_pairs()[0]) > 1:
            browser.find_element(By.XPATH, "//button[contains(., 'two cheetahs')]").click()
            wait.until(lambda _: natural_width("#source-image") == 256)
            wait.until(lambda _: "Click points on the source" in text("#status"))
            wait.until(lambda _: "Pair ready: source 256×256" in text("#pair-info"))
            for count, (x, y) in enumerate([(89, 91), (161, 91), (120, 145), (120, 172)], start=1):
                _click_image_pixel(browser, "#source-image", x, y)
                WebDriverWait(browser, 30).until(lambda _, n=count: f"{n} point(s) transferred" in text("#status"))
        screenshot = artifacts / "space-screenshot.png"
        browser.execute_script("window.scrollTo(0, 0)")
        assert browser.save_screenshot(str(screenshot))
        print(f"\nclick -> transfer shown: {in_page} s in the page ({click_seconds:.2f} s with the webdriver); "
              f"screenshot: {screenshot}")
    except BaseException:
        failure = artifacts / "space-failure.png"
        browser.save_screenshot(str(failure))
        print(f"\nscreenshot of the failure: {failure}")
        raise
    finally:
        browser.quit()
