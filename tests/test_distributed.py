"""Two CPU processes (gloo) against one process: gradients, evaluation, streaming data, a torchrun pretrain.

One ``mp.spawn`` of two ranks runs every in-process check (the model is tiny, the batches small) and saves
its results; the tests compare them with the same computation in this (single) process. Two torchrun
launches run the real CLI: a pretrain that writes one checkpoint, and an exact 2-process resume.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from vlp.config import load_config
from vlp.config.schema import EvalConfig, ObjectiveConfig
from vlp.data.retrieval_split import synthetic_retrieval_split
from vlp.data.synthetic import SyntheticScenes
from vlp.data.vqa_data import synthetic_vqa
from vlp.models import VLPModel, build_model
from vlp.objectives import PretrainObjective

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pretrain" / "demo_tiny.yaml"  # albef_base_tiny: ITM and MLM heads, fusion
ALBEF_TINY = ROOT / "configs" / "pretrain" / "albef_4m_tiny.yaml"  # + MLM, momentum encoder, queue of 32
WORLD, BATCH = 2, 4  # per-rank batch; global batch 8
WDS_SIZES = [6] * 8  # 8 equal shards: 48 samples; 2 ranks x 2 workers x 2 shards of 6 = 3 batches of 4
WDS_UNEVEN = [5, 9, 3, 7]
STREAM_BATCH = 4
RETRIEVAL_CASES: dict[str, dict[str, Any]] = {  # odd sizes: uneven shards and encoding batches
    "itm": {"k_test": 4, "batch_size": 16, "max_images": 15},
    "itm+itc": {"k_test": 3, "score": "itm+itc", "batch_size": 7, "max_images": 9},
}

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")


# ------------------------------------------------------------------------------------------ shared setup
def _model() -> VLPModel:
    torch.manual_seed(0)
    return build_model(load_config(TINY).model).eval()


def _batch(rows: slice) -> dict[str, torch.Tensor]:
    scenes = SyntheticScenes(WORLD * BATCH, seed=3, image_size=32)
    generator = torch.Generator().manual_seed(5)
    images = torch.randn(WORLD * BATCH, 3, 32, 32, generator=generator)
    tokens = _model_tokenizer()([scenes.caption(i, 0) for i in range(WORLD * BATCH)], max_length=30)
    full = {"images": images, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
            "image_ids": torch.arange(WORLD * BATCH)}
    return {key: value[rows] for key, value in full.items()}


_TOKENIZER: list[Any] = []


def _model_tokenizer() -> Any:
    if not _TOKENIZER:
        _TOKENIZER.append(_model().tokenizer)
    return _TOKENIZER[0]


def _itc_grads(rows: slice, engine_wrap: Any = None) -> dict[str, torch.Tensor]:
    """Loss and encoder gradients of one ITC step of the real objective (ITM/MLM heads present but unused)."""
    model = _model().train()
    objective = PretrainObjective(model, ObjectiveConfig(itm_weight=0.0, mlm_weight=0.0))
    if engine_wrap is not None:
        objective.set_engine(engine_wrap(objective))
    out = objective.training_step(_batch(rows))
    result = {"loss": out.total}
    for name, param in model.named_parameters():
        if name.startswith(("image_encoder.", "text_encoder.", "image_proj.", "text_proj.", "temperature")):
            assert param.grad is not None, name
            result[name] = param.grad.clone()
    return result


def _split() -> Any:
    return synthetic_retrieval_split(SyntheticScenes(24, seed=0, split="test", image_size=32))


def _vqa_setup() -> tuple[Any, list[dict[str, Any]], Any, Any]:
    from vlp.eval.vqa import AnswerVocab
    from vlp.models import VQAModel

    model = _model()
    scenes = SyntheticScenes(5, seed=0, split="test", image_size=32)
    questions = synthetic_vqa(scenes)
    vocab = AnswerVocab.build(questions, top_n=12)
    torch.manual_seed(1)
    vqa_model = VQAModel(model, len(vocab)).eval()
    transform = model.image_transform(train=False)
    return vqa_model, questions, lambda image: transform(scenes.render(image)), vocab


def _tiny_image(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (value % 256, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_shards(root: Path, sizes: list[int]) -> str:
    root.mkdir(parents=True, exist_ok=True)
    sample = 0
    for shard, size in enumerate(sizes):
        with tarfile.open(root / f"shard-{shard:03d}.tar", "w") as tar:
            for _ in range(size):
                for ext, payload in (("png", _tiny_image(sample)), ("txt", f"caption {sample}".encode()),
                                     ("json", json.dumps({"image_id": sample}).encode())):
                    info = tarfile.TarInfo(f"s{sample:05d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                sample += 1
    return str(root / f"shard-{{000..{len(sizes) - 1:03d}}}.tar")


def _write_hf(root: Path, rows: int) -> str:
    import datasets

    datasets.Dataset.from_dict({"image": [{"bytes": _tiny_image(i), "path": f"img{i}.png"} for i in range(rows)],
                                "caption": [f"caption {i}" for i in range(rows)]},
                               features=datasets.Features({"image": datasets.Image(),
                                                           "caption": datasets.Value("string")})
                               ).save_to_disk(str(root))
    return str(root)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.tensor(image.getpixel((0, 0)), dtype=torch.float32)[:, None, None]


def _ids(samples: list[Any]) -> list[int]:
    return [int(s["image_id"]) for s in samples if s is not None]


def _augmented(image: Image.Image) -> torch.Tensor:
    return _to_tensor(image) + torch.rand(1)  # a random augmentation: resume must replay its draws


def _ids_and_pixels(samples: list[Any]) -> list[tuple[int, float]]:
    return [(int(s["image_id"]), float(s["image"][0, 0, 0])) for s in samples if s is not None]


def _epoch(dataset: Any, epoch: int, skip: int = 0, workers: int = 2, collate: Any = _ids) -> list[Any]:
    """The batches (lists of image ids) that a DataLoader with ``workers`` workers makes in one epoch."""
    from torch.utils.data import DataLoader

    dataset.set_epoch(epoch)
    drop = dataset.skip_batches(skip, max(1, workers))  # as the training loop does on resume
    # fork: under mp.spawn the workers would otherwise be spawned too, re-importing everything each epoch
    loader = DataLoader(dataset, batch_size=STREAM_BATCH, num_workers=workers, collate_fn=collate, drop_last=True,
                        multiprocessing_context="fork" if workers else None)
    return list(loader)[drop:]


# ------------------------------------------------------------------------------------------ the two ranks
def _worker(rank: int, out_dir: str, data: dict[str, str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    try:
        from vlp.data.streaming import HFStreamPairs, WebDatasetStream
        from vlp.eval.distributed import evaluate_vqa_sharded
        from vlp.eval.retrieval import evaluate_retrieval
        from vlp.train.distributed import DistInfo, wrap_model

        info = DistInfo(rank, rank, WORLD, torch.device("cpu"))
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        results: dict[str, Any] = {"itc": _itc_grads(rows, lambda objective: wrap_model(objective, info))}

        import vlp.losses.contrastive as contrastive
        from vlp.collectives import gather_no_grad

        def gather_local_grad_only(x: torch.Tensor) -> torch.Tensor:
            # the classic bug (open_clip's gather_with_grad=False): other ranks' rows carry no gradient
            gathered = gather_no_grad(x)
            return torch.cat([gathered[:rank * len(x)], x, gathered[(rank + 1) * len(x):]])

        real = contrastive.gather_with_grad
        contrastive.gather_with_grad = gather_local_grad_only
        try:
            results["itc_no_grad_gather"] = _itc_grads(rows, lambda objective: wrap_model(objective, info))
        finally:
            contrastive.gather_with_grad = real

        model = _model()
        for key, kwargs in RETRIEVAL_CASES.items():
            results[key] = evaluate_retrieval(model, _split(), model.image_transform(train=False),
                                              EvalConfig(**kwargs), progress=False)
        vqa_model, questions, load_image, vocab = _vqa_setup()
        results["vqa"] = evaluate_vqa_sharded(vqa_model, questions, load_image, vocab, batch_size=16, progress=False)

        stream = WebDatasetStream(data["even"], _augmented, STREAM_BATCH, shuffle_buffer=10)
        results["wds_epochs"] = [_epoch(stream, 0), _epoch(stream, 1)]
        results["wds_pixels"] = _epoch(stream, 1, collate=_ids_and_pixels)
        results["wds_resumed"] = [_epoch(stream, 1, skip=k, collate=_ids_and_pixels) for k in (3, 4)]
        results["wds_uneven"] = _epoch(WebDatasetStream(data["uneven"], _to_tensor, STREAM_BATCH), 0)
        hf = HFStreamPairs(data["hf"], _to_tensor, STREAM_BATCH, num_workers=2, shuffle_buffer=8)
        results["hf_epoch"] = _epoch(hf, 0)
        results["hf_resumed"] = _epoch(hf, 0, skip=3)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("ranks")
    data = {"even": _write_shards(out_dir / "even", WDS_SIZES),
            "uneven": _write_shards(out_dir / "uneven", WDS_UNEVEN), "hf": _write_hf(out_dir / "hf", 32)}
    mp.spawn(_worker, args=(str(out_dir), data), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


# ------------------------------------------------------------------------------------------ gradients
def _max_grad_error(result: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    return max(float((result[name] - reference[name]).abs().max()) for name in reference if name != "loss")


def test_ddp_itc_gradients_equal_a_single_process_on_the_global_batch(ranks: list[dict[str, Any]]) -> None:
    reference = _itc_grads(slice(0, WORLD * BATCH))
    assert len(reference) > 20  # both encoders, both projections and the temperature
    for result in ranks:
        # the global loss: the same number on every rank, the single-process value
        assert torch.allclose(result["itc"]["loss"], reference["loss"], atol=1e-5)
        assert _max_grad_error(result["itc"], reference) < 1e-5
    # DDP averaged the gradients: the ranks hold the same ones
    assert all(torch.equal(ranks[0]["itc"][name], ranks[1]["itc"][name]) for name in reference)


def test_a_gather_without_gradient_is_caught(ranks: list[dict[str, Any]]) -> None:
    reference = _itc_grads(slice(0, WORLD * BATCH))
    for result in ranks:
        assert torch.allclose(result["itc_no_grad_gather"]["loss"], reference["loss"], atol=1e-5)  # same forward
        assert _max_grad_error(result["itc_no_grad_gather"], reference) > 1e-3  # wrong gradients


# ------------------------------------------------------------------------------------------ evaluation
def test_sharded_retrieval_equals_a_single_process(ranks: list[dict[str, Any]]) -> None:
    from vlp.eval.retrieval import evaluate_retrieval

    model = _model()
    transform = model.image_transform(train=False)
    for key, kwargs in RETRIEVAL_CASES.items():
        single = evaluate_retrieval(model, _split(), transform, EvalConfig(**kwargs), progress=False)
        assert set(single) >= {"itc", "itm", "curves"}
        for result in ranks:
            assert result[key] == single, key


def test_sharded_vqa_equals_a_single_process(ranks: list[dict[str, Any]]) -> None:
    from vlp.eval.vqa import evaluate_vqa

    vqa_model, questions, load_image, vocab = _vqa_setup()
    predictions, metrics = evaluate_vqa(vqa_model, questions, load_image, vocab, batch_size=16, progress=False)
    assert metrics["num_questions"] == len(questions) > WORLD
    for result in ranks:
        assert result["vqa"] == (predictions, metrics)


# ------------------------------------------------------------------------------------------ streaming data
def test_webdataset_sees_every_sample_once_per_epoch(ranks: list[dict[str, Any]]) -> None:
    per_rank = sum(WDS_SIZES) // (STREAM_BATCH * WORLD)
    for epoch in range(2):
        batches = [result["wds_epochs"][epoch] for result in ranks]
        assert [len(b) for b in batches] == [per_rank] * WORLD
        seen = sorted(i for rank_batches in batches for batch in rank_batches for i in batch)
        assert seen == list(range(sum(WDS_SIZES)))
    assert ranks[0]["wds_epochs"][0] != ranks[0]["wds_epochs"][1]  # reshuffled per epoch


def test_uneven_shards_give_every_rank_the_same_number_of_batches(ranks: list[dict[str, Any]]) -> None:
    per_rank = sum(WDS_UNEVEN) // (STREAM_BATCH * WORLD)
    assert [len(result["wds_uneven"]) for result in ranks] == [per_rank] * WORLD
    assert all(len(batch) == STREAM_BATCH for result in ranks for batch in result["wds_uneven"])


def test_stream_resume_continues_with_the_same_batches(ranks: list[dict[str, Any]]) -> None:
    for result in ranks:
        assert [[i for i, _ in batch] for batch in result["wds_pixels"]] == result["wds_epochs"][1]
        # the same samples with the same random augmentation as an uninterrupted epoch
        assert result["wds_resumed"] == [result["wds_pixels"][3:], result["wds_pixels"][4:]]
        assert result["hf_resumed"] == result["hf_epoch"][3:]


def test_hf_iterable_sees_every_row_once(ranks: list[dict[str, Any]]) -> None:
    import zlib

    ids = {zlib.crc32(f"img{i}.png".encode()) & 0x7FFFFFFF for i in range(32)}  # the stream's image ids
    seen = [i for result in ranks for batch in result["hf_epoch"] for i in batch]
    assert [len(result["hf_epoch"]) for result in ranks] == [32 // (STREAM_BATCH * WORLD)] * WORLD
    assert sorted(seen) == sorted(ids)


# ------------------------------------------------------------------------------------------ torchrun CLI
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _torchrun(run_dir: Path, *overrides: str, resume: bool = False) -> None:
    """``vlp pretrain`` of albef_4m_tiny (ITC with momentum distillation and queue, ITM, MLM) on 2 ranks."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
               "--master_port", str(_free_port()), "-m", "vlp.cli.main", "pretrain", str(ALBEF_TINY),
               "--output-dir", str(run_dir)] + [arg for o in overrides for arg in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command + (["--resume"] if resume else []), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(directory / "model.safetensors"))


