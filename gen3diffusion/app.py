"""Gradio app: upload an image, watch the denoising steps, get the generated views, the Gaussians, a mesh and a video.

    python -m gen3diffusion.app                              # the bundled demo weights, http://127.0.0.1:7860
    python -m gen3diffusion.app --weights yuxuanx/gen3diffusion --host 0.0.0.0 --port 8080

Every ``--weights`` source (and the bundled demo weights) is offered in the page; each is loaded on first use and kept
(the least recently used one is dropped past ``--max-loaded``). Each request writes its outputs to its own folder
under one temporary working folder; only the last ``--keep-results`` folders are kept, Gradio's copies of served files
expire after ``--cache-max-age`` seconds, and the whole working folder is deleted when the server stops. A bad upload
or an unusable weights source is reported in the page's status box, and the app keeps serving.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf

from .config import SamplerConfig
from .gaussians import Gaussians, save_ply
from .mesh import MeshConfig
from .outputs import save_result, to_uint8
from .pipeline import BORDER_RATIO, DEFAULT_WEIGHTS, Gen3DiffusionPipeline
from .preprocess import IMAGE_SUFFIXES, ImageError, load_image, preprocess_image

logger = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
VIEW_NAMES = ("front (input view)", "right", "back", "left")  # target_cameras: azimuth 0, 90, 180, 270
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PipelineCache:
    """Pipelines by weights source: each is loaded on first use and reused; past ``capacity`` the least recently used
    one is dropped, so switching between sources never holds more than ``capacity`` models in memory. A failed load
    is not cached, so a source fixed on disk loads on the next request."""

    def __init__(self, load: Callable[[str], Gen3DiffusionPipeline], capacity: int = 1) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._load, self.capacity = load, capacity
        self._pipes: OrderedDict[str, Gen3DiffusionPipeline] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, source: str) -> Gen3DiffusionPipeline:
        with self._lock:
            if source in self._pipes:
                self._pipes.move_to_end(source)
                return self._pipes[source]
            while len(self._pipes) >= self.capacity:
                dropped, _ = self._pipes.popitem(last=False)
                logger.info("unloading %s", dropped)
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            logger.info("loading %s", source)
            self._pipes[source] = self._load(source)
            return self._pipes[source]

    def __contains__(self, source: str) -> bool:
        return source in self._pipes


class ResultStore:
    """One output folder per request under ``root``; creating a new one deletes all but the ``keep`` newest."""

    def __init__(self, root: Path, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root, self.keep = root, keep
        self._count = 0
        self._lock = threading.Lock()

    def new_folder(self) -> Path:
        with self._lock:
            self._count += 1
            folder = self.root / f"result_{self._count:06d}"
            folder.mkdir(parents=True)
            old = sorted(p for p in self.root.glob("result_*") if p.is_dir())[:-self.keep]
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
        return folder


@dataclass
class AppSettings:
    """What the command line fixes for the server's lifetime (the page sets the rest per request)."""

    sources: list[str]  # weights offered in the page; the first is selected at start
    steps: int  # initial value of the steps slider
    guidance_scale: float  # initial value of the guidance slider
    video_frames: int  # turntable frames
    examples: list[Path]  # example images shown under the upload box


def _no_progress(*args, **kwargs) -> None:
    """Stands in for Gradio's progress tracker outside the page."""


@dataclass
class Request:
    """A checked request: the input at the model's size, the pipeline that will sample it, and notes for the user."""

    x: torch.Tensor  # [3, H, W] preprocessed input in [0, 1] on white
    pipe: Gen3DiffusionPipeline
    name: str  # the upload's file name
    notes: str  # warnings raised while preprocessing, one "Note: ..." line each


