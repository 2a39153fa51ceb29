"""WTCGateMonitor: scalars, histograms and the gate-map figure land in TensorBoard; the map is in row-major order."""

import pytest
import torch
from lightning.pytorch.callbacks import LambdaCallback
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callbacks import WTCGateMonitor
from llava_uhd.stages import PreAlignment
from llava_uhd.vision.pvc import WindowedTokenCompression, window_major_order

from .conftest import HIGH_LR


def read_events(log_dir) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    events.Reload()
    return events


@pytest.mark.parametrize("packed", [False, True])
def test_scalars_histograms_and_images_are_logged(packed, make_module, make_datamodule, fit, tmp_path):
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb", version=0)
    monitor = WTCGateMonitor(every_n_steps=1, image_every_n_steps=2)
    fit(make_module(PreAlignment, lr=HIGH_LR), [monitor], max_steps=3, logger=logger,
        datamodule=make_datamodule(packed=packed))
    events = read_events(logger.log_dir)
    tags = events.Tags()
    for layer in ("block2", "block4"):
        for name in ("entropy", "max_weight", "weight_deviation", "output_rel_dist"):
            values = events.Scalars(f"wtc/{layer}/{name}")
            assert [v.step for v in values] == [0, 1, 2], (layer, name)
        entropy = [v.value for v in events.Scalars(f"wtc/{layer}/entropy")]
        max_weight = [v.value for v in events.Scalars(f"wtc/{layer}/max_weight")]
        distance = [v.value for v in events.Scalars(f"wtc/{layer}/output_rel_dist")]
        # Step 0 is exact average pooling; after a few high-LR steps the gates have moved.
        assert entropy[0] == pytest.approx(1.0, abs=1e-6) and max_weight[0] == pytest.approx(0.25, abs=1e-6)
        assert distance[0] == pytest.approx(0.0, abs=1e-6) and entropy[-1] < 1.0 and distance[-1] > 0
        assert f"wtc/{layer}/max_weight_hist" in tags["histograms"]
    images = events.Images("wtc/gates")
    assert [im.step for im in images] == [0, 2]
    assert images[0].width > 100 and images[0].height > 50 and images[0].encoded_image_string[:4] == b"\x89PNG"


def test_other_steps_run_without_hooks(make_module, fit, tmp_path):
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb", version=0)
    monitor = WTCGateMonitor(every_n_steps=2, image_every_n_steps=0)
    module = make_module(PreAlignment)
    hooked = []

    def count(trainer, *args):  # forward hooks on the WTC modules, seen after each step's forward
        hooked.append(sum(len(m._forward_hooks) for m in module.model.encoder.wtc.values()))

    fit(module, [monitor, LambdaCallback(on_before_backward=count)], max_steps=3, logger=logger)
    assert hooked == [2, 0, 2]  # hooks only during logged steps 0 and 2
    assert all(len(m._forward_hooks) == 0 for m in module.model.encoder.wtc.values())
    assert [v.step for v in read_events(logger.log_dir).Scalars("wtc/block2/entropy")] == [0, 2]


def test_weight_map_restores_row_major_order():
    """Gate weights that equal each token's row-major index must come back as the index grid."""
    h, w, levels = 8, 12, 2
    wtc = WindowedTokenCompression(4)
    wtc.gate_weights = lambda windows: windows[..., :1].expand_as(windows)  # weight = channel 0 of the token
    row_major = torch.arange(h * w, dtype=torch.float32)
    tokens = row_major[window_major_order(h, w, levels)].view(-1, 1).expand(-1, 4)
    geometry = {"grids": [(h, w)], "levels": levels}
    for x in (tokens[None], torch.cat([tokens, torch.zeros(16, 4)])):  # dense [1, n, C]; packed, image 0 first
        grid = WTCGateMonitor._weight_map(wtc, x, 0, geometry)
        assert torch.equal(grid, row_major.view(h, w))
    # Level 1 of the same image: a 4x6 grid, window-major with one level left.
    coarse = torch.arange(24, dtype=torch.float32)
    x = coarse[window_major_order(4, 6, 1)].view(-1, 1).expand(-1, 4)
    grid = WTCGateMonitor._weight_map(wtc, x, 1, {"grids": [(h, w), (4, 6)], "levels": levels})
    assert torch.equal(grid, coarse.view(4, 6))


def test_non_adaptive_pooling_is_skipped(make_module, fit, tmp_path):
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb", version=0)
    module = make_module(PreAlignment, wtc_pooling="pixel_unshuffle")
    fit(module, [WTCGateMonitor(every_n_steps=1, image_every_n_steps=1)], max_steps=1, logger=logger)
    assert not any(t.startswith("wtc/") for t in read_events(logger.log_dir).Tags()["scalars"])
