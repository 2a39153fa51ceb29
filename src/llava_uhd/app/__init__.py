"""The web demo: chat with a LLaVA-UHD v3 model about images and see what its encoder keeps.

``python -m llava_uhd.app --model DIR`` (``make app MODEL=DIR``) serves a Gradio page on 127.0.0.1: a streaming,
multi-turn chat (greedy or beam search, with the request's token count, encoder ms, prefill ms and TTFT) and, for
the uploaded image, the final token grid, the WTC gate weights as heatmaps and the tokens and encoder FLOPs the
image would cost under GNE, SBE and ViT-UHD. Both are named API endpoints (``/chat``, ``/encoder_view``) for
``gradio_client``. See docs/app.md.

Modules: :mod:`.uploads` (input checks), :mod:`.engines` (conversation, in-process answers),
:mod:`.openai_client` (answers from an OpenAI-compatible server), :mod:`.encoder_view` (what the
encoder kept and what it costs), :mod:`.ui` (the page and its API), :mod:`.__main__` (the command).
"""
