"""Fusion layers against their references, forward + backward, fp32 and bf16 autocast.

- ``DualStreamFusion(update_image=False)`` (one layer) vs Hugging Face ``BertLayer(add_cross_attention=True)``:
  text [B, T, D] with an explicit (non-causal) padding mask cross-attending to image tokens [B, I, D].
  Targets: vlp/HF time <= 1.0 in fp32 and <= 0.67 in bf16 autocast.
- A ``SingleStreamFusion`` layer (its pre-norm block; the modality embeddings, final norm and pooler run once
  per stack, not per layer) vs a timm ViT ``Block`` over the same T + I joint tokens with the same padding
  mask. Same targets.

Both sides hold the same weights (copied from vlp), get the same inputs (image tokens requiring grad, as
behind an encoder), and their fp32 outputs are checked equal before timing. GFLOP/s are the matmul FLOPs
of one layer (forward x 3 for forward + backward) over the median time, against the in-run matmul peak.

    python benchmarks/bench_fusion.py [--size tiny|quick|full] [--reps N] [--threads N]
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any

import torch
from common import Report, base_parser, interleaved, matmul_peak, median, paired_ratio, setup, sizes_for
from torch import Tensor, nn

SIZES = {
    "tiny": {"batch": 2, "text": 8, "image": 17, "dim": 64, "heads": 4, "reps": 2},
    "quick": {"batch": 32, "text": 40, "image": 197, "dim": 768, "heads": 12, "reps": 4},
    "full": {"batch": 32, "text": 40, "image": 197, "dim": 768, "heads": 12, "reps": 15},
}
TARGETS = {"fp32": 1.0, "bf16": 0.67}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _copy(target: Any, source: Any) -> None:
    with torch.no_grad():
        target.weight.copy_(source.weight)
        if target.bias is not None and source.bias is not None:
            target.bias.copy_(source.bias)


def hf_bert_layer(ours: Any, dim: int, heads: int) -> nn.Module:
    """A Hugging Face BertLayer with cross-attention holding the weights of vlp's dual-stream layer ``ours``."""
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    settings: dict[str, Any] = dict(
        hidden_size=dim, num_attention_heads=heads, intermediate_size=4 * dim, hidden_act="gelu",
        layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        is_decoder=True, add_cross_attention=True, attn_implementation="sdpa",
    )
    config = BertConfig(**settings)
    layer = BertLayer(config)
    for hf_attention, attn, norm in [(layer.attention, ours.attn, ours.norm1),
                                     (layer.crossattention, ours.cross_attn, ours.norm_cross)]:
        _copy(hf_attention.self.query, attn.q)
        _copy(hf_attention.self.key, attn.k)
        _copy(hf_attention.self.value, attn.v)
        _copy(hf_attention.output.dense, attn.proj)
        _copy(hf_attention.output.LayerNorm, norm)
    _copy(layer.intermediate.dense, ours.mlp.fc1)
    _copy(layer.output.dense, ours.mlp.fc2)
    _copy(layer.output.LayerNorm, ours.norm2)
    return layer


def timm_block(ours: Any, dim: int, heads: int) -> nn.Module:
    """A timm ViT Block holding the weights of vlp's single-stream (pre-norm) block ``ours``."""
    from timm.models.vision_transformer import Block

    block: Any = Block(dim, heads, mlp_ratio=4.0, qkv_bias=True)
    with torch.no_grad():
        block.attn.qkv.weight.copy_(torch.cat([ours.attn.q.weight, ours.attn.k.weight, ours.attn.v.weight]))
        block.attn.qkv.bias.copy_(torch.cat([ours.attn.q.bias, ours.attn.k.bias, ours.attn.v.bias]))
    _copy(block.attn.proj, ours.attn.proj)
    _copy(block.norm1, ours.norm1)
    _copy(block.norm2, ours.norm2)
    _copy(block.mlp.fc1, ours.mlp.fc1)
    _copy(block.mlp.fc2, ours.mlp.fc2)
    return block


def layer_flops(batch: int, text: int, image: int, dim: int, kind: str) -> float:
    """Matmul FLOPs of one forward (linear layers and attention products; MLP ratio 4)."""
    if kind == "dual":
        linear = 2 * batch * (text * dim * dim * (4 + 2 + 8) + image * dim * dim * 2)
        attn = 2 * batch * dim * 2 * (text * text + text * image)
        return float(linear + attn)
    tokens = text + image
    return float(2 * batch * tokens * dim * dim * 12 + 2 * batch * dim * 2 * tokens * tokens)


def _autocast(name: str) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    if name == "bf16":
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext


def _step(module: nn.Module, loss: Callable[[], Tensor], inputs: list[Tensor],
          autocast: Callable[[], contextlib.AbstractContextManager[Any]]) -> Callable[[], None]:
    """One forward + backward; gradients are reset to None first, as an optimizer's zero_grad does."""

    def step() -> None:
        module.zero_grad(set_to_none=True)
        for tensor in inputs:
            tensor.grad = None
        with autocast():
            value = loss()
        value.backward()

    return step


