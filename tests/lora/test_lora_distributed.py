"""LoRA under DDP and FSDP2 (2 CPU processes, gloo) trains the same adapters as one process taking both halves of
every batch; the FSDP2 export path (a meta copy filled with the gathered state) writes the same adapter folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from sklearn.datasets import load_sample_image

from callbacks.export import copy_with_state
from llava_uhd.build import ModelSettings, build_model, fully_shard_model
from llava_uhd.lora import is_adapter, trains
from llava_uhd.parts import part_of

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "apply_to": ["llm", "vit_attention"]}
STEPS = 3


def build(base: str):
    torch.manual_seed(0)  # the adapters' random A matrices: the same in every process, as seed_everything makes them
    model = build_model(ModelSettings(init_from=base, llm="", lora=LORA))
    model.config.min_pixels, model.config.max_pixels = 40 * 40, 120 * 120
    for name, param in model.named_parameters():
        param.requires_grad_(trains(name, part_of(name), part_of(name) == "projector", model.lora.adapted_parts))
    return model


def samples(model) -> list[dict]:
    """Two captioned photo crops: rank r of 2 takes sample r, one process takes both."""
    out = []
    for name, caption in (("china.jpg", "a temple roof"), ("flower.jpg", "a pink flower")):
        pixels = model.preprocess(Image.fromarray(load_sample_image(name)).resize((100, 70)))
        prompt = model.build_prompt_ids("Describe the photo.", [tuple(pixels.shape[-2:])])
        answer = model.tokenizer(caption + "<|im_end|>", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + answer])
        labels = torch.full_like(ids, -100)
        labels[0, len(prompt):] = ids[0, len(prompt):]
        out.append({"input_ids": ids, "labels": labels, "pixel_values": [pixels]})
    return out


def train(model, step_batches, wrapped=None) -> None:
    runner = wrapped if wrapped is not None else model
    # SGD: the update is the averaged gradient itself (AdamW's normalisation would blow ~1e-7 reduction-order
    # differences of near-zero gradients up to ~1e-5)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(STEPS):
        losses = [runner(**batch).loss for batch in step_batches]
        (sum(losses) / len(losses)).backward()  # the mean over the samples a process holds
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def trained_state(model) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def worker(rank: int, base: str, port: str, out: str) -> None:
    """DDP, then FSDP2, in one process group (one start-up for both)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    states = {}
    for mode in ("ddp", "fsdp2"):
        model = build(base)
        batch = samples(model)[rank]
        if mode == "ddp":
            train(model, [batch], DistributedDataParallel(model))
        else:
            fully_shard_model(model, init_device_mesh("cpu", (2,)))
            train(model, [batch])
        states[mode] = trained_state(model)  # FSDP2: a collective, every rank
    if rank == 0:
        torch.save(states, out)
    # Both ranks finish every collective before either tears gloo down, and the worker leaves without interpreter
    # finalisation: gloo threads still holding tensors at exit can abort it (SIGABRT) after every check has passed.
    del model, states
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def test_ddp_and_fsdp2_train_the_adapters_one_process_does(lora_base, tmp_path):
    single = build(str(lora_base))
    train(single, samples(single))
    expected = trained_state(single)
    out = tmp_path / "states.pt"
    port = str(29500 + os.getpid() % 1000)
    mp.start_processes(worker, args=(str(lora_base), port, str(out)), nprocs=2, start_method="spawn")
    states = torch.load(out, weights_only=True)
    for mode, got in states.items():
        assert set(got) == set(expected) and any(is_adapter(n) for n in got)
        moved = [n for n in expected if ".lora_B." in n and expected[n].abs().max() > 1e-3]
        assert moved  # the adapters did train
        for name, value in expected.items():
            assert torch.allclose(got[name], value, rtol=0, atol=1e-6), (mode, name, (got[name] - value).abs().max())


def test_the_sharded_export_path_writes_the_same_adapter(lora_base, tmp_path):
    from safetensors.torch import load_file

    model = build(str(lora_base))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_()
    model.save_pretrained(tmp_path / "direct")
    copy_with_state(model, {k: v.clone() for k, v in model.state_dict().items()}).save_pretrained(tmp_path / "copy")
    for file in ("adapter_model.safetensors", "vision_adapter/adapter_model.safetensors", "parts.safetensors"):
        a, b = load_file(str(Path(tmp_path / "direct" / file))), load_file(str(Path(tmp_path / "copy" / file)))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
