"""Writing the trained model as a ``LlavaUHD.save_pretrained`` folder, the unit passed between stages."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import lightning as L
import torch
from torch import nn

from llava_uhd.llm import llm_config_dict
from llava_uhd.lora import attach_like
from llava_uhd.mllm import LlavaUHD

log = logging.getLogger(__name__)


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter is an FSDP2 / tensor-parallel ``DTensor``."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def copy_with_state(model: LlavaUHD, state: dict[str, torch.Tensor]) -> LlavaUHD:
    """A CPU copy of ``model`` holding ``state`` (a full state dict), built on the meta device so the weights
    are never allocated twice; non-persistent buffers (rotary tables, separator ids) are copied over."""
    config = dataclasses.replace(model.config, llm=llm_config_dict(model.llm))
    with torch.device("meta"):
        copy = LlavaUHD(config, tokenizer=model.tokenizer)
        if model.lora is not None:  # the same adapter layers, so that the state's names fit
            attach_like(copy, model)
    copy.load_state_dict(state, assign=True, strict=True)
    copy.llm.tie_weights()  # assign=True replaced tied parameters by separate ones: share them again
    sources = dict(model.named_buffers())
    for name, _ in list(copy.named_buffers()):
        if name not in state:
            module_name, _, attr = name.rpartition(".")
            owner = copy.get_submodule(module_name) if module_name else copy
            owner._buffers[attr] = sources[name].detach().cpu().clone()
    return copy


class ExportModel(L.Callback):
    """At the end of fit, write ``pl_module.model.save_pretrained(<trainer.log_dir>/<dirname>)`` on rank 0,
    for the next stage's ``--model.init_from``. Under FSDP2 the full state dict is first gathered to CPU on
    every rank (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``). The path is logged and kept
    on ``self.path``.
    """

    def __init__(self, dirname: str = "export") -> None:
        """
        Args:
            dirname: folder name under ``trainer.log_dir`` (an absolute path is used as is).
        """
        super().__init__()
        self.dirname = dirname
        self.path: Path | None = None

    def export_dir(self, trainer: L.Trainer) -> Path:
        root = trainer.log_dir or trainer.default_root_dir
        return Path(root) / self.dirname

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model: LlavaUHD = pl_module.model
        path = trainer.strategy.broadcast(str(self.export_dir(trainer)), src=0)  # rank 0 knows the log version
        if is_sharded(model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = get_model_state_dict(model, options=options)  # a collective: every rank
            state = {k: v.clone() for k, v in state.items()}  # gathered tensors may share storage: safetensors refuses
            if trainer.is_global_zero:
                copy_with_state(model, state).save_pretrained(path)
        elif trainer.is_global_zero:
            model.save_pretrained(path)
        trainer.strategy.barrier("export_model")
        self.path = Path(path)
        if trainer.is_global_zero and model.lora is not None:
            log.info("exported the adapter to %s (load it with LlavaUHD.from_pretrained(base, adapter=...); merge it "
                     "with python -m llava_uhd.convert merge --base %s --adapter %s --out DIR)", path, model.lora.base,
                     path)
        elif trainer.is_global_zero:
            log.info("exported the model to %s (start the next stage with --model.init_from %s)", path, path)