class App:
    """The handlers behind the page. A click runs two events: :meth:`prepare` checks the request and shows the
    preprocessed input at once, then :meth:`generate` samples and sets every result once (the .glb viewer stayed
    blank when a Gradio generator set it, so no handler here is a generator)."""

    def __init__(self, settings: AppSettings, pipelines: PipelineCache, results: ResultStore) -> None:
        self.settings, self.pipelines, self.results = settings, pipelines, results

    def check(self, image_path: str | None, source: str, task: str, report: Callable = _no_progress) -> Request:
        """Validate the request, load its weights (cached) and preprocess the image; raises ValueError or
        FileNotFoundError with a message for the page."""
        if image_path is None:
            raise ImageError("no image: upload one (or pick an example) first")
        if source not in self.settings.sources:
            raise ValueError(f"unknown weights {source!r}; choose one of the list")
        if task not in BORDER_RATIO:
            raise ValueError(f"unknown task {task!r}; choose one of {', '.join(BORDER_RATIO)}")
        name = Path(image_path).name
        image = _load_upload(Path(image_path))
        report(0.0, desc="preprocessing" if source in self.pipelines else "loading weights")
        pipe = _load_or_explain(self.pipelines, source)
        with warnings.catch_warnings(record=True) as caught:  # e.g. "RGB input and rembg is not installed"
            warnings.simplefilter("always")
            x = preprocess_image(image, BORDER_RATIO[task], pipe.image_size, name=name)  # [3, H, W]
        return Request(x, pipe, name, "".join(f"\nNote: {w.message}" for w in caught))

    def prepare(self, image_path: str | None, source: str, task: str, steps: float, seed: float | None,
                report: Callable = _no_progress) -> tuple:
        """Outputs (preview, views, splat, mesh, video, downloads, status, ready): the preprocessed input and a
        status line, the previous results cleared; or the reason the request cannot run, with ready False."""
        try:
            if seed is None or seed < 0 or seed != int(seed):
                raise ValueError(f"seed must be a whole number >= 0, got {seed}")
            req = self.check(image_path, source, task, report)
        except (ValueError, FileNotFoundError) as err:  # ImageError is a ValueError
            logger.warning("request refused: %s", err)
            return (None, None, None, None, None, None, f"Error: {err}", False)
        status = f"Sampling {int(steps)} steps for {req.name} ...{req.notes}"
        return (to_uint8(req.x), None, None, None, None, None, status, True)

    def generate(
        self, ready: bool, image_path: str | None, source: str, task: str, steps: float, guidance_scale: float,
        seed: float, refine: bool, mesh: bool, report: Callable = _no_progress,
    ) -> tuple:
        """Outputs (views, splat, mesh, video, downloads, status) of Algorithm 2 on a request :meth:`prepare`
        accepted (``ready``); all unchanged otherwise."""
        if not ready:
            return _unchanged(6)
        start = time.perf_counter()
        try:
            req = self.check(image_path, source, task)
            # 1. Algorithm 2, reporting each denoising step
            num_steps = int(steps)
            sampler_cfg = OmegaConf.structured(SamplerConfig(
                num_steps=num_steps, guidance_scale=float(guidance_scale), refine=bool(refine),
                render_size=2 * req.pipe.image_size,
            ))

            def on_step(i: int, t: int, _out) -> None:
                report((i + 1, num_steps), desc=f"denoising (t = {t})", unit="steps")

            req.pipe.progress = False
            result = req.pipe(req.x[None], seed=int(seed), sampler_cfg=sampler_cfg, callback=on_step)
            seconds = time.perf_counter() - start
            # 2. files: ply, multi-view sheet, video, mesh, result.json; and the viewer's copy of the Gaussians
            report(1.0, desc="writing the Gaussians, video" + (" and mesh" if mesh else ""))
            folder = self.results.new_folder()
            written = save_result(
                folder, result.images[0], result.views[0], result.gaussians[0], req.pipe.cfg.cameras,
                video_frames=self.settings.video_frames, mesh_cfg=MeshConfig() if mesh else None,
                meta={"input": req.name, "seed": int(seed), "weights": source, "task": task,
                      "seconds": round(seconds, 3), "sampler": OmegaConf.to_container(sampler_cfg)},
            )
            viewer_ply = folder / "gaussians_y_down.ply"  # display copy; the downloads keep our y-up file
            save_ply(turned_for_viewer(result.gaussians[0]), viewer_ply)
        except Exception as err:  # the server outlives any one request: report, log the trace, keep serving
            logger.exception("generation failed for %s", image_path)
            return (None, None, None, None, None, f"Error: generation failed ({type(err).__name__}: {err})")
        views = list(zip(to_uint8(result.views[0]), VIEW_NAMES))  # [(H x W x 3 uint8, caption)] x V
        count = json.loads((folder / "result.json").read_text())["num_gaussians_saved"]
        status = (f"Done: {count} Gaussians in {time.perf_counter() - start:.1f} s "
                  f"(sampling {seconds:.1f} s).{req.notes}")
        return (views, str(viewer_ply), str(folder / "mesh.glb") if mesh else None, str(folder / "turntable.mp4"),
                [str(p) for p in written], status)


