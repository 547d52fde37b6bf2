"""Optimizer groups, lr scaling, schedule (vs Hugging Face), LoRA and the distributed helpers."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from vlp.collectives import all_reduce_mean, barrier, is_main
from vlp.config.schema import OptimConfig, ScheduleConfig
from vlp.errors import ConfigError, UserError
from vlp.layers import TransformerBlock
from vlp.train.distributed import DistInfo, init_distributed, wrap_model
from vlp.train.lora import LoRALinear, apply_lora, merge_lora
from vlp.train.optim import build_optimizer, param_groups, scaled_lr
from vlp.train.schedule import build_scheduler, lr_at, lr_factor


class TinyModel(nn.Module):
    """Every kind of parameter the decay rule distinguishes, plus a frozen layer and a tied head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, 8, kernel_size=2)
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 8))
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.word_embeddings = nn.Embedding(10, 8)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.text_proj = nn.Linear(8, 4, bias=False)
        self.temperature = nn.Parameter(torch.tensor(0.07))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.decoder = nn.Linear(8, 10, bias=False)
        self.decoder.weight = self.word_embeddings.weight  # tied to the embedding table


def _group_names(groups: list[dict]) -> dict[float, set[str]]:
    return {g["weight_decay"]: set(g["param_names"]) for g in groups}


def test_param_groups_exact_split() -> None:
    groups = _group_names(param_groups(TinyModel(), weight_decay=0.05))
    assert groups[0.05] == {"patch_embed.proj.weight", "fc.weight", "text_proj.weight"}
    assert groups[0.0] == {"patch_embed.proj.bias", "pos_embed", "cls_token", "word_embeddings.weight", "norm.weight",
                           "norm.bias", "fc.bias", "temperature", "logit_scale"}


def test_param_groups_match_timm_on_vit() -> None:
    timm = pytest.importorskip("timm")
    from timm.optim import param_groups_weight_decay

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=16, embed_dim=32,
                            depth=2, num_heads=2, num_classes=4)
    ours = {g["weight_decay"]: {id(p) for p in g["params"]} for g in param_groups(vit, 0.1)}
    theirs = {g["weight_decay"]: {id(p) for p in g["params"]}
              for g in param_groups_weight_decay(vit, 0.1, no_weight_decay_list=vit.no_weight_decay())}
    assert ours == theirs


def test_param_groups_all_frozen_is_an_error() -> None:
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(UserError, match="no trainable parameters"):
        param_groups(model, 0.1)


def test_scaled_lr_rules() -> None:
    assert scaled_lr(1e-4, 256, 1024, "linear") == pytest.approx(4e-4)
    assert scaled_lr(1e-4, 256, 1024, "sqrt") == pytest.approx(2e-4)
    assert scaled_lr(1e-4, 256, 1024, "none") == pytest.approx(1e-4)
    assert scaled_lr(1e-4, 256, 64, "linear") == pytest.approx(2.5e-5)
    with pytest.raises(ConfigError, match="optim.lr_scaling"):
        scaled_lr(1e-4, 256, 1024, "cubic")


def test_build_optimizer_decays_only_the_decay_group() -> None:
    model = TinyModel()
    cfg = OptimConfig(weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    optimizer = build_optimizer(model, cfg, lr=0.5, device_type="cpu")
    assert all(g["fused"] for g in optimizer.param_groups)
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95) and optimizer.param_groups[0]["lr"] == 0.5
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's update is 0/(0+eps) = 0: only the decoupled decay moves weights
    optimizer.step()
    after = dict(model.named_parameters())
    torch.testing.assert_close(after["fc.weight"], before["fc.weight"] * (1 - 0.5 * 0.1))
    torch.testing.assert_close(after["fc.bias"], before["fc.bias"])
    torch.testing.assert_close(after["pos_embed"], before["pos_embed"])
    torch.testing.assert_close(after["word_embeddings.weight"], before["word_embeddings.weight"])


