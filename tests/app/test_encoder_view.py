"""The encoder view's numbers: the heatmap's data is the encoder's own gate output, average pooling shows flat, the
token counts and FLOPs are the benchmarks'. No server: the view's functions are called directly."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

import callbacks.gate_monitor
from llava_uhd.app import encoder_view
from llava_uhd.app.uploads import Limits, read_upload
from llava_uhd.tokens import ImageTokenCounter
from llava_uhd.vision import gate_maps
from llava_uhd.vision.report import encoder_flops

from .conftest import make_model


def window_image(path, height: int = 240, width: int = 360, seed: int = 0):
    """A picture whose every 10 px patch has its own colour, so no two 2x2 windows of tokens look alike."""
    rng = np.random.default_rng(seed)
    patches = rng.integers(0, 256, size=(height // 10, width // 10, 3), dtype=np.uint8)
    Image.fromarray(patches.repeat(10, axis=0).repeat(10, axis=1)).save(path)
    return path


def gate_outputs(model, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Each WTC's gate weights [windows, 4] (channel mean), read straight off the module during a forward."""
    outputs = []

    def hook(module, args, output):
        outputs.append(module.gate_weights(module.windows(args[0][0])).mean(dim=-1))

    handles = [wtc.register_forward_hook(hook) for wtc in model.encoder.wtc.values()]
    with torch.no_grad():
        model.run_encoder(pixels[None])
    for handle in handles:
        handle.remove()
    return outputs


def assert_map_is_gate_output(drawn: torch.Tensor, windows: torch.Tensor) -> None:
    """Every 2x2 block of the drawn map holds one window's four weights in reading order (top-left, top-right,
    bottom-left, bottom-right), and every window appears once: no shared ordering code trusted."""
    h, w = drawn.shape
    blocks = drawn.view(h // 2, 2, w // 2, 2).permute(0, 2, 1, 3).reshape(-1, 4)
    assert blocks.shape == windows.shape
    assert torch.allclose(blocks.sum(-1), torch.ones(len(blocks)), atol=1e-5)  # each block is a softmax window
    distance = torch.cdist(blocks.double(), windows.double())
    match = distance.argmin(dim=1)
    assert sorted(match.tolist()) == list(range(len(windows)))  # a bijection
    assert torch.allclose(blocks, windows[match], atol=1e-6, rtol=0)
    assert float((windows - 0.25).abs().max()) > 0.05  # the windows really differ from average pooling


def test_heatmap_data_is_the_encoders_gate_output(demo_model_dir, tmp_path, monkeypatch):
    model = make_model(demo_model_dir)  # the gates drawn at random, as in the app's model folder
    upload = read_upload(window_image(tmp_path / "windows.png"), Limits())
    view = encoder_view.inspect_image(model, upload, threading.Lock())
    expected = gate_outputs(model, model.preprocess(Image.open(tmp_path / "windows.png")))
    assert [s.label for s in view.stages] == ["block2", "block4"]
    assert [s.grid for s in view.stages] == [(24, 36), (12, 18)] and view.token_grid == (6, 9) and view.tokens == 54
    for stage, windows in zip(view.stages, expected):
        assert not stage.uniform and "content-adaptive" in stage.note
        assert_map_is_gate_output(stage.weights, windows)
        assert np.allclose(np.array(stage.as_dict()["weights"]), stage.weights.numpy())  # what the API sends

    drawn = []  # the picture: the colour data of its heatmap panels is the same numbers, unscaled
    monkeypatch.setattr(encoder_view, "draw_gate_maps",
                        lambda *a, **k: drawn.append(gate_maps.draw_gate_maps(*a, **k)) or drawn[-1])
    picture = encoder_view.gate_picture(view)
    assert picture.width > 600 and picture.height > 150
    layers = [ax.images[-1].get_array() for ax in drawn[0].axes if len(ax.images) == 2]
    assert len(layers) == 2
    for array, windows in zip(layers, expected):
        assert_map_is_gate_output(torch.from_numpy(np.asarray(array)), windows)


def test_average_pooling_shows_flat_and_says_so(demo_model_dir, tmp_path):
    model = make_model(demo_model_dir)
    for wtc in model.encoder.wtc.values():
        wtc.reset_parameters()  # the content-adaptive gate's initialisation: exact average pooling
    upload = read_upload(window_image(tmp_path / "windows.png"), Limits())
    view = encoder_view.inspect_image(model, upload, threading.Lock())
    for stage in view.stages:
        assert stage.uniform and torch.allclose(stage.weights, torch.full(stage.grid, 0.25), atol=1e-6)
        assert "average pooling" in stage.note
    assert "average pooling (all 1/4)" in "".join(t.get_text() for t in _titles(view))
    assert "every weight is 1/4" in encoder_view.cost_table(view)


def _titles(view):
    figure = gate_maps.draw_gate_maps(view.pixels, {s.label: s.weights for s in view.stages},
                                      titles={s.label: f"{s.label}: average pooling (all 1/4)" for s in view.stages})
    return [ax.title for ax in figure.axes]


def test_app_and_training_monitor_draw_with_one_function():
    assert encoder_view.draw_gate_maps is gate_maps.draw_gate_maps is callbacks.gate_monitor.draw_gate_maps
    assert encoder_view.gate_weight_map is gate_maps.gate_weight_map is callbacks.gate_monitor.gate_weight_map


@pytest.mark.parametrize("size", [(427, 640)])
def test_costs_are_the_benchmarks_counts(demo_model_dir, size):
    rows = {row.label: row for row in encoder_view.comparison(*size)}
    uhd, gne = rows["ViT-UHD (mlp, 16x)"], rows["GNE (patch 14, merger)"]
    assert uhd.tokens == ImageTokenCounter(40)(*uhd.encoded) and gne.tokens == ImageTokenCounter(28)(*gne.encoded)
    assert rows["ViT-UHD (merger, 64x)"].tokens * 4 == uhd.tokens and uhd.flops < gne.flops
    model = make_model(demo_model_dir)
    own = encoder_view.own_cost(model, (240, 360), "this model")
    assert own.tokens == 54
    assert own.flops == encoder_flops("vit_uhd_tiny_patch10_siglip", 240, 360, **model.encoder.cfg.to_dict())
