"""The Gradio app (gen3diffusion/app.py).

Fast tests call the request handlers directly on tiny random weights in the authors' layout. The slow tests start the
real server in a subprocess and drive the page with Playwright in headless Chromium (Debian's `chromium`; .ci/run
installs it): upload, progress, results, downloads, readable errors, and cleanup when the server stops.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gen3diffusion.app import App, AppSettings, PipelineCache, ResultStore, turned_for_viewer
from gen3diffusion.cameras import Cameras, orbit_camera
from gen3diffusion.gaussians import Gaussians, load_ply
from gen3diffusion.pipeline import Gen3DiffusionPipeline
from gen3diffusion.render import rasterize
from tiny_weights import official_pipeline_kwargs, write_official_folder

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")
HAS_GRADIO = importlib.util.find_spec("gradio") is not None
HAS_PLAYWRIGHT = importlib.util.find_spec("playwright") is not None
STARTUP_S = 240  # import gradio + torch and load the tiny weights on a shared 2-core CPU
RESULT_S = 300  # one tiny request with mesh and video takes ~10 s alone; CI machines are slower and shared

needs_gradio = pytest.mark.skipif(not HAS_GRADIO, reason="gradio is not installed (pip install -e '.[app]')")
needs_browser = pytest.mark.skipif(
    not (HAS_GRADIO and HAS_PLAYWRIGHT and CHROMIUM),
    reason="browser test needs gradio, playwright (pip install -e '.[app,dev]') and Debian's chromium "
           "(apt-get install chromium, or set CHROMIUM_PATH; .ci/run installs it)",
)


def write_rgba_object(path: Path) -> Path:
    """A red box on a transparent background: the kind of input the app expects."""
    arr = np.zeros((48, 48, 4), np.uint8)
    arr[12:36, 16:32] = (200, 40, 30, 255)
    Image.fromarray(arr, "RGBA").save(path)
    return path


def tiny_3d_config_json() -> str:
    return json.dumps(official_pipeline_kwargs()["model_3d_config"])


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return write_official_folder(tmp_path_factory.mktemp("weights"))


# --- handlers, without a browser -----------------------------------------------------------------------------------


@pytest.fixture
def app(weights, tmp_path) -> App:
    def load(source: str) -> Gen3DiffusionPipeline:
        return Gen3DiffusionPipeline.from_pretrained(source, **official_pipeline_kwargs())

    settings = AppSettings([str(weights), str(tmp_path / "missing")], steps=2, guidance_scale=5.0, video_frames=4,
                           examples=[])
    return App(settings, PipelineCache(load), ResultStore(tmp_path / "results", keep=1))


def test_generate_reports_every_step_and_writes_the_results(app, weights, tmp_path):
    image = str(write_rgba_object(tmp_path / "box.png"))
    preview, *cleared, status, ready = app.prepare(image, str(weights), "objects", 2, 0)
    assert ready and status.startswith("Sampling 2 steps for box.png")
    assert preview.shape == (32, 32, 3) and cleared == [None] * 5  # views, splat, mesh, video, downloads
    calls = []
    views, splat, mesh, video, downloads, status = app.generate(
        True, image, str(weights), "objects", 2, 5.0, 0, True, False, lambda *a, **k: calls.append(a[0]))
    assert status.startswith("Done"), status
    assert [c for c in calls if isinstance(c, tuple)] == [(1, 2), (2, 2)]  # the progress bar, fed per step
    assert len(views) == 4 and views[0][0].shape == (32, 32, 3)
    assert mesh is None  # mesh off
    names = sorted(Path(p).name for p in downloads)
    assert names == ["gaussians.ply", "input.png", "multiview.png", "result.json", "turntable.mp4"]
    count = int(re.search(r"Done: (\d+) Gaussians", status).group(1))
    assert load_ply(Path(splat)).num_gaussians == count == load_ply(Path(splat).parent / "gaussians.ply").num_gaussians


def test_bad_requests_are_explained(app, weights, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    clear = tmp_path / "clear.png"
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(clear)
    good = str(write_rgba_object(tmp_path / "box.png"))
    cases = [
        ((str(text), str(weights), "objects", 2, 0), "Error: notes.png: not a readable image"),
        ((str(clear), str(weights), "objects", 2, 0), "Error: clear.png: image is fully transparent"),
        ((None, str(weights), "objects", 2, 0), "Error: no image"),
        ((good, str(tmp_path / "missing"), "objects", 2, 0), "Error: could not load the weights"),
        ((good, "/etc", "objects", 2, 0), "Error: unknown weights '/etc'"),
        ((good, str(weights), "objects", 2, None), "Error: seed must be a whole number"),
    ]
    for args, message in cases:
        *outputs, status, ready = app.prepare(*args)
        assert status.startswith(message), status
        assert not ready and outputs == [None] * 6
    assert str(tmp_path) not in app.prepare(str(text), str(weights), "objects", 2, 0)[-2]  # upload paths stay out
    assert app.prepare(good, str(weights), "avatars", 2, 0)[-1]  # and the app still takes a good one


def test_turned_for_viewer_is_a_rotation_about_x():
    """Rendering the turned Gaussians from the turned cameras gives the same pictures: a rigid 180-degree turn about
    x, covariances included (a mirror or a wrong quaternion product would not match)."""
    g = torch.Generator().manual_seed(0)
    n = 64
    gaussians = Gaussians(
        means=(torch.rand(1, n, 3, generator=g) - 0.5) * 0.6,
        scales=torch.rand(1, n, 3, generator=g) * 0.08 + 0.01,
        rotations=torch.nn.functional.normalize(torch.randn(1, n, 4, generator=g), dim=-1),
        opacities=torch.rand(1, n, generator=g) * 0.8 + 0.1,
        colors=torch.rand(1, n, 3, generator=g),
    )
    c2w = orbit_camera(torch.tensor([20.0, -30.0, 5.0]), torch.tensor([0.0, 100.0, 215.0]), 1.5)  # [3, 4, 4]
    turn = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))
    before = rasterize(gaussians, Cameras.from_fovy(c2w, 49.1, 32, 32), backend="torch")
    after = rasterize(turned_for_viewer(gaussians), Cameras.from_fovy(turn @ c2w, 49.1, 32, 32), backend="torch")
    assert before.alpha.amax() > 0.5  # the scene is in view
    torch.testing.assert_close(after.rgb, before.rgb, atol=1e-5, rtol=1e-4)  # float32 round-off of two projections


def test_pipeline_cache_reuses_bounds_and_retries():
    loads, fail = [], {"b"}

    def load(source):
        loads.append(source)
        if source in fail:
            raise FileNotFoundError(f"{source}: missing")
        return object()

    cache = PipelineCache(load, capacity=1)
    first = cache.get("a")
    assert cache.get("a") is first and loads == ["a"]  # loaded once, reused
    with pytest.raises(FileNotFoundError):
        cache.get("b")
    fail.clear()
    cache.get("b")  # a failed load is retried, not remembered
    assert "a" not in cache and "b" in cache  # capacity 1: the least recently used one is dropped
    assert loads == ["a", "b", "b"]


def test_result_store_keeps_the_newest(tmp_path):
    store = ResultStore(tmp_path, keep=2)
    folders = [store.new_folder() for _ in range(5)]
    assert sorted(p for p in tmp_path.iterdir()) == folders[-2:]


# --- the real server --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_app(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """``python -m gen3diffusion.app ARGS`` on a free localhost port, output to ``log``; returns at once."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("GRADIO_TEMP_DIR", None)  # the app keeps Gradio's cache in its own working folder
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gen3diffusion.app", "--port", str(port), *args],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}/"


