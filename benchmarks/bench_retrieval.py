"""Retrieval: ITM re-ranking vs a LAVIS-style per-query loop, and ITC top-k vs a plain chunked mm + topk merge.

(a) ITM re-ranking (fusion width 768, 12 heads, 2 one-way dual-stream layers, 577 image tokens = 384 px
    at patch 16, k candidates per query, image and text queries). The reference does what LAVIS's
    ``compute_sim_matrix`` does: per query, it repeats the query's tokens k times, gathers the k
    candidates' tokens and runs the fusion (Hugging Face BertLayers holding vlp's weights, so both sides
    compute the same function) and the ITM head. vlp runs ``vlp.eval.rerank.rerank_candidates``: pairs
    batched across queries, each image's cross-attention keys/values computed once. Targets: identical
    candidate orders within a dtype; >= 1.5x faster in fp32; >= 3x with vlp's defaults (bf16 autocast,
    cached keys/values, batching) against the fp32 loop.
(b) ITC ranking: top-k of every query over a gallery of L2-normalized embeddings. Reference: the plain
    chunked ``mm`` + ``topk`` + merge, same score-block budget (256 MB at the full 1M gallery, scaled with
    the gallery at smaller sizes so the memory figure keeps its meaning). Targets: identical results (values, and indices
    up to the order of exactly tied scores); >= 1.5x faster; vlp's peak memory above the post-import
    baseline <= 1.5x the gallery's own size (measured in a fresh subprocess per side).

    python benchmarks/bench_retrieval.py [--size tiny|quick|full] [--reps N] [--threads N]
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_fusion import hf_bert_layer
from common import Report, base_parser, interleaved, median, paired_ratio, setup, sizes_for
from torch import Tensor, nn

SIZES = {
    "tiny": {"dim": 64, "heads": 4, "image_tokens": 17, "text_tokens": 12, "queries": 4, "k": 3,
             "gallery": 5000, "itc_queries": 64, "itc_k": 8, "itc_dim": 32, "reps": 1, "itc_reps": 1,
             "probe_plain": False, "score_mb": 1},
    "quick": {"dim": 768, "heads": 12, "image_tokens": 577, "text_tokens": 30, "queries": 12, "k": 16,
              "gallery": 200_000, "itc_queries": 2_000, "itc_k": 128, "itc_dim": 256, "reps": 1, "itc_reps": 3,
              "probe_plain": True, "score_mb": 64},
    "full": {"dim": 768, "heads": 12, "image_tokens": 577, "text_tokens": 30, "queries": 100, "k": 16,
             "gallery": 1_000_000, "itc_queries": 10_000, "itc_k": 128, "itc_dim": 256, "reps": 2, "itc_reps": 3,
             "probe_plain": True, "score_mb": 256},
}
FUSION_DEPTH = 2
ITM_BATCH = 128


# ------------------------------------------------------------------------------------------ (a) ITM re-ranking
def build_model(dim: int, heads: int, image_tokens: int) -> Any:
    """A VLPModel whose fusion is the benchmarked part (encoders are minimal: re-ranking reuses their outputs)."""
    from vlp.models import VLPModel

    side = int(round((image_tokens - 1) ** 0.5))
    return VLPModel.from_config({
        "name": "bench_rerank",
        "image": {"type": "vit", "image_size": side * 16, "patch_size": 16, "width": dim, "depth": 1,
                  "num_heads": heads},
        "text": {"type": "transformer", "tokenizer": "synthetic", "width": dim, "depth": 1, "num_heads": heads},
        "fusion": {"type": "dual_stream", "depth": FUSION_DEPTH, "num_heads": heads, "update_image": False},
        "embed_dim": 256, "itm_head": True, "mlm_head": False,
    }).eval()


def lavis_loop(layers: list[nn.Module], itm_head: nn.Module, image_tokens: Tensor, text_tokens: Tensor,
               text_mask: Tensor, i2t: Tensor, t2i: Tensor) -> tuple[Tensor, Tensor]:
    """Per query: the query repeated k times with its k candidates, through the fusion layers and ITM head."""
    additive = (~text_mask[:, None, None, :]).float() * torch.finfo(torch.float32).min  # HF's extended mask

    def score(texts: Tensor, masks: Tensor, images: Tensor) -> Tensor:
        hidden = texts
        for layer in layers:
            hidden = layer(hidden, attention_mask=masks, encoder_hidden_states=images)
        return itm_head(hidden[:, 0]).float()[:, 1]

    k = i2t.shape[1]
    i2t_scores = torch.stack([score(text_tokens[cands], additive[cands], image_tokens[i].expand(k, -1, -1))
                              for i, cands in enumerate(i2t)])
    t2i_scores = torch.stack([score(text_tokens[t].expand(k, -1, -1), additive[t].expand(k, -1, -1, -1),
                                    image_tokens[cands]) for t, cands in enumerate(t2i)])
    return i2t_scores, t2i_scores


def same_order_rows(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
    """Per query (image queries, then text queries): whether both sides order its candidates the same."""
    return torch.cat([(x.argsort(dim=1, descending=True, stable=True)
                       == y.argsort(dim=1, descending=True, stable=True)).all(dim=1) for x, y in zip(a, b)])


def same_order(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> bool:
    return bool(same_order_rows(a, b).all())


def bench_rerank(report: Report, cfg: dict[str, Any], reps: int) -> bool:
    """Figures of (a); returns whether the fp32 candidate orders are identical."""
    from vlp.eval.rerank import rerank_candidates
    from vlp.precision import DEFAULT_PRECISION, resolve_precision
    from vlp.types import EncoderOutput

    dim, heads, num_image_tokens, num_text_tokens = cfg["dim"], cfg["heads"], cfg["image_tokens"], cfg["text_tokens"]
    queries, k = cfg["queries"], cfg["k"]
    model = build_model(dim, heads, num_image_tokens)
    layers = [hf_bert_layer(layer, dim, heads).eval() for layer in model.fusion.text_layers]
    gen = torch.Generator().manual_seed(1)
    num_images = num_texts = max(queries, 4 * k)  # a gallery larger than k on both sides
    image_tokens = torch.randn(num_images, num_image_tokens, dim, generator=gen)
    text_tokens = torch.randn(num_texts, num_text_tokens, dim, generator=gen)
    lengths = torch.randint(num_text_tokens // 3, num_text_tokens + 1, (num_texts,), generator=gen)
    text_mask = torch.arange(num_text_tokens)[None, :] < lengths[:, None]
    sims = torch.randn(num_images, num_texts, generator=gen)
    i2t = sims[:queries].topk(k, dim=1).indices  # image queries' candidate captions
    t2i = sims.T[:queries].topk(k, dim=1).indices  # text queries' candidate images
    image_out = EncoderOutput(image_tokens, torch.ones(num_images, num_image_tokens, dtype=torch.bool),
                              torch.zeros(num_images, dim))
    text_out = EncoderOutput(text_tokens, text_mask, torch.zeros(num_texts, dim))

    def autocast(precision: str) -> Callable[[], contextlib.AbstractContextManager[Any]]:
        if precision == "bf16":
            return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext

    results: dict[str, tuple[Tensor, Tensor]] = {}

    def run_vlp(precision: str) -> Callable[[], None]:
        def run() -> None:
            # the reference loop scores by the match logit (column 1), as LAVIS does
            results[f"vlp_{precision}"] = rerank_candidates(model, image_out, text_out, i2t, t2i, ITM_BATCH,
                                                            autocast(precision), match="logit")
        return run

    def run_loop(precision: str) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), autocast(precision)():
                results[f"loop_{precision}"] = lavis_loop(layers, model.itm_head, image_tokens, text_tokens,
                                                          text_mask, i2t, t2i)
        return run

    candidates = {"loop_fp32": run_loop("fp32"), "vlp_fp32": run_vlp("fp32"), "vlp_bf16": run_vlp("bf16"),
                  "loop_bf16": run_loop("bf16")}
    times = interleaved(candidates, reps, warmup=0)
    report.detail("rerank_times_seconds", {name: [round(t, 3) for t in ts] for name, ts in times.items()})
    pairs = 2 * queries * k
    report.detail("rerank_setup", {"image_queries": queries, "text_queries": queries, "k": k, "pairs": pairs,
                                   "fusion_layers": FUSION_DEPTH, "image_tokens": num_image_tokens,
                                   "text_tokens_max": num_text_tokens, "vlp_batch": ITM_BATCH})
    fp32_same = same_order(results["vlp_fp32"], results["loop_fp32"])
    bf16_rows = same_order_rows(results["vlp_bf16"], results["loop_bf16"])
    diff = max((a - b).abs().max().item() for a, b in zip(results["vlp_fp32"], results["loop_fp32"]))
    bf16_diff = max((a - b).abs().max().item() for a, b in zip(results["vlp_bf16"], results["loop_bf16"]))
    report.figure("rerank_identical_order_fp32", float(fp32_same), "(1 = same candidate order per query)", 1.0,
                  note=f"max |score difference| {diff:.2e}")
    # bf16 products of other shapes (a batch of pairs against one query's k) may round differently: on CPUs
    # whose bf16 kernels block by shape (AMX) two candidates closer than that rounding can swap
    report.figure("rerank_identical_order_bf16", float(bool(bf16_rows.all())), "(1 = same candidate order per query)",
                  1.0, note=f"{int(bf16_rows.sum())} of {len(bf16_rows)} queries in the same order; max |score "
                            f"difference| {bf16_diff:.2e}")
    report.figure("rerank_speedup_fp32", paired_ratio(times["loop_fp32"], times["vlp_fp32"]),
                  "x (LAVIS-style fp32 loop / vlp fp32)", 1.5,
                  note=f"loop {pairs / median(times['loop_fp32']):.1f} pairs/s, "
                       f"vlp {pairs / median(times['vlp_fp32']):.1f} pairs/s")
    report.figure("rerank_speedup_bf16_same_dtype", paired_ratio(times["loop_bf16"], times["vlp_bf16"]),
                  "x (LAVIS-style bf16 loop / vlp bf16)", 1.5)
    # vlp's defaults: eval precision "auto" (fp32 on every CPU), cached shared K/V, batching
    default = resolve_precision(DEFAULT_PRECISION, torch.device("cpu"))
    report.figure("rerank_speedup_defaults_vs_fp32_loop", paired_ratio(times["loop_fp32"], times[f"vlp_{default}"]),
                  "x (LAVIS-style fp32 loop / vlp defaults)", 3.0,
                  note=f"defaults resolve to {default} on this CPU; vlp {default} "
                       f"{pairs / median(times[f'vlp_{default}']):.1f} pairs/s")
    report.figure("rerank_speedup_bf16_vs_fp32_loop", paired_ratio(times["loop_fp32"], times["vlp_bf16"]),
                  "x (LAVIS-style fp32 loop / vlp bf16)", None,
                  note=f"vlp bf16 {pairs / median(times['vlp_bf16']):.1f} pairs/s")
    return fp32_same


# ------------------------------------------------------------------------------------------ (b) ITC top-k
def make_embeddings(count: int, dim: int, seed: int) -> Tensor:
    """L2-normalized random rows, built in place (no second copy of a gigabyte gallery)."""
    rows = torch.randn(count, dim, generator=torch.Generator().manual_seed(seed))
    return rows.div_(rows.norm(dim=1, keepdim=True))


def plain_topk(queries: Tensor, gallery: Tensor, k: int, memory_mb: float = 256) -> tuple[Tensor, Tensor]:
    """The straightforward chunked ranking: mm per block, topk per block, merge by cat + topk."""
    budget = int(memory_mb * 2**20) // 4
    gallery_chunk = min(len(gallery), max(k, budget // max(1, min(len(queries), 1024))))
    query_chunk = max(1, budget // gallery_chunk)
    all_values, all_indices = [], []
    for q_start in range(0, len(queries), query_chunk):
        block_queries = queries[q_start:q_start + query_chunk]
        values: Tensor | None = None
        indices: Tensor | None = None
        for g_start in range(0, len(gallery), gallery_chunk):
            scores = block_queries @ gallery[g_start:g_start + gallery_chunk].T
            top_values, top_indices = scores.topk(min(k, scores.shape[1]), dim=1)
            top_indices += g_start
            if values is not None and indices is not None:
                top_values, keep = torch.cat([values, top_values], 1).topk(k, dim=1)
                top_indices = torch.cat([indices, top_indices], 1).gather(1, keep)
            values, indices = top_values, top_indices
        assert values is not None and indices is not None
        all_values.append(values)
        all_indices.append(indices)
    return torch.cat(all_values), torch.cat(all_indices)


def canonical(values: Tensor, indices: Tensor) -> Tensor:
    """Indices ordered by (score descending, index ascending): equal scores may come in either order."""
    order = torch.argsort(indices, dim=1)
    values, indices = values.gather(1, order), indices.gather(1, order)
    return indices.gather(1, torch.argsort(values, dim=1, descending=True, stable=True))


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_probe(side: str, gallery_size: int, queries: int, dim: int, k: int, tune: bool,
                 memory_mb: float = 256) -> dict[str, float]:
    """Run in a fresh process: peak RSS above the post-import baseline while ranking (gallery included)."""
    from vlp.eval.retrieval import chunked_topk
    from vlp.runtime import tune_allocator

    if tune:
        tune_allocator()
    baseline = _rss_mb()
    gallery = make_embeddings(gallery_size, dim, seed=2)
    query_emb = make_embeddings(queries, dim, seed=3)
    if side == "vlp":
        chunked_topk(query_emb, gallery, k, memory_mb=memory_mb)
    else:
        plain_topk(query_emb, gallery, k, memory_mb=memory_mb)
    return {"baseline_mb": baseline, "peak_above_baseline_mb": _peak_mb() - baseline,
            "gallery_mb": gallery.numel() * 4 / 2**20}


def _probe_in_subprocess(side: str, cfg: dict[str, Any], tune: bool, threads: int) -> dict[str, float]:
    # The child's RSS after importing torch and vlp is the post-import baseline.
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import torch; torch.set_num_threads(int(sys.argv[8]));"
            " from bench_retrieval import memory_probe;"
            " print(json.dumps(memory_probe(sys.argv[2], *map(int, sys.argv[3:7]), sys.argv[7] == '1',"
            " float(sys.argv[9]))))")
    args = [sys.executable, "-c", code, str(Path(__file__).resolve().parent), side, str(cfg["gallery"]),
            str(cfg["itc_queries"]), str(cfg["itc_dim"]), str(cfg["itc_k"]), "1" if tune else "0", str(threads),
            str(cfg["score_mb"])]
    output = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    result: dict[str, float] = json.loads(output.strip().splitlines()[-1])
    return result


def bench_itc(report: Report, cfg: dict[str, Any], reps: int, tune: bool) -> bool:
    """Figures of (b); returns whether vlp's top-k equals the plain merge's."""
    from vlp.eval.retrieval import chunked_topk

    gallery = make_embeddings(cfg["gallery"], cfg["itc_dim"], seed=2)
    queries = make_embeddings(cfg["itc_queries"], cfg["itc_dim"], seed=3)
    k = cfg["itc_k"]
    results: dict[str, tuple[Tensor, Tensor]] = {}

    def run(name: str, fn: Callable[..., tuple[Tensor, Tensor]]) -> Callable[[], None]:
        def go() -> None:
            results[name] = fn(queries, gallery, k, memory_mb=cfg["score_mb"])
        return go

    times = interleaved({"plain": run("plain", plain_topk), "vlp": run("vlp", chunked_topk)}, reps)
    report.detail("itc_times_seconds", {name: [round(t, 3) for t in ts] for name, ts in times.items()})
    report.detail("itc_setup", {"gallery": cfg["gallery"], "queries": cfg["itc_queries"], "dim": cfg["itc_dim"],
                                "k": k, "score_block_mb": cfg["score_mb"]})
    (plain_values, plain_indices), (vlp_values, vlp_indices) = results["plain"], results["vlp"]
    same = torch.equal(plain_values, vlp_values) and torch.equal(canonical(plain_values, plain_indices),
                                                                 canonical(vlp_values, vlp_indices))
    raw_same_rows = int((plain_indices == vlp_indices).all(dim=1).sum())
    report.figure("itc_identical_results", float(same), "(1 = same values, same indices up to exact ties)", 1.0,
                  note=f"{raw_same_rows} of {len(queries)} rows identical without reordering ties")
    report.figure("itc_speedup", paired_ratio(times["plain"], times["vlp"]), "x (plain chunked mm+topk / vlp)", 1.5,
                  note=f"plain {median(times['plain']):.2f} s, vlp {median(times['vlp']):.2f} s")
    sides = ("vlp", "plain") if cfg["probe_plain"] else ("vlp",)
    memory = {side: _probe_in_subprocess(side, cfg, tune, torch.get_num_threads()) for side in sides}
    report.detail("itc_memory_mb", memory)
    ratios = {side: m["peak_above_baseline_mb"] / m["gallery_mb"] for side, m in memory.items()}
    report.figure("itc_memory_over_gallery", ratios["vlp"], "x gallery size (peak RSS above post-import baseline)",
                  1.5, higher_is_better=False,
                  note=f"gallery {memory['vlp']['gallery_mb']:.0f} MB, score block {cfg['score_mb']} MB"
                       + (f"; plain merge {ratios['plain']:.2f}x" if "plain" in ratios else ""))
    return same


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("rerank", "itc"), default=None, help="run one of the two parts")
    args = parser.parse_args(argv)
    cfg = sizes_for(args.size, SIZES)
    settings = setup(args)
    report = Report("bench_retrieval", args, {**settings, **cfg})
    exact = True
    with torch.no_grad():
        if args.only in (None, "rerank"):
            exact = bench_rerank(report, cfg, args.reps or cfg["reps"]) and exact
        if args.only in (None, "itc"):
            exact = bench_itc(report, cfg, args.reps or cfg["itc_reps"], not args.no_tune_allocator) and exact
    report.write()
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