def turned_for_viewer(gaussians: Gaussians) -> Gaussians:
    """The Gaussians turned 180 degrees about x ((x, y, z) -> (x, -y, -z)), for Gradio's splat viewer: it takes y to
    point down (COLMAP's camera convention; checked in gradio 6.31 with a marked test object), while our world has
    y up, so the file we offer for download shows upside down there. A rotation, not a mirror: the object keeps its
    handedness."""
    flip = gaussians.means.new_tensor([1.0, -1.0, -1.0])
    w, x, y, z = gaussians.rotations.unbind(-1)
    rotations = torch.stack([-x, w, -z, y], dim=-1)  # q_x(180) * q with q_x(180) = (0, 1, 0, 0), (w, x, y, z)
    return Gaussians(gaussians.means * flip, gaussians.scales, rotations, gaussians.opacities, gaussians.colors)


def _load_upload(path: Path):
    """load_image with the upload's own file name in messages instead of the server's cache path."""
    try:
        return load_image(path)
    except ImageError as err:
        raise ImageError(str(err).replace(str(path), path.name)) from None


def _load_or_explain(pipelines: PipelineCache, source: str) -> Gen3DiffusionPipeline:
    """A cached pipeline, or a FileNotFoundError saying which weights could not be loaded and why."""
    try:
        return pipelines.get(source)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise FileNotFoundError(f"could not load the weights: {err}") from err


def _unchanged(n: int) -> tuple:
    """``n`` outputs Gradio leaves as they are."""
    import gradio as gr

    return tuple(gr.update() for _ in range(n))


def build_demo(app: App, cache_max_age: int):
    """The page: inputs and controls on the left, results on the right."""
    import gradio as gr

    settings = app.settings

    # Gradio hands its progress tracker to the argument whose default is gr.Progress()
    def prepare(image_path, source, task, steps, seed, progress=gr.Progress()):
        return app.prepare(image_path, source, task, steps, seed, progress)

    def generate(ready, image_path, source, task, steps, guidance_scale, seed, refine, mesh, progress=gr.Progress()):
        return app.generate(ready, image_path, source, task, steps, guidance_scale, seed, refine, mesh, progress)

    choices = [(_source_label(s), s) for s in settings.sources]
    with gr.Blocks(title="Gen-3Diffusion", analytics_enabled=False,
                   delete_cache=(min(cache_max_age, 600), cache_max_age)) as demo:
        gr.Markdown("# Gen-3Diffusion: image to 3D Gaussians\nUpload an image of one object (RGBA, or RGB on a plain "
                    "background), then press **Generate**.")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.File(label="Input image", file_types=sorted(IMAGE_SUFFIXES), type="filepath",
                                elem_id="input-image")
                if settings.examples:
                    gr.Examples([[str(p)] for p in settings.examples], inputs=[image], label="Examples")
                weights = gr.Dropdown(choices, value=settings.sources[0], label="Weights", elem_id="weights")
                task = gr.Radio(sorted(BORDER_RATIO), value="objects", label="Task",
                                info="sets how the input is recentred (border ratio objects 0.45, avatars 0.227)")
                with gr.Row():
                    steps = gr.Slider(1, 100, value=settings.steps, step=1, label="Denoising steps")
                    guidance = gr.Slider(1.0, 15.0, value=settings.guidance_scale, step=0.5, label="Guidance scale")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
                    refine = gr.Checkbox(value=True, label="3D-guided refinement",
                                         info="off: the paper's ablation (plain multi-view sampling, 3D once)")
                    mesh = gr.Checkbox(value=True, label="Extract a mesh")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
                status = gr.Textbox(label="Status", interactive=False, lines=2, elem_id="status")
                preview = gr.Image(label="Preprocessed input", interactive=False, height=256, elem_id="preview")
                ready = gr.State(False)  # whether prepare accepted the request
            with gr.Column(scale=2):
                views = gr.Gallery(label="Generated views", columns=4, height=240, object_fit="contain",
                                   elem_id="views")
                with gr.Row():
                    splat = gr.Model3D(label="3D Gaussians (drag to turn)", height=360, elem_id="splat-view")
                    mesh_view = gr.Model3D(label="Mesh", height=360, elem_id="mesh-view")
                video = gr.Video(label="Turntable", autoplay=True, loop=True, height=360, elem_id="video")
                downloads = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="downloads")
        results = [views, splat, mesh_view, video, downloads, status]
        # both events share one queue slot ("model"): one request at a time touches the models
        run.click(prepare, [image, weights, task, steps, seed], [preview, *results, ready],
                  show_progress_on=[preview], concurrency_id="model").then(
            generate, [ready, image, weights, task, steps, guidance, seed, refine, mesh], results,
            show_progress_on=[views], concurrency_id="model")
    return demo