def main(argv: list[str] | None = None) -> int:
    from vlp.fusion import DualStreamFusion, SingleStreamFusion

    parser = base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    cfg = sizes_for(args.size, SIZES)
    reps = args.reps or cfg["reps"]
    settings = setup(args)
    report = Report("bench_fusion", args, {**settings, **cfg, "reps": reps})
    batch, num_text, num_image, dim, heads = (cfg[k] for k in ("batch", "text", "image", "dim", "heads"))

    gen = torch.Generator().manual_seed(0)
    text = torch.randn(batch, num_text, dim, generator=gen, requires_grad=True)
    image = torch.randn(batch, num_image, dim, generator=gen, requires_grad=True)
    lengths = torch.randint(num_text // 2, num_text + 1, (batch,), generator=gen)
    text_mask = torch.arange(num_text)[None, :] < lengths[:, None]
    # HF's extended mask: 0 for real keys, dtype min for padding; explicit, so self-attention is not causal.
    hf_mask = (~text_mask[:, None, None, :]).float() * torch.finfo(torch.float32).min
    joint_mask = torch.cat([text_mask, torch.ones(batch, num_image, dtype=torch.bool)], dim=1)
    timm_mask = joint_mask[:, None, None, :]
    proj_text = torch.randn(batch, num_text, dim, generator=gen)
    proj_joint = torch.randn(batch, num_text + num_image, dim, generator=gen)

    dual = DualStreamFusion(dim, 1, heads, update_image=False)
    bert = hf_bert_layer(dual.text_layers[0], dim, heads)
    single = SingleStreamFusion(dim, 1, heads)
    block = timm_block(single.blocks[0], dim, heads)
    layer = single.blocks[0]
    joint = torch.randn(batch, num_text + num_image, dim, generator=gen, requires_grad=True)

    def dual_out() -> Tensor:
        return dual(text, image, text_mask).text

    def bert_out() -> Tensor:
        return bert(text, attention_mask=hf_mask, encoder_hidden_states=image)

    def single_out() -> Tensor:
        return layer(joint, joint_mask)

    def block_out() -> Tensor:
        return block(joint, attn_mask=timm_mask)

    # Random projections as losses: a plain sum would give zero gradient through the final LayerNorm.
    losses: dict[str, dict[str, tuple[nn.Module, Callable[[], Tensor]]]] = {
        "dual": {
            "vlp": (dual, lambda: (dual_out().float() * proj_text).sum()),
            "ref": (bert, lambda: (bert_out().float() * proj_text).sum()),
        },
        "single": {
            "vlp": (single, lambda: (single_out().float() * proj_joint).sum()),
            "ref": (block, lambda: (block_out().float() * proj_joint).sum()),
        },
    }
    with torch.no_grad():  # the two sides compute the same function (timm's LayerNorm eps is 1e-6, ours 1e-12)
        dual_diff = (dual_out() - bert_out()).abs().max().item()
        single_diff = (single_out() - block_out()).abs().max().item()
    report.detail("max_abs_output_difference_fp32", {"dual": dual_diff, "single": single_diff})
    if dual_diff > 1e-3 or single_diff > 1e-3:
        print(f"vlp and reference outputs differ (dual {dual_diff:.2e}, single {single_diff:.2e})", file=sys.stderr)
        return 1

    peak_size = 256 if args.size == "tiny" else 2048
    peaks_before = {name: matmul_peak(dtype, peak_size) for name, dtype in DTYPES.items()}
    times: dict[str, dict[str, list[float]]] = {}
    for kind in ("dual", "single"):
        for precision in DTYPES:
            steps = {side: _step(module, loss, [text, image, joint], _autocast(precision))
                     for side, (module, loss) in losses[kind].items()}
            times[f"{kind}_{precision}"] = interleaved(steps, reps)
    peaks_after = {name: matmul_peak(dtype, peak_size) for name, dtype in DTYPES.items()}
    peaks = {name: max(peaks_before[name], peaks_after[name]) for name in DTYPES}
    report.detail("matmul_peak_gflops", {"before": peaks_before, "after": peaks_after})
    report.detail("times_seconds", {key: {side: [round(t, 5) for t in ts] for side, ts in value.items()}
                                    for key, value in times.items()})

    for kind, name, reference in (("dual", "DualStreamFusion", "HF BertLayer"),
                                  ("single", "SingleStreamFusion", "timm Block")):
        flops = 3 * layer_flops(batch, num_text, num_image, dim, kind)
        for precision in DTYPES:
            measured = times[f"{kind}_{precision}"]
            vlp_ms, ref_ms = median(measured["vlp"]) * 1e3, median(measured["ref"]) * 1e3
            report.figure(f"{kind}_{precision}_time_ratio", paired_ratio(measured["vlp"], measured["ref"]),
                          f"x ({name} / {reference} time)", TARGETS[precision], higher_is_better=False,
                          note=f"vlp {vlp_ms:.0f} ms, ref {ref_ms:.0f} ms")
            for side, ms in (("vlp", vlp_ms), ("ref", ref_ms)):
                gflops = flops / ms / 1e6
                report.figure(f"{kind}_{precision}_{side}_peak_fraction", gflops / peaks[precision],
                              f"of the {precision} matmul peak ({peaks[precision]:.0f} GFLOP/s)",
                              note=f"{gflops:.1f} GFLOP/s")
    report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