COMMON = ("train.max_steps=4", "train.checkpoint_every=2", "data.synthetic_train_size=48")


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 steps on 2 ranks, checkpoints at steps 2 and 4. 48 samples / (8 x 2 ranks) = 3 batches per epoch:
    a run resumed at step 2 crosses an epoch boundary."""
    run = tmp_path_factory.mktemp("torchrun") / "straight"
    _torchrun(run, *COMMON)
    return run


def test_torchrun_pretrain_then_exact_resume(straight: Path, tmp_path: Path) -> None:
    steps = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2, 3, 4]
    assert steps[0]["effective_batch_size"] == 8 * WORLD
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step_2", "step_4"]
    state = torch.load(straight / "checkpoints" / "step_2" / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == WORLD and len(state["rng_ranks"]) == WORLD
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])  # per-rank streams
    queue = safetensors.torch.load_file(str(straight / "checkpoints" / "step_2" / "objective.safetensors"))
    assert int(queue["queue.ptr"]) == (2 * 8 * WORLD) % 32  # the queue took both ranks' momentum features
    # a run that died after step 2 resumes from its checkpoint and ends with the same weights
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / "step_2", resumed / "checkpoints" / "step_2")
    _torchrun(resumed, *COMMON, resume=True)
    expected, got = _weights(straight / "final"), _weights(resumed / "final")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_torchrun_checkpoint_resumes_on_another_world_size(straight: Path, tmp_path: Path) -> None:
    from vlp.train.loop import pretrain

    run = tmp_path / "one_process"
    shutil.copytree(straight / "checkpoints" / "step_2", run / "checkpoints" / "step_2")
    checkpoint = _weights(run / "checkpoints" / "step_2")
    config = load_config(ALBEF_TINY, ["train.max_steps=3", "train.checkpoint_every=0", "data.synthetic_train_size=48"])
    pretrain(config, output_dir=run, resume=True)  # one process now: weights, optimizer, position carry over
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [3]
    state = torch.load(run / "checkpoints" / "step_3" / "trainer_state.pt", weights_only=True)
    # 2 batches of 8 on 2 ranks = the first 32 of the epoch's 48 samples: one process goes on with its 5th batch
    assert (state["epoch"], state["batches_in_epoch"]) == (0, 5)
    final = _weights(run / "final")
    assert any(not torch.equal(final[k], checkpoint[k]) for k in final)  # it trained on from the checkpoint


@pytest.mark.slow
def test_fsdp_matches_ddp_and_resumes_exactly(straight: Path, tmp_path: Path) -> None:
    _torchrun(tmp_path / "fsdp", *COMMON, "train.fsdp=true")
    ddp, fsdp = _weights(straight / "final"), _weights(tmp_path / "fsdp" / "final")
    assert ddp.keys() == fsdp.keys()  # full weights, tied ones included, in the usual checkpoint
    assert max(float((ddp[k] - fsdp[k]).abs().max()) for k in ddp) < 1e-5
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "fsdp" / "checkpoints" / "step_2", resumed / "checkpoints" / "step_2")
    _torchrun(resumed, *COMMON, "train.fsdp=true", resume=True)  # full optimizer state, loaded by name
    again = _weights(resumed / "final")
    assert all(torch.equal(fsdp[k], again[k]) for k in fsdp)
    VLPModel.from_pretrained(tmp_path / "fsdp" / "final")  # loads without FSDP
