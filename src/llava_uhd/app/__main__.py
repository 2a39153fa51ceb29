"""``python -m llava_uhd.app``: the web demo, on this machine only (127.0.0.1, no share link, no analytics).

::

    python -m llava_uhd.app --model DIR [--adapter DIR] [--api URL [--api-model NAME]] [--port 7860]

``--model``: any folder ``LlavaUHD.from_pretrained`` reads (``save_pretrained`` / convert output, a training
stage's export, the LLaVA-format release); ``--adapter``: a LoRA run's adapter folder (:mod:`llava_uhd.lora`),
put on it unmerged. The model runs in this process and answers; with ``--api URL`` an
OpenAI-compatible server answers instead and the folder's encoder still draws the encoder views (its LLM is
dropped after loading). A folder that does not load, a port in use or a bad option: one message on stderr and
exit status 1 (2 for a malformed command line), nothing served.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from pathlib import Path

from llava_uhd.errors import SettingsError, UsageError
from llava_uhd.vision.resize import POLICIES

from .uploads import Limits


def _bounded(kind: type, low: float, high: float | None = None):
    """argparse type: a number of ``kind`` in [low, high], with a message naming the expected range."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise argparse.ArgumentTypeError(f"expected a number {span}, got {text}")
        return value
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava_uhd.app", allow_abbrev=False,
                                description="Chat with a LLaVA-UHD v3 model about images, and see what its encoder "
                                            "keeps (token grid, WTC gate weights, token and FLOP costs).")
    p.add_argument("--model", required=True, help="model folder (save_pretrained / convert output, or the release)")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA run's adapter folder, put on --model unmerged")
    p.add_argument("--api", metavar="URL", help="answer with an OpenAI-compatible server at URL instead of in process")
    p.add_argument("--api-model", metavar="NAME", help="model name sent to --api (default: the first it lists)")
    p.add_argument("--port", type=_bounded(int, 1, 65535), default=7860, help="port on 127.0.0.1 (default 7860)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--resize-policy", choices=POLICIES, default=None, help="resize rule (default: the folder's)")
    p.add_argument("--max-new-tokens", type=_bounded(int, 1, 2048), default=256, help="default answer length cap")
    p.add_argument("--concurrency", type=_bounded(int, 1, 64), default=None,
                   help="answers computed at once (default: 1 in process, 4 with --api); others wait in the queue")
    p.add_argument("--queue-size", type=_bounded(int, 1, 10000), default=32,
                   help="requests that may wait; more are refused with a message (default 32)")
    p.add_argument("--max-file-mb", type=_bounded(float, 0.001), default=Limits.max_file_mb,
                   help=f"largest image file in MB (default {Limits.max_file_mb:g})")
    p.add_argument("--max-image-pixels", type=_bounded(int, 1), default=Limits.max_image_pixels,
                   help=f"largest image area a file may claim (default {Limits.max_image_pixels:,})")
    return p


def load_model(args: argparse.Namespace):
    """``--model`` (on the CPU) with ``--adapter``'s LoRA put on it unmerged, as ``LlavaUHD.from_pretrained(model,
    adapter=...)`` does it; done in two steps so that a failure names the folder at fault."""
    from llava_uhd.generate import load_model as load_base

    model = load_base(args.model, args.resize_policy)
    if args.adapter is None:
        return model
    from llava_uhd.lora import load_adapter

    try:
        load_adapter(model, args.adapter, key="--adapter")
    except SettingsError as err:  # its own checks: no folder, another base, a damaged file
        raise UsageError(str(err)) from None
    except (ValueError, OSError, KeyError, TypeError, RuntimeError) as err:
        raise UsageError(f"--adapter: cannot load {args.adapter}: {err}") from err
    if args.resize_policy is not None:  # the command line wins over the adapter's recorded policy
        model.config.resize_policy = args.resize_policy
    return model


def load(args: argparse.Namespace):
    """The model (on its device, eval) and the engine that answers; UsageError for a folder that does not load."""
    from llava_uhd.profiling import pick_device

    from .engines import EmbeddedEngine
    from .openai_client import OpenAIEngine, check_url

    url = None
    if args.api is not None:
        try:
            url = check_url(args.api)
        except ValueError as err:
            raise UsageError(str(err)) from None
    device, _ = pick_device(args.device)
    model = load_model(args)
    lock = threading.Lock()
    if url is None:
        return model.to(device).eval(), EmbeddedEngine(model, lock, name=f"in process ({device})"), lock
    model.llm = None  # the server answers; only the encoder and projector are used here
    model = model.to(device).eval()
    name = args.api_model or OpenAIEngine.served_model(url) or Path(args.model).name

    def count(upload) -> int:
        return model.num_image_tokens(*model.policy.target_size(upload.height, upload.width))

    return model, OpenAIEngine(url, name, count, name=f"OpenAI-compatible server at {url} (model {name})"), lock


def build(args: argparse.Namespace):
    """The Gradio app for these options, its model loaded."""
    model, engine, lock = load(args)
    from .ui import DemoApp  # gradio is imported once the model has loaded: a bad folder fails fast

    limits = Limits(max_file_mb=args.max_file_mb, max_image_pixels=args.max_image_pixels)
    concurrency = args.concurrency or (1 if args.api is None else 4)
    name = Path(args.model).name + (f" + adapter {Path(args.adapter).name}" if args.adapter else "")
    app = DemoApp(model, engine, lock, limits, name, args.max_new_tokens, concurrency,
                  args.queue_size)
    return app.build(), limits


LAUNCH = dict(server_name="127.0.0.1", share=False, enable_monitoring=False, ssr_mode=False, mcp_server=False,
              pwa=False, footer_links=["api"], show_error=False, state_session_capacity=256)
"""How the app is served: loopback only, no share link, no monitoring page, no MCP server; the 256 most recent
sessions keep their conversation (each holds its images' bytes)."""


def serve(args: argparse.Namespace, block: bool = True):
    """Load, build and launch; ``block=False`` returns the running app (``.close()`` stops it), as tests use it."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no usage reports, no version check
    start = time.perf_counter()
    demo, limits = build(args)
    print(f"model loaded in {time.perf_counter() - start:.1f} s; serving on http://127.0.0.1:{args.port}", flush=True)
    try:
        demo.launch(server_port=args.port, max_file_size=limits.max_file_bytes, prevent_thread_lock=not block,
                    **LAUNCH)
    except OSError as err:  # Gradio's word for a port that is taken
        raise UsageError(f"--port {args.port}: cannot serve there ({err})") from None
    return demo


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        serve(args)
    except SettingsError as err:  # UsageError (model folder, --api, --port) and --device's SettingsError
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)  # one line, whatever a library said
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
