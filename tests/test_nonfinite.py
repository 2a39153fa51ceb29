"""A non-finite loss is skipped and counted and never reaches the weights (``UHDModule.training_step``).

The run is :class:`tests.helpers.probes.ProbePretrain` (stage 2 on small images that injects a NaN loss at chosen
steps and records what each step did); the distributed and resume tests run it too. The one-rank-NaN case under
2-process DDP is in ``test_distributed.py`` (it shares that file's DDP launch).
"""

from __future__ import annotations

import pytest
import torch

from .helpers.app import ROOT, app_args


@pytest.mark.slow
def test_nan_steps_are_skipped_counted_and_leave_weights_untouched(app_data, tmp_path, monkeypatch):
    """Single process, in-process: NaN at steps 1 and 3 of 5 -> 2 skips, 3 AdamW steps, weights unchanged."""
    data = app_data
    monkeypatch.syspath_prepend(str(ROOT))  # `tests.helpers.probes` importable for the CLI
    monkeypatch.syspath_prepend(str(ROOT / "src"))
    from main import main

    args = app_args(data, tmp_path, 5, 100, "--model.init_args.nan_steps", "[1, 3]")
    cli = main(args)
    module = cli.trainer.lightning_module
    record = module.record
    assert cli.trainer.global_step == 5
    assert module.nonfinite_steps == 2
    assert float(cli.trainer.callback_metrics["train/nonfinite_skipped"]) == 2.0
    # the weights do not move on the NaN steps, and do on every other one
    assert record["unchanged"] == {"0": False, "1": True, "2": False, "3": True, "4": False}
    assert record["adam_steps"] == 3  # the optimizer never stepped on the skipped batches
    assert record["grads_seen"] == 3  # ...and no gradient reached it
    assert record["frozen_grads"] == 0  # stage 2: the LLM is frozen and gets none
    assert all(torch.isfinite(p).all() for p in module.parameters())
