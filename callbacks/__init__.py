"""Training callbacks: WTC zero-init check, WTC gate monitor, stage freezing, throughput, export, predictions,
skipped-sample report."""

from .data_health import DataSkipReport
from .export import ExportModel
from .freeze import StageFreeze
from .gate_monitor import WTCGateMonitor
from .prediction_writer import JSONLPredictionWriter
from .throughput import ThroughputLogger
from .zero_init import ZeroInitCheck, ZeroInitError

__all__ = [
    "DataSkipReport",
    "ExportModel",
    "JSONLPredictionWriter",
    "StageFreeze",
    "ThroughputLogger",
    "WTCGateMonitor",
    "ZeroInitCheck",
    "ZeroInitError",
]