def test_lr_factor_key_points() -> None:
    warmup, total, floor = 10, 110, 0.1
    assert lr_factor(0, warmup, total, "cosine", floor) == 0.0
    assert lr_factor(5, warmup, total, "cosine", floor) == pytest.approx(0.5)
    assert lr_factor(warmup, warmup, total, "cosine", floor) == pytest.approx(1.0)
    midpoint = warmup + (total - warmup) // 2
    assert lr_factor(midpoint, warmup, total, "cosine", floor) == pytest.approx(floor + (1 - floor) * 0.5)
    assert lr_factor(35, warmup, total, "cosine", floor) == pytest.approx(
        floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_factor(total, warmup, total, "cosine", floor) == pytest.approx(floor)
    assert lr_factor(total + 50, warmup, total, "cosine", floor) == pytest.approx(floor)  # no rise past the end
    assert lr_factor(80, warmup, total, "constant") == 1.0
    cfg = ScheduleConfig(type="cosine", warmup_steps=warmup, min_lr_ratio=floor)
    assert lr_at(midpoint, 3e-4, cfg, total) == pytest.approx(3e-4 * 0.55)
    with pytest.raises(ConfigError, match="schedule.type"):
        lr_factor(0, 0, 10, "linear")


@pytest.mark.parametrize("kind,warmup,floor", [("cosine", 10, 0.1), ("cosine", 0, 0.0), ("constant", 7, 0.0)])
def test_scheduler_matches_hugging_face(kind: str, warmup: int, floor: float) -> None:
    from transformers.optimization import (
        get_constant_schedule_with_warmup,
        get_cosine_with_min_lr_schedule_with_warmup,
    )

    total, peak = 60, 2e-3
    ours_opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=peak)
    hf_opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=peak)
    ours = build_scheduler(ours_opt, ScheduleConfig(type=kind, warmup_steps=warmup, min_lr_ratio=floor), total)
    if kind == "cosine":
        hf = get_cosine_with_min_lr_schedule_with_warmup(hf_opt, warmup, total, min_lr_rate=floor)
    else:
        hf = get_constant_schedule_with_warmup(hf_opt, warmup)
    for step in range(total + 1):
        assert ours_opt.param_groups[0]["lr"] == pytest.approx(hf_opt.param_groups[0]["lr"], abs=1e-12), step
        assert ours_opt.param_groups[0]["lr"] == pytest.approx(
            lr_at(step, peak, ScheduleConfig(type=kind, warmup_steps=warmup, min_lr_ratio=floor), total), abs=1e-12)
        ours_opt.step()
        hf_opt.step()
        ours.step()
        hf.step()


def test_lora_identity_at_init_trainable_adapters_and_merge() -> None:
    torch.manual_seed(0)
    block = TransformerBlock(32, num_heads=4)
    tokens = torch.randn(2, 5, 32)
    plain_state = {k: v.clone() for k, v in block.state_dict().items()}
    expected = block(tokens)
    assert apply_lora(block, rank=4, alpha=8) == 6  # q, k, v, proj, fc1, fc2
    torch.testing.assert_close(block(tokens), expected, rtol=0, atol=0)
    lora_layers = [m for m in block.modules() if isinstance(m, LoRALinear)]
    assert all(m.scaling == 2.0 and not m.weight.requires_grad and not m.bias.requires_grad for m in lora_layers)

    block(tokens).square().sum().backward()
    # B = 0 at init: the gradient reaches B at once, A only after B has moved.
    assert all(m.lora_b.grad is not None and m.lora_b.grad.abs().sum() > 0 for m in lora_layers)
    assert all(m.lora_a.grad is not None and m.lora_a.grad.abs().sum() == 0 for m in lora_layers)
    assert all(m.weight.grad is None for m in lora_layers)

    with torch.no_grad():
        for m in lora_layers:
            m.lora_b.normal_(std=0.1)
    adapted = block(tokens)
    assert not torch.allclose(adapted, expected)
    assert merge_lora(block) == 6
    assert not any(isinstance(m, LoRALinear) for m in block.modules())
    assert set(block.state_dict()) == set(plain_state)
    torch.testing.assert_close(block(tokens), adapted, rtol=1e-5, atol=1e-5)


