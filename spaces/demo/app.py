"""semcorr demo Space: click a point on one image, see where it lands on another.

Run it with ``python spaces/demo/app.py`` or ``semcorr space [--host H] [--port P]``; import it and
call :func:`build_demo` to get the ``gr.Blocks`` (tests mount it), :func:`launch` to serve it with
the limits a public Space needs.

Public API endpoints (``gradio_client``; every image is a file, every point ``(x, y)`` in pixels of
the original image):

* ``/match`` ``(source, target, points, mode, top_k, score_threshold, model)`` -> ``(picture, table,
  JSON file, PNG file, status)``: in ``"points"`` mode the transfers of ``points`` (``"x,y; x,y"``),
  in ``"auto"`` mode the ``top_k`` best mutual matches scoring at least ``score_threshold``;
* ``/heatmap`` ``(source, target, points, model)`` -> ``(picture, caption)``: the match scores of
  the last point over the target;
* ``/dense`` ``(source, target, view, model)`` -> ``(picture, caption)``: the target warped onto the
  source through the dense field, or the field's displacement in colour.

Errors (a model that cannot be loaded, a point off the image) come back in the status or caption
text; an upload that is not an image is refused with a message before any function runs.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

try:  # imported as semcorr.spaces.demo.app, or run as a script from an installed semcorr
    from . import engine
except ImportError:
    from semcorr.spaces.demo import engine

logger = logging.getLogger("semcorr.space")

TITLE = "semcorr: semantic correspondence"
#: Largest upload accepted (Gradio refuses larger files before they reach the app).
MAX_FILE_SIZE = "10mb"
#: Requests waiting in the queue before new ones are turned away; matching runs one at a time.
QUEUE_SIZE = 16
#: Ask for matches of these kinds.
MODES = ("points", "auto")
DENSE_VIEWS = ("target warped onto source", "flow in colour")
TABLE_HEADERS = ["#", "source x", "source y", "target x", "target y", "score"]
DEFAULT_TOP_K, DEFAULT_THRESHOLD = 30, 0.0

INTRO = """\
# semcorr: semantic correspondence
Click points on the **source** image: each lands on the **target** in its own colour, with its score
(an absolute confidence in [0, 1]: same-scene matches about 0.5–0.8, unrelated images below 0.35,
different animals 0.2–0.45). **auto** draws the best mutual matches,
coloured by score (red → green). Points are `x,y` in pixels of the image you uploaded; the
downloads hold the same numbers. The default model is training-free
[Hyperpixel Flow](https://arxiv.org/abs/1908.06537) on an ImageNet EfficientNet-Lite0 and runs on a CPU;
the first match of a new pair takes a few seconds, later clicks on it a fraction of a second.
"""


def upload_image(**kwargs) -> gr.Image:
    """A ``gr.Image`` (file path) that refuses, with a message, an upload that is not a readable image of a sane size.

    The check wraps this instance's ``preprocess``: a subclass of ``gr.Image`` would make Gradio
    write a ``.pyi`` stub next to this file.
    """
    image = gr.Image(type="filepath", image_mode=None, **kwargs)
    preprocess = image.preprocess

    def checked_preprocess(payload):
        if payload is not None and payload.path:
            try:
                engine.check_image_file(payload.path, payload.orig_name or Path(payload.path).name)
            except ValueError as error:
                raise gr.Error(str(error), title="Not an image") from None
        return preprocess(payload)

    image.preprocess = checked_preprocess
    return image


# -- examples ---------------------------------------------------------------------------------------
def _example_files() -> list[tuple[str, Path, Path]]:
    """``(label, source, target)`` of the example pairs whose files the installed packages ship."""
    import skimage

    skimage_data = Path(skimage.__file__).parent / "data"
    gradio_root = Path(gr.__file__).parent
    cheetah1 = gradio_root / "media_assets" / "images" / "cheetah1.jpg"
    cheetah2 = gradio_root / "test_data" / "cheetah2.jpg"
    lion = gradio_root / "media_assets" / "images" / "lion.jpg"
    chelsea = skimage_data / "chelsea.png"
    pairs = [
        ("stereo pair (Middlebury motorcycle)", skimage_data / "motorcycle_left.png", skimage_data / "motorcycle_right.png"),
        ("two cheetahs", cheetah1, cheetah2),
        ("cat → lion", chelsea, lion),
        ("cheetah → cat", cheetah2, chelsea),
    ]
    return [(label, source, target) for label, source, target in pairs if source.is_file() and target.is_file()]


_examples_dir: Path | None = None


def example_pairs() -> tuple[list[list[str]], list[str]]:
    """The example pairs, copied into a temporary folder Gradio may serve; ``(rows, labels)``."""
    global _examples_dir
    if _examples_dir is None or not _examples_dir.is_dir():
        _examples_dir = Path(tempfile.mkdtemp(prefix="semcorr-space-examples-"))
        atexit.register(shutil.rmtree, _examples_dir, ignore_errors=True)
    rows, labels = [], []
    for label, source, target in _example_files():
        row = []
        for path in (source, target):
            copy = _examples_dir / path.name
            if not copy.is_file():
                shutil.copyfile(path, copy)
            row.append(str(copy))
        rows.append(row)
        labels.append(label)
    return rows, labels


# -- what the events do -------------------------------------------------------------------------------
def _error_text(error: Exception) -> str:
    if isinstance(error, ValueError):
        return " ".join(str(error).split())
    logger.exception("semcorr space: unexpected error")
    return f"internal error ({type(error).__name__}): {' '.join(str(error).split())}"


def _need_images(source, target) -> str | None:
    if source is None or target is None:
        return "Upload a source and a target image, or pick an example pair."
    return None


def _table(result: dict) -> list[list]:
    return [
        [index + 1, round(sx, 1), round(sy, 1), round(tx, 1), round(ty, 1), round(score, 3)]
        for index, ((sx, sy), (tx, ty), score) in enumerate(
            zip(result["source_keypoints"], result["target_keypoints"], result["scores"])
        )
    ]


def match(source, target, points, mode, top_k, score_threshold, model):
    """The matches of the pair: ``(picture, table, JSON file, PNG file, status)``."""
    empty = (None, [], None, None)
    missing = _need_images(source, target)
    if missing:
        return (*empty, missing)
    mode = mode if mode in MODES else "points"
    try:
        top_k = int(top_k if top_k is not None else DEFAULT_TOP_K)
        score_threshold = float(score_threshold if score_threshold is not None else DEFAULT_THRESHOLD)
        if not 1 <= top_k <= engine.TOP_K_MAX:
            raise ValueError(f"top_k must be between 1 and {engine.TOP_K_MAX}, got {top_k}")
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be between 0 and 1, got {score_threshold}")
        session = engine.get_session(source, target, model)
        if mode == "points":
            clicked = engine.parse_points(points)
            if len(clicked) > engine.MAX_POINTS:
                raise ValueError(f"{len(clicked)} points; at most {engine.MAX_POINTS} per pair (press Undo or Clear points)")
            result = session.transfer(clicked)
            colors = [engine.point_color(i) for i in range(len(clicked))]
            labels = [(str(i + 1), f"{i + 1}: {score:.2f}") for i, score in enumerate(result["scores"])]
            picture = engine.draw_pair(session.source, session.target, result, colors=colors, labels=labels)
            status = (f"{len(clicked)} point(s) transferred." if clicked
                      else "Click points on the source image (or type them), then see them land on the target.")
            extra = {}
        else:
            result, applied_by = session.auto(top_k, score_threshold)
            picture = engine.draw_pair(session.source, session.target, result)
            status = f"{len(result['scores'])} mutual match(es) with score ≥ {score_threshold:.2f} (best {top_k} shown)."
            extra = {"top_k": top_k, "score_threshold": score_threshold, "score_threshold_applied_by": applied_by}
    except Exception as error:  # noqa: BLE001 -- every failure is shown in the page, never a stack trace
        return (*empty, f"⚠️ {_error_text(error)}")
    payload = {
        "model": session.matcher.model_id,
        "mode": mode,
        **extra,
        "coordinates": "pixels of the original images, origin top-left, pixel i spans [i, i+1)",
        "source_image_size": list(session.source.original_size),
        "target_image_size": list(session.target.original_size),
        **result,
    }
    json_path, png_path, view_path = engine.write_results(payload, picture)
    return view_path, _table(result), json_path, png_path, status


def heatmap(source, target, points, model):
    """``(picture, caption)``: the scores of the last point over the target (warms the pair's score volume)."""
    missing = _need_images(source, target)
    if missing:
        return None, missing
    try:
        session = engine.get_session(source, target, model)
        if not session.matcher.has_score_volume:
            return None, f"{type(session.matcher.model).__name__} gives no score volume, so there is no heat map for it."
        session.volume()  # computed once per pair: later clicks answer at once
        clicked = engine.parse_points(points)
        if not clicked:
            return None, "Click a point on the source: its match scores over the target appear here."
        result = session.transfer(clicked[-1:])
        index = len(clicked) - 1
        picture = engine.heat_map_picture(session, clicked[-1], result["target_keypoints"][0], engine.point_color(index))
        x, y = clicked[-1]
        return picture, (f"Match scores of point {index + 1} ({x:.1f}, {y:.1f}) over the target, scaled to their maximum "
                         f"(bright = high); its transfer (score {result['scores'][0]:.2f}) is ringed.")
    except Exception as error:  # noqa: BLE001
        return None, f"⚠️ {_error_text(error)}"


def dense(source, target, view, model):
    """``(picture, caption)``: the dense field of the pair, as a warp or in colour."""
    missing = _need_images(source, target)
    if missing:
        return None, missing
    try:
        session = engine.get_session(source, target, model)
        kind = "flow" if view == DENSE_VIEWS[1] else "warp"
        picture = engine.dense_picture(session, kind)
    except Exception as error:  # noqa: BLE001
        return None, f"⚠️ {_error_text(error)}"
    if kind == "flow":
        return picture, "Left: the source. Right: where each source pixel moves in the target (hue = direction, saturation = distance)."
    return picture, ("Left: the source. Right: the target resampled at each source pixel's match (`grid_src_to_trg`); "
                     "where the matches are right, the two look alike.")


def refresh(source, target, points, mode, top_k, score_threshold, model, shown_source):
    """A new image or model: the points are kept when the source is the one they were clicked on,
    then the pair is matched (and its dense field cached); ``(points, shown_source, *match outputs)``."""
    key = None
    if source is not None:
        try:
            key = engine.open_image(source).digest
        except ValueError:
            key = None
    if key is None or key != shown_source:
        points = ""
    return (points, key or "", *match(source, target, points, mode, top_k, score_threshold, model))


def pair_ready(source, target, model):
    """One line under the images: the pair's sizes, and that its matching is kept (clicks now answer at once)."""
    if source is None or target is None:
        return ""
    try:
        session = engine.get_session(source, target, model)
        session.dense()
    except Exception as error:  # noqa: BLE001
        return f"⚠️ {_error_text(error)}"
    (sw, sh), (tw, th) = session.source.original_size, session.target.original_size
    return (f"Pair ready: source {sw}×{sh}, target {tw}×{th}; its dense field is kept, so clicks answer at once "
            f"(matching it took {session.timings.get('dense', 0.0):.1f} s).")


def add_point(source, points, evt: gr.SelectData):
    """A click on the source image -> one more point (``evt.index`` is ``[x, y]`` in its pixels)."""
    if source is None or evt is None or evt.index is None:
        return gr.update(), gr.update()
    try:
        image = engine.open_image(source)
        clicked = engine.parse_points(points)
    except ValueError:
        return gr.update(), gr.update()
    x, y = (float(value) for value in evt.index[:2])
    width, height = image.original_size
    # The front end reports the nearest pixel corner of the click, in the pixels it displays (the upload).
    clicked.append([min(max(x, 0.0), width), min(max(y, 0.0), height)])
    return engine.format_points(clicked[-engine.MAX_POINTS:]), "points"


def add_point_from_view(source, target, points, evt: gr.SelectData):
    """A click on the left half of the matches picture -> one more source point."""
    if source is None or target is None or evt is None or evt.index is None:
        return gr.update(), gr.update()
    try:
        point = engine.view_to_source_point(engine.open_image(source), engine.open_image(target), evt.index)
        clicked = engine.parse_points(points)
    except ValueError:
        return gr.update(), gr.update()
    if point is None:
        return gr.update(), gr.update()
    clicked.append(point)
    return engine.format_points(clicked[-engine.MAX_POINTS:]), "points"


def undo_point(points):
    try:
        return engine.format_points(engine.parse_points(points)[:-1])
    except ValueError:
        return ""


_UNCHANGED = 7  # outputs of a click: points, mode and the five of match()


def click_source(source, target, points, mode, top_k, score_threshold, model, evt: gr.SelectData):
    """A click on the source image, answered in one event: ``(points, mode, *match outputs)``."""
    return _clicked(add_point(source, points, evt), mode, source, target, top_k, score_threshold, model)


def click_view(source, target, points, mode, top_k, score_threshold, model, evt: gr.SelectData):
    """A click on the left half of the matches picture, answered in one event (see :func:`click_source`)."""
    return _clicked(add_point_from_view(source, target, points, evt), mode, source, target, top_k, score_threshold, model)


def _clicked(added, mode, source, target, top_k, score_threshold, model):
    points, new_mode = added
    if new_mode != "points":  # nothing registered
        return (gr.update(),) * _UNCHANGED
    outputs = match(source, target, points, "points", top_k, score_threshold, model)
    return (points, gr.update() if mode == "points" else "points", *outputs)


def undo_and_match(source, target, points, mode, top_k, score_threshold, model):
    points = undo_point(points)
    return (points, *match(source, target, points, mode, top_k, score_threshold, model))


def clear_and_match(source, target, points, mode, top_k, score_threshold, model):
    return ("", *match(source, target, "", mode, top_k, score_threshold, model))


# -- the page -----------------------------------------------------------------------------------------
def build_demo() -> gr.Blocks:
    """The Space as a ``gr.Blocks`` (queue configured); serve it with :func:`launch`."""
    rows, labels = example_pairs()
    with gr.Blocks(title=TITLE, delete_cache=(1800, 3600)) as demo:
        gr.Markdown(INTRO)
        with gr.Row(equal_height=True):
            source = upload_image(label="Source: click to add points", sources=["upload", "clipboard"], height=360,
                                  elem_id="source-image")
            target = upload_image(label="Target", sources=["upload", "clipboard"], height=360, elem_id="target-image")
        pair_info = gr.Markdown(elem_id="pair-info")
        gr.Examples(rows, inputs=[source, target], example_labels=labels, label="Example pairs", cache_examples=False,
                    api_visibility="private")
        with gr.Row():
            points = gr.Textbox(label="Source points (x,y in source pixels; clicks add to it)", elem_id="points",
                                placeholder="click the source image, or type: 120,80; 40,200", scale=4)
            undo = gr.Button("Undo", scale=0, min_width=80)
            clear = gr.Button("Clear points", scale=0, min_width=120)
            run = gr.Button("Match", variant="primary", scale=0, min_width=120, elem_id="match-button")
        with gr.Row():
            mode = gr.Radio(list(MODES), value="points", label="Mode", info="points: your clicks; auto: best mutual matches")
            top_k = gr.Slider(1, engine.TOP_K_MAX, value=DEFAULT_TOP_K, step=1, label="auto: matches (k)")
            threshold = gr.Slider(0.0, 1.0, value=DEFAULT_THRESHOLD, step=0.05, label="auto: score threshold")
            model = gr.Dropdown([engine.DEFAULT_MODEL], value=engine.DEFAULT_MODEL, allow_custom_value=True, label="Model",
                                info="or type a model folder or Hub id (org/name)")
        status = gr.Markdown(elem_id="status")
        with gr.Tabs():
            with gr.Tab("Matches"):
                picture = gr.Image(label="Matches (click the left half to add points)", type="filepath", interactive=False,
                                   buttons=["download", "fullscreen"], elem_id="pair-view")
                table = gr.Dataframe(headers=TABLE_HEADERS, datatype="number", interactive=False, label="Matches (pixels of the original images)",
                                     elem_id="match-table")
                with gr.Row():
                    json_file = gr.File(label="Download JSON", interactive=False, elem_id="json-file")
                    png_file = gr.File(label="Download PNG", interactive=False, elem_id="png-file")
            with gr.Tab("Heat map"):
                heat_caption = gr.Markdown("Click a point on the source: its match scores over the target appear here.")
                heat = gr.Image(label="Scores of the last point over the target", type="pil", interactive=False,
                                buttons=["download", "fullscreen"], elem_id="heat-map")
            with gr.Tab("Dense field"):
                dense_view_kind = gr.Radio(list(DENSE_VIEWS), value=DENSE_VIEWS[0], label="Show")
                dense_caption = gr.Markdown()
                dense_picture = gr.Image(label="Dense field", type="pil", interactive=False,
                                         buttons=["download", "fullscreen"], elem_id="dense-view")

        match_inputs = [source, target, points, mode, top_k, threshold, model]
        match_outputs = [picture, table, json_file, png_file, status]
        # matching runs one at a time on a small CPU; the heat map (the pair's score volume, computed
        # once in the background) has a lane of its own, so a click never waits for it
        compute = dict(concurrency_id="matcher", concurrency_limit=1)
        heat_io = dict(fn=heatmap, inputs=[source, target, points, model], outputs=[heat, heat_caption],
                       concurrency_id="heatmap", concurrency_limit=1)
        dense_io = dict(fn=dense, inputs=[source, target, dense_view_kind, model], outputs=[dense_picture, dense_caption], **compute)
        private = dict(api_visibility="private")

        # the API: Match (public), then the heat map of its last point (public); the dense view (public)
        run.click(match, match_inputs, match_outputs, api_name="match", api_visibility="public", **compute).then(
            api_name="heatmap", api_visibility="public", **heat_io)
        dense_view_kind.change(api_name="dense", api_visibility="public", **dense_io)

        # the page: a new pair (or model) is matched at once and kept, so that clicks answer from the cache
        # which source image the points belong to: a hidden field, not a gr.State, so that it reaches the
        # server in the same snapshot as the points (an example changes both images: two events)
        shown_source = gr.Textbox(visible=False)
        gr.on([source.change, target.change, model.change], refresh, [*match_inputs, shown_source],
              [points, shown_source, *match_outputs], **private, **compute).then(
            **dense_io, **private).then(pair_ready, [source, target, model], pair_info, **private, **compute).then(
            **heat_io, **private)
        # a click while the previous one is answered runs after it, on the points it added
        for clicked in (source.select(click_source, match_inputs, [points, mode, *match_outputs], trigger_mode="always_last", queue=False,
                                      **private, **compute),
                        picture.select(click_view, match_inputs, [points, mode, *match_outputs], trigger_mode="always_last", queue=False,
                                       **private, **compute),
                        undo.click(undo_and_match, match_inputs, [points, *match_outputs], **private, **compute),
                        clear.click(clear_and_match, match_inputs, [points, *match_outputs], **private, **compute)):
            clicked.then(**heat_io, **private)
        for control in (mode.change, top_k.release, threshold.release, points.submit):
            control(match, match_inputs, match_outputs, **private, **compute)
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=2)
    return demo


def launch_settings() -> dict:
    """Keyword arguments of ``demo.launch`` a public Space needs (upload limit, no SSR, page style)."""
    return {
        "max_file_size": MAX_FILE_SIZE,
        "ssr_mode": False,
        "theme": gr.themes.Soft(),
        "footer_links": ["api", "gradio"],
    }


def launch(demo: gr.Blocks | None = None, host: str | None = None, port: int | None = None, **kwargs):
    """Serve the Space: :func:`build_demo` (unless given) with :func:`launch_settings`; blocks unless told not to."""
    demo = demo or build_demo()
    settings = {**launch_settings(), **kwargs}
    return demo.launch(server_name=host, server_port=port, **settings)


def warm_up(model: str | None = None) -> None:
    """Load the model before the first visitor (the embedded default is converted once into the semcorr cache)."""
    engine.get_matcher(model)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="app.py", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=None, help="address to serve on (default 127.0.0.1; $GRADIO_SERVER_NAME on Spaces)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860 or the next free one)")
    args = parser.parse_args(argv)
    serve(args.host, args.port)
    return 0


def serve(host: str | None = None, port: int | None = None) -> None:
    """Load the default model, then serve the Space until interrupted (``semcorr space``)."""
    print("semcorr space: loading the default model ...", file=sys.stderr)
    warm_up()
    launch(host=host, port=port)


if __name__ == "__main__":
    sys.exit(main())