def _source_label(source: str) -> str:
    return f"bundled demo ({DEFAULT_WEIGHTS.name})" if Path(source) == DEFAULT_WEIGHTS else source


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gen3diffusion.app", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", action="append", default=None, metavar="DIR_OR_HUB_ID",
                   help="weights offered in the page besides the bundled demo weights (repeatable; the first is "
                        "selected): a folder in this project's layout or the authors' release, or a hub id")
    p.add_argument("--base", default=None,
                   help="ImageDream diffusers folder or hub id, for the authors' release when it is not in the folder")
    p.add_argument("--model-3d-config", type=json.loads, default=None, metavar="JSON",
                   help="3D-model constructor arguments as JSON, for an authors'-layout folder whose 3D model is not "
                        "the official size (that layout stores no config); e.g. the tests' tiny model")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (None: cuda when available)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="network precision (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--steps", type=int, default=SamplerConfig.num_steps, help="initial denoising steps in the page")
    p.add_argument("--guidance-scale", type=float, default=SamplerConfig.guidance_scale, help="initial guidance")
    p.add_argument("--video-frames", type=int, default=48, help="turntable video frames")
    p.add_argument("--examples", type=Path, default=EXAMPLES_DIR, help="folder of example images (optional)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the per-run temporary folder is made (None: the system temp folder)")
    p.add_argument("--keep-results", type=int, default=8, help="request output folders kept on disk")
    p.add_argument("--cache-max-age", type=int, default=3600,
                   help="seconds before Gradio's copies of served files are deleted")
    p.add_argument("--max-loaded", type=int, default=1, help="weights sources kept loaded at once")
    p.add_argument("--max-file-size", default="50mb", help="largest upload accepted")
    p.add_argument("--no-preload", action="store_true", help="load the selected weights on the first request")
    return p.parse_args(argv)


def example_images(folder: Path) -> list[Path]:
    """The images in ``folder``, sorted; none when it does not exist."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if importlib.util.find_spec("gradio") is None:
        raise SystemExit("the app needs gradio: pip install -e '.[app]'")
    sources = list(dict.fromkeys([*(args.weights or []), str(DEFAULT_WEIGHTS)]))
    dtype = None if args.dtype == "auto" else DTYPES[args.dtype]

    def load(source: str) -> Gen3DiffusionPipeline:
        return Gen3DiffusionPipeline.from_pretrained(source, base=args.base, device=args.device, dtype=dtype,
                                                     model_3d_config=args.model_3d_config)

    # SIGTERM stops the server as Ctrl-C does, so the working folder is deleted either way
    signal.signal(signal.SIGTERM, _interrupt)
    root = Path(tempfile.mkdtemp(prefix="gen3diffusion-app-", dir=args.workdir))
    demo = None
    try:
        os.environ.setdefault("GRADIO_TEMP_DIR", str(root / "gradio"))  # read when the components are built
        pipelines = PipelineCache(load, args.max_loaded)
        if not args.no_preload:
            try:
                pipelines.get(sources[0])
            except (OSError, ValueError, RuntimeError, KeyError) as err:
                logger.error("could not preload %s (the page will say so when it is used): %s", sources[0], err)
        settings = AppSettings(sources, args.steps, args.guidance_scale, args.video_frames,
                               example_images(args.examples))
        app = App(settings, pipelines, ResultStore(root / "results", args.keep_results))
        demo = build_demo(app, args.cache_max_age)
        demo.queue(default_concurrency_limit=1)
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True,
                    allowed_paths=[str(root)], max_file_size=args.max_file_size)
    except KeyboardInterrupt:
        # a stop while loading or launching (after launch, Gradio's own wait loop takes it) is a clean exit too
        logger.info("interrupted; shutting down")
    finally:
        if demo is not None:
            demo.close()
        shutil.rmtree(root, ignore_errors=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
