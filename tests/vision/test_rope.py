"""MoonViT's 2-D RoPE: the interleaved layout by hand, relative positions, and RoPE inside ViT-UHD (dense ==
packed == per-image, window-major == a plain row-major reference, gradient checkpointing)."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import llava_uhd.vision  # noqa: F401  (registers the models)
from llava_uhd.vision import ViTUHDConfig, window_major_order
from llava_uhd.vision.rope import apply_rope, rope_sin_cos, rope_table


def test_interleaved_layout_by_hand_head_dim_8_grid_2x3():
    # head_dim 8 -> 2 frequencies: f0 = 10000^0 = 1, f1 = 10000^(-4/8) = 0.01.
    # Complex slot 0 (channels 0,1) turns by col*f0, slot 1 (2,3) by row*f0, slot 2 (4,5) by col*f1, slot 3 (6,7)
    # by row*f1.
    torch.manual_seed(0)
    x = torch.randn(6, 8, dtype=torch.float64)
    expected = torch.empty_like(x)
    for n in range(6):
        row, col = divmod(n, 3)  # row-major 2x3 grid
        angles = [col * 1.0, row * 1.0, col * 0.01, row * 0.01]
        for slot, angle in enumerate(angles):
            a, b = x[n, 2 * slot].item(), x[n, 2 * slot + 1].item()
            expected[n, 2 * slot] = a * math.cos(angle) - b * math.sin(angle)
            expected[n, 2 * slot + 1] = a * math.sin(angle) + b * math.cos(angle)
    sin, cos = rope_table(2, 3, levels=0, head_dim=8)
    out = apply_rope(x.float(), sin, cos)
    torch.testing.assert_close(out, expected.float(), atol=1e-6, rtol=1e-6)
    assert out.dtype == torch.float32
    # token (0, 0) is not turned at all; token (1, 2) is
    torch.testing.assert_close(out[0], x[0].float())
    assert not torch.allclose(out[5], x[5].float())


def test_rotation_runs_in_fp32_and_casts_back():
    sin, cos = rope_table(4, 4, 0, 16)
    x = torch.randn(16, 16).to(torch.bfloat16)
    out = apply_rope(x, sin, cos)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), apply_rope(x.float(), sin, cos), atol=1e-2, rtol=1e-2)


def test_query_key_product_depends_only_on_the_position_difference():
    torch.manual_seed(1)
    head_dim = 16
    q, k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)

    def score(pq: tuple[int, int], pk: tuple[int, int]) -> float:
        rows, cols = torch.tensor([pq[0], pk[0]]), torch.tensor([pq[1], pk[1]])
        sin, cos = rope_sin_cos(rows, cols, head_dim)
        rq = apply_rope(q, sin[0].double(), cos[0].double())
        rk = apply_rope(k, sin[1].double(), cos[1].double())
        return float(rq @ rk)

    base = score((2, 5), (7, 1))
    for dr, dc in [(0, 0), (3, 0), (0, -4), (11, 9), (-2, 6)]:
        assert score((2 + dr, 5 + dc), (7 + dr, 1 + dc)) == pytest.approx(base, abs=1e-5)  # fp32 tables
    # moving one of the two (a different difference) changes the product, along rows and along columns
    assert abs(score((3, 5), (7, 1)) - base) > 1e-3
    assert abs(score((2, 6), (7, 1)) - base) > 1e-3


def test_table_follows_the_window_major_token_order():
    plain = rope_table(4, 8, levels=0, head_dim=8)
    windowed = rope_table(4, 8, levels=2, head_dim=8)
    order = window_major_order(4, 8, 2)
    for a, b in zip(windowed, plain):
        torch.testing.assert_close(a, b[order])


def test_head_dim_must_be_divisible_by_4():
    with pytest.raises(ValueError, match="head_dim divisible by 4"):
        ViTUHDConfig(embed_dim=60, num_heads=10, depth=2, wtc_layers=(), rope="2d")
    ViTUHDConfig(embed_dim=60, num_heads=10, depth=2, wtc_layers=())  # fine without RoPE
    with pytest.raises(ValueError, match="rope"):
        ViTUHDConfig(embed_dim=64, num_heads=2, depth=2, wtc_layers=(), rope="1d")


def moonvit_tiny(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_uhd_tiny_patch10_moonvit", **overrides).eval()
    with torch.no_grad():  # live gates and non-trivial norms so every part shows in the output
        for wtc in model.wtc.values():
            wtc.fc2.weight.normal_(0, 0.5)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if "attn.qkv.weight" in name:
                p.mul_(8.0)  # peaked attention, so that positions (and RoPE) matter
    return model


def test_dense_packed_and_per_image_agree_with_rope():
    model = moonvit_tiny()
    assert model.cfg.rope == "2d"
    # 80x160 and 160x80 have the same token count but transposed grids: one SDPA call, two different tables
    sizes = [(80, 160), (160, 80), (40, 40), (80, 160)]
    images = [torch.randn(3, h, w) for h, w in sizes]
    with torch.no_grad():
        packed = model(images).tokens
        single = [model(img[None]).tokens[0] for img in images]
        dense = model(torch.stack([images[0], images[3]])).tokens
    torch.testing.assert_close(packed, torch.cat(single), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense, torch.stack([single[0], single[3]]), atol=1e-5, rtol=1e-5)
    # RoPE is really applied: the same weights without it give other tokens
    plain = timm.create_model("vit_uhd_tiny_patch10_moonvit", rope="none").eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (plain(images[0][None]).tokens[0] - single[0]).abs().max() > 1e-2


def reference_forward(model: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Row-major tokens all the way: explicit attention with RoPE by row-major (row, col), explicit 2x2 windows."""
    cfg = model.cfg
    g, c = cfg.pos_embed_grid, cfg.embed_dim
    feats = model.patch_embed.proj(image[None])[0]  # C, h, w
    h, w = feats.shape[-2:]
    table = model.pos_embed.reshape(1, g, g, c).permute(0, 3, 1, 2)
    pos = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False, antialias=False)[0]
    x = (feats + pos).flatten(1).T  # h*w, C in row-major order
    heads, hd = cfg.num_heads, cfg.head_dim
    for index, block in enumerate(model.blocks, start=1):
        rows = torch.arange(h).repeat_interleave(w)
        cols = torch.arange(w).repeat(h)
        sin, cos = rope_sin_cos(rows, cols, hd)
        qkv = block.attn.qkv(block.norm1(x)).view(h * w, 3, heads, hd).permute(1, 2, 0, 3)  # 3, heads, n, hd
        q, k, v = apply_rope(qkv[0], sin, cos), apply_rope(qkv[1], sin, cos), qkv[2]
        weights = (q @ k.transpose(-1, -2) / math.sqrt(hd)).softmax(-1)
        x = x + block.attn.proj((weights @ v).transpose(0, 1).reshape(h * w, c))
        x = x + block.mlp(block.norm2(x))
        if str(index) in model.wtc:
            wtc = model.wtc[str(index)]
            grid = x.view(h, w, c)
            win = torch.stack([grid[0::2, 0::2], grid[0::2, 1::2], grid[1::2, 0::2], grid[1::2, 1::2]], dim=2)
            mean = win.mean(dim=2, keepdim=True).expand_as(win)
            gate = wtc.fc2(F.gelu(wtc.fc1(torch.cat([win, mean], dim=-1)))).softmax(dim=2)
            h, w = h // 2, w // 2
            x = (gate * win).sum(dim=2).reshape(h * w, c)
    return model.norm(x)


