"""Throughput of the served model against the in-process ``LlavaUHD.generate`` loop (a benchmark, not a test).

``python -m llava_uhd.serve.bench [--model DIR] [--out docs/serve]`` (main environment; the server runs from
.venv-serve): the same 64 requests (real photos at several sizes, three prompts, greedy, ``--max-tokens`` new
tokens) go through ``POST /v1/chat/completions`` (streamed, for the time to first token) from 1, 4 and 16
concurrent clients, and through ``generate`` one after another in this process. Writes ``serve_bench.md`` (table)
and ``serve_bench.png``. Without ``--model`` a tiny random model is written first (CPU-sized); the figures say
nothing about a GPU.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from llava_uhd.serve.client import Reply, Server, chat, chat_body, data_url

PROMPTS = ["Describe the image.", "What is in the picture?", "Answer with a single word or phrase."]


def photos() -> list[bytes]:
    from sklearn.datasets import load_sample_image

    china, flower = (Image.fromarray(load_sample_image(n)) for n in ("china.jpg", "flower.jpg"))
    out = []
    for p in (china, flower.crop((100, 50, 400, 250)), china.crop((0, 0, 150, 420)), flower.crop((200, 100, 640, 300))):
        buffer = io.BytesIO()
        p.save(buffer, "JPEG", quality=95)
        out.append(buffer.getvalue())
    return out


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))] if values else 0.0


def summary(name: str, concurrency: int, wall: float, tokens: int, ttfts: list[float], n: int) -> dict:
    return {"engine": name, "concurrency": concurrency, "requests": n, "wall_s": wall, "req_per_s": n / wall,
            "out_tok_per_s": tokens / wall, "ttft_p50_ms": percentile(ttfts, 50) * 1e3,
            "ttft_p90_ms": percentile(ttfts, 90) * 1e3, "ttft_p99_ms": percentile(ttfts, 99) * 1e3}


def run_served(server: Server, jobs: list[tuple[bytes, str]], concurrency: int, max_tokens: int) -> dict:
    def one(job: tuple[bytes, str]) -> Reply:
        return chat(server.base_url, chat_body(server.model, [data_url(job[0])], job[1], max_tokens, stream=True))

    chat(server.base_url, chat_body(server.model, [data_url(jobs[0][0])], "warm up", 2))
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        replies = list(pool.map(one, jobs))
    wall = time.perf_counter() - start
    failed = [r for r in replies if r.status != 200]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, e.g. {failed[0].status} {failed[0].error}")
    return summary("vLLM server", concurrency, wall, sum(len(r.token_ids) for r in replies),
                   [r.ttft_s for r in replies], len(jobs))


def run_in_process(folder: Path, jobs: list[tuple[bytes, str]], max_tokens: int) -> dict:
    import torch

    from llava_uhd.mllm import LlavaUHD

    model = LlavaUHD.from_pretrained(folder).eval()
    model.generate(Image.open(io.BytesIO(jobs[0][0])), "warm up", max_new_tokens=2)
    tokens, ttfts = 0, []
    start = time.perf_counter()
    with torch.no_grad():
        for photo, prompt in jobs:
            result = model.generate(Image.open(io.BytesIO(photo)), prompt, max_new_tokens=max_tokens)
            tokens += len(result.token_ids)
            ttfts.append(result.ttft_ms / 1e3)
    return summary("in-process generate", 1, time.perf_counter() - start, tokens, ttfts, len(jobs))


def write_report(rows: list[dict], out: Path, model: str, max_tokens: int, start_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    head = ("| engine | clients | requests | req/s | output tok/s | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = [f"| {r['engine']} | {r['concurrency']} | {r['requests']} | {r['req_per_s']:.2f} | "
             f"{r['out_tok_per_s']:.1f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p90_ms']:.0f} | {r['ttft_p99_ms']:.0f} |"
             for r in rows]
    text = (f"# Serving throughput ({model})\n\n"
            f"Machine: {platform.machine()}, {platform.processor() or 'CPU'}, no GPU. Greedy, up to {max_tokens} new "
            f"tokens per request; the same 64 requests (4 real photos at several sizes x 3 prompts) each time. "
            f"Server start: {start_s:.0f} s. The in-process loop answers one request after another (its TTFT: "
            "encoder + splice + prefill, from `GenerationResult`); the server's is measured by the client over "
            "HTTP with streaming. CPU figures of a tiny random model: no GPU result is claimed.\n\n"
            + head + "\n".join(lines) + "\n\n![throughput](serve_bench.png)\n")
    (out / "serve_bench.md").write_text(text)
    (out / "serve_bench.json").write_text(json.dumps(rows, indent=2))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    labels = [f"{'server' if r['engine'].startswith('vLLM') else 'generate'}\nx{r['concurrency']}" for r in rows]
    colors = ["tab:blue" if r["engine"].startswith("vLLM") else "tab:gray" for r in rows]
    for ax, key, title in zip(axes, ("req_per_s", "out_tok_per_s", "ttft_p50_ms"),
                              ("requests / s", "output tokens / s", "TTFT p50 (ms)")):
        ax.bar(labels, [r[key] for r in rows], color=colors)
        ax.set_title(title)
    fig.suptitle(f"vLLM server vs in-process generate, 64 requests ({model}, CPU)")
    fig.tight_layout()
    fig.savefig(out / "serve_bench.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_uhd.serve.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="model folder (default: a tiny random one, written first)")
    parser.add_argument("--out", type=Path, default=Path("docs/serve"), help="where the table and PNG go")
    parser.add_argument("--max-tokens", type=int, default=16, help="new tokens per request (default 16)")
    parser.add_argument("--requests", type=int, default=64, help="requests per run (default 64)")
    args = parser.parse_args(argv)
    if args.max_tokens <= 0 or args.requests <= 0:
        print("error: --max-tokens and --requests must be positive", file=sys.stderr)
        return 2
    if args.model is not None and not args.model.is_dir():
        print(f"error: no model folder at {args.model}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if folder is None:
            from llava_uhd.serve.tiny import write_tiny_export

            folder = write_tiny_export(Path(tmp) / "tiny-llava-uhd", Path(tmp) / "tokenizer")
        pictures = photos()
        jobs = [(pictures[i % len(pictures)], PROMPTS[i % len(PROMPTS)]) for i in range(args.requests)]
        rows = [run_in_process(folder, jobs, args.max_tokens)]
        try:
            with Server(folder, "--max-model-len", "2048", log=Path(tmp) / "server.log") as server:
                for concurrency in (1, 4, 16):
                    rows.append(run_served(server, jobs, concurrency, args.max_tokens))
                start_s = server.start_s
        except (OSError, RuntimeError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    write_report(rows, args.out, folder.name, args.max_tokens, start_s)
    for r in rows:
        print(f"{r['engine']:>20} x{r['concurrency']:<2} {r['req_per_s']:6.2f} req/s {r['out_tok_per_s']:7.1f} tok/s "
              f"TTFT p50 {r['ttft_p50_ms']:.0f} ms")
    print(f"wrote {args.out / 'serve_bench.md'} and {args.out / 'serve_bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