def test_lora_only_adapters_trainable_in_linear_stack_and_plain_checkpoint_loads() -> None:
    torch.manual_seed(0)
    first = nn.Linear(8, 16)
    stack = nn.Sequential(first, nn.GELU(), nn.Linear(16, 4))
    plain = {k: v.clone() for k, v in stack.state_dict().items()}
    inputs = torch.randn(3, 8)
    expected = stack(inputs)
    apply_lora(stack, rank=2)
    trainable = {name for name, p in stack.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_a", "0.lora_b", "2.lora_a", "2.lora_b"}
    assert set(stack.state_dict()) == set(plain) | trainable  # base keys unchanged
    with torch.no_grad():
        first.weight.zero_()  # the LoRA layer adopted this parameter
    stack.load_state_dict(plain, strict=True)  # a plain checkpoint: adapters keep B = 0
    torch.testing.assert_close(stack(inputs), expected)


def test_lora_skips_linear_subclasses_and_checks_rank() -> None:
    attention = nn.MultiheadAttention(8, 2)
    assert apply_lora(attention, rank=2) == 0  # out_proj is read via .weight by its parent
    with pytest.raises(ConfigError, match="lora_rank"):
        apply_lora(nn.Linear(2, 2), rank=0)


def test_single_process_distributed_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed("cpu")
    assert info == DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    assert info.is_main and not info.distributed and is_main()
    barrier()
    value = torch.tensor([1.0, 2.0])
    reduced = all_reduce_mean(value)
    torch.testing.assert_close(reduced, value)
    assert reduced.data_ptr() != value.data_ptr()
    model = nn.Linear(2, 2)
    assert wrap_model(model, info) is model


def test_init_distributed_rejects_partial_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(UserError, match="MASTER_ADDR"):
        init_distributed("cpu")


def _grad(param: torch.Tensor) -> torch.Tensor:
    assert param.grad is not None
    return param.grad


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import os

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    results: dict[str, object] = {"info": (info.rank, info.world_size, info.device.type), "main": is_main()}
    results["mean"] = all_reduce_mean(torch.tensor([rank + 1.0, 10.0 * rank]))

    torch.manual_seed(0)  # identical initial weights on both ranks
    layer = nn.Linear(4, 3)
    ddp = wrap_model(layer, info)
    assert isinstance(ddp, DistributedDataParallel)
    torch.manual_seed(100 + rank)  # different data per rank
    inputs = torch.randn(5, 4)
    ddp(inputs).square().sum().backward()
    results["ddp_grad"] = _grad(layer.weight).clone()
    results["inputs"] = inputs

    torch.manual_seed(0)
    sharded = wrap_model(nn.Sequential(TransformerBlock(16, 2), TransformerBlock(16, 2)), info, fsdp=True,
                         block_types=(TransformerBlock,))
    torch.manual_seed(200 + rank)
    tokens = torch.randn(2, 3, 16)
    sharded(tokens).sum().backward()
    results["fsdp_tokens"] = tokens
    grads = {name: _grad(p) for name, p in sharded.named_parameters()}
    assert all(isinstance(g, DTensor) for g in grads.values())  # every parameter was sharded
    results["fsdp_grads"] = {name: g.full_tensor() for name, g in grads.items() if isinstance(g, DTensor)}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    barrier()
    from vlp.train.distributed import cleanup

    cleanup()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_two_process_gloo_all_reduce_ddp_and_fsdp(tmp_path: Path) -> None:
    # fork: the children inherit the imported modules (spawn would re-import torch, ~2x slower here).
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["info"] for r in ranks] == [(0, 2, "cpu"), (1, 2, "cpu")]
    assert [r["main"] for r in ranks] == [True, False]
    for r in ranks:
        torch.testing.assert_close(r["mean"], torch.tensor([1.5, 5.0]))

    # DDP: each rank's gradient is the mean of the per-rank gradients of one reference layer.
    torch.manual_seed(0)
    reference = nn.Linear(4, 3)
    grads = []
    for r in ranks:
        reference.zero_grad()
        reference(r["inputs"]).square().sum().backward()
        grads.append(_grad(reference.weight).clone())
    for r in ranks:
        torch.testing.assert_close(r["ddp_grad"], (grads[0] + grads[1]) / 2)

    # FSDP2: the unsharded gradients equal the mean over ranks of a plain model's gradients.
    torch.manual_seed(0)
    plain = nn.Sequential(TransformerBlock(16, 2), TransformerBlock(16, 2))
    per_rank = []
    for r in ranks:
        plain.zero_grad()
        plain(r["fsdp_tokens"]).sum().backward()
        per_rank.append({name: _grad(p).clone() for name, p in plain.named_parameters()})
    for r in ranks:
        assert set(r["fsdp_grads"]) == set(per_rank[0])
        for name, grad in r["fsdp_grads"].items():
            torch.testing.assert_close(grad, (per_rank[0][name] + per_rank[1][name]) / 2, rtol=1e-4, atol=1e-5)


def test_fused_optimizer_matches_the_reference_adamw_update() -> None:
    """The fused CPU kernel gives torch's single-tensor AdamW update (weight decay groups included)."""
    fused_model, reference_model = TinyModel(), TinyModel()
    reference_model.load_state_dict(fused_model.state_dict())
    cfg = OptimConfig(weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    fused = build_optimizer(fused_model, cfg, lr=1e-2, device_type="cpu")
    reference = torch.optim.AdamW(param_groups(reference_model, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                  foreach=False)
    initial = {name: p.detach().clone() for name, p in fused_model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        for a, b in zip(fused_model.parameters(), reference_model.parameters()):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        fused.step()
        reference.step()
    for (name, a), b in zip(fused_model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)
        assert not a.requires_grad or (a - initial[name]).abs().max() > 1e-3, name  # the trainable ones moved