def start_server(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """``spawn_app``, returning once the page answers."""
    proc, url = spawn_app(args, log)
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=5)
            return proc, url
        except OSError:
            time.sleep(1)
    stop_server(proc)
    raise RuntimeError(f"the app did not answer within {STARTUP_S} s:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
    return proc.returncode


@pytest.fixture(scope="module")
def server(weights, tmp_path_factory):
    """One app for the browser tests: the tiny weights, an unusable second source, an examples folder, and at most
    one request's outputs kept on disk."""
    root = tmp_path_factory.mktemp("app")
    examples = root / "examples"
    examples.mkdir()
    write_rgba_object(examples / "red_box.png")
    workdir = root / "work"
    workdir.mkdir()
    args = ["--weights", str(weights), "--weights", str(root / "no_weights_here"),
            "--model-3d-config", tiny_3d_config_json(), "--steps", "2", "--video-frames", "6",
            "--examples", str(examples), "--workdir", str(workdir), "--keep-results", "1"]
    proc, url = start_server(args, root / "server.log")
    yield {"url": url, "workdir": workdir, "root": root, "log": root / "server.log"}
    stop_server(proc)


@pytest.fixture
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(server["url"])
        page.wait_for_selector("#input-image input[type=file]", state="attached")
        yield page
        browser.close()


def upload(page, path: Path) -> None:
    box = page.locator("#input-image")
    if box.locator("input[type=file]").count() == 0:  # a file is shown: clear it first
        box.get_by_role("button", name="Clear").click()
    box.locator("input[type=file]").set_input_files(str(path))
    page.locator("#input-image").get_by_role("cell", name=path.name).wait_for()


def run_and_wait(page, pattern: str, timeout_s: float = RESULT_S) -> str:
    """Press Generate and wait until the status box matches ``pattern``; returns the status text. Consecutive calls
    must expect different messages (the box keeps the previous one until the new request answers)."""
    from playwright.sync_api import expect

    page.click("#generate")
    status = page.locator("#status textarea")
    expect(status).to_have_value(re.compile(pattern), timeout=timeout_s * 1000)
    return status.input_value()


def result_folders(server) -> list[Path]:
    return sorted(server["workdir"].glob("*/results/result_*"))


@pytest.mark.slow
@needs_browser
def test_page_upload_generate_and_download(server, page, tmp_path):
    fetched = []
    page.on("requestfinished", lambda request: fetched.append(request.url.rsplit("/", 1)[-1]))
    image = write_rgba_object(tmp_path / "my_object.png")
    upload(page, image)
    status = run_and_wait(page, r"^Done: \d+ Gaussians")
    # the preprocessed input, the 4 views and the video are on the page
    assert page.locator("#preview img").count() == 1
    assert page.locator("#views img").count() == 4
    assert page.locator("#video video").count() == 1
    # both 3D viewers load their file: the splat viewer the turned copy, the mesh viewer the .glb
    deadline = time.monotonic() + 60
    while not {"gaussians_y_down.ply", "mesh.glb"} <= set(fetched) and time.monotonic() < deadline:
        page.wait_for_timeout(250)
    assert {"gaussians_y_down.ply", "mesh.glb"} <= set(fetched), fetched
    for viewer in ("#splat-view", "#mesh-view"):
        page.locator(f"{viewer} canvas").first.wait_for(state="attached")
    # every output is offered for download, and what the page serves is what the app wrote
    for name in ("gaussians.ply", "mesh.glb", "mesh.ply", "turntable.mp4", "multiview.png"):
        assert page.locator(f"#downloads a[href$='/{name}']").count() == 1, name
    href = page.locator("#downloads a[href$='/gaussians.ply']").get_attribute("href")
    served = page.request.get(href).body()
    (latest,) = result_folders(server)  # --keep-results 1
    assert served == (latest / "gaussians.ply").read_bytes()
    (tmp_path / "served.ply").write_bytes(served)
    assert load_ply(tmp_path / "served.ply").num_gaussians == int(re.search(r"Done: (\d+)", status).group(1))
    page.wait_for_timeout(2000)  # the viewers draw after loading; only the screenshot needs it
    page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
    assert (tmp_path / "app.png").stat().st_size > 0


@pytest.mark.slow
@needs_browser
def test_page_explains_bad_input_and_keeps_serving(server, page, weights, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    clear = tmp_path / "clear.png"
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(clear)
    upload(page, text)
    run_and_wait(page, r"^Error: notes\.png: not a readable image")
    upload(page, clear)
    run_and_wait(page, r"^Error: clear\.png: image is fully transparent")
    # an unusable weights source, chosen in the page
    page.locator("#weights input").click()
    page.get_by_role("option", name=str(server["root"] / "no_weights_here")).click()
    upload(page, write_rgba_object(tmp_path / "box.png"))
    run_and_wait(page, r"^Error: could not load the weights: .*no_weights_here")
    # back to the good weights, with the bundled example instead of an upload: the app still works
    page.locator("#weights input").click()
    page.get_by_role("option", name=str(weights), exact=True).click()
    page.locator("#input-image").get_by_role("button", name="Clear").click()
    page.get_by_text("red_box.png").first.click()
    page.locator("#input-image").get_by_role("cell", name="red_box.png").wait_for()
    run_and_wait(page, r"^Done: \d+ Gaussians")
    assert page.locator("#views img").count() == 4
    assert len(result_folders(server)) == 1  # older request folders were deleted


@pytest.mark.slow
@needs_gradio
def test_stopping_the_server_deletes_its_working_folder(weights, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    proc, url = start_server(["--weights", str(weights), "--model-3d-config", tiny_3d_config_json(),
                              "--workdir", str(workdir)], tmp_path / "server.log")
    try:
        (run_root,) = workdir.iterdir()
        assert run_root.name.startswith("gen3diffusion-app-")
    finally:
        code = stop_server(proc)
    assert code == 0, (tmp_path / "server.log").read_text()[-3000:]
    assert list(workdir.iterdir()) == []


@pytest.mark.slow
@needs_gradio
def test_stopping_the_server_while_it_starts_exits_cleanly(weights, tmp_path):
    """SIGTERM as soon as the working folder exists lands while the weights load or Gradio launches, before Gradio's
    own wait loop can take it: the app must still exit with 0 and delete the folder."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    proc, _ = spawn_app(["--weights", str(weights), "--model-3d-config", tiny_3d_config_json(),
                         "--workdir", str(workdir)], tmp_path / "server.log")
    try:
        deadline = time.monotonic() + STARTUP_S
        while not any(workdir.iterdir()) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert any(workdir.iterdir()), "the app made no working folder"
    finally:
        code = stop_server(proc)
    log = (tmp_path / "server.log").read_text()
    assert code == 0, log[-3000:]
    assert list(workdir.iterdir()) == []
    assert "Running on" not in log  # the stop did land before the server was up