def test_window_major_encoder_equals_a_row_major_reference():
    model = moonvit_tiny()
    image = torch.randn(3, 120, 160)  # patch grid 12x16 -> 6x8 -> 3x4
    with torch.no_grad():
        expected = reference_forward(model, image)
        out = model(image[None]).tokens[0]
        packed = model([image, torch.randn(3, 40, 80)]).tokens[:12]
    assert out.shape == expected.shape == (12, 64)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("packed", [True, False])
def test_gradient_checkpointing_matches_plain_backward_with_rope(packed):
    model = moonvit_tiny().train()
    images = [torch.randn(3, 80, 80), torch.randn(3, 40, 80)] if packed else torch.randn(2, 3, 80, 80)
    model(images).tokens.square().mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert plain["blocks.0.attn.qkv.weight"].abs().sum() > 0
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(images).tokens.square().mean().backward()
    for name, grad in plain.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, atol=1e-6, rtol=1e-5)


def test_rope_tables_are_cached_per_grid_and_level():
    model = moonvit_tiny()
    with torch.no_grad():
        model(torch.randn(1, 3, 80, 80))
        model([torch.randn(3, 80, 80), torch.randn(3, 40, 120)])
    keys = sorted((grid, levels) for grid, levels, _ in model.rope_tables.cache)
    assert keys == [((1, 3), 0), ((2, 2), 0), ((2, 6), 1), ((4, 4), 1), ((4, 12), 2), ((8, 8), 2)]


FSDP2_SCRIPT = r'''
import copy, os, socket, sys
import torch, torch.distributed as dist, torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard

def worker(rank, port, root):
    sys.path.insert(0, root)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    from tests.vision.test_rope import moonvit_tiny
    ref = moonvit_tiny().train()
    model = copy.deepcopy(ref)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    model.set_grad_checkpointing(True)
    torch.manual_seed(5)  # the same images on both ranks: averaged gradients equal one rank's
    images = [torch.randn(3, 80, 80), torch.randn(3, 40, 120)]
    ref(images).tokens.square().mean().backward()
    out = model(images).tokens
    out.square().mean().backward()
    assert model.blocks[0].attn.qkv.weight.to_local().shape[0] == 192 // 2  # really sharded
    with torch.no_grad():
        torch.testing.assert_close(out, ref(images).tokens, atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.full_tensor(), ref.get_parameter(name).grad, atol=1e-6, rtol=1e-5)
    # Both ranks finish every collective before either tears gloo down, and the worker leaves without
    # interpreter finalisation: gloo threads still holding tensors at exit can abort the process
    # ("terminate called without an active exception") after every check above has passed.
    del model, ref, out
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)

if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, sys.argv[1]), nprocs=2)
    print("fsdp2 ok")
'''


@pytest.mark.distributed
@pytest.mark.slow
def test_rope_under_fsdp2_with_checkpointing_matches_unsharded(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    script = tmp_path / "fsdp2_rope.py"
    script.write_text(FSDP2_SCRIPT)
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, str(script), str(root)], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0 and "fsdp2 ok" in run.stdout, run.stderr[-3000:]
