"""The pretraining loop: accumulation, clipping, AdamW + schedule, checkpoints, metrics, periodic eval.

``pretrain(config)`` is the Python entry point behind ``vlp pretrain``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

from vlp.collectives import mean_over_ranks
from vlp.config.io import save_config, to_dict
from vlp.config.schema import Config
from vlp.errors import UserError
from vlp.models import VLPModel, build_model
from vlp.objectives import PretrainObjective
from vlp.runtime import tune_allocator
from vlp.train import checkpoint as ckpt
from vlp.train import ema as weight_ema
from vlp.train import faults, layer_decay
from vlp.train.distributed import (
    DistInfo,
    cleanup,
    equal_rows,
    full_state_dicts,
    init_distributed,
)
from vlp.train.eval_data import evaluation_due, run_evaluator
from vlp.train.faults import TrainingStopped
from vlp.train.metrics import MetricsLogger, TermWindow, plot_metrics
from vlp.train.optim import build_optimizer, lr_summary, scaled_lr
from vlp.train.run_dir import prepare_run_dir
from vlp.train.sampler import ResumableSampler, SeededDataset
from vlp.train.schedule import build_scheduler, steps_for_epochs
from vlp.train.seeding import seed_everything
from vlp.train.state import TrainingJob, TrainState
from vlp.train.trainer_state import TrainerSaver, restore_trainer

__all__ = ["pretrain", "run_training", "TrainingJob", "autocast_factory", "run_dir_for", "load_model_weights",
           "TrainingStopped"]

log = logging.getLogger("vlp")


def run_dir_for(config: Config, output_dir: str | Path | None) -> Path:
    return Path(output_dir) if output_dir else Path("runs") / config.name


def autocast_factory(precision: str, device: torch.device) -> Callable[[], AbstractContextManager[Any]]:
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def prepare_model(config: Config, model: VLPModel) -> VLPModel:
    """Freezing, LoRA and activation checkpointing as the train section asks."""
    t = config.train
    from vlp.train.tower_layers import lock_tower

    # vlp's projection is the tower's last group, never frozen here: the encoder keeps N - 1 groups
    if t.freeze_image:
        lock_tower(model.image_encoder, max(0, t.freeze_image_unlocked_groups - 1), "train.freeze_image_unlocked_groups")
    if t.freeze_text:
        lock_tower(model.text_encoder, max(0, t.freeze_text_unlocked_layers - 1), "train.freeze_text_unlocked_layers")
    if t.lora_rank > 0 and model.fusion is not None:
        from vlp.train.lora import apply_lora

        apply_lora(model.fusion, t.lora_rank)
    if t.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def build_loader(config: Config, model: VLPModel, dist: DistInfo) -> tuple[DataLoader[Any], Any, ResumableSampler | None]:
    from vlp.data.collate import Collator
    from vlp.data.datasets import build_pretrain_dataset
    from vlp.data.transforms import train_transform

    d = config.data
    enc = model.image_encoder
    transform = train_transform(enc.image_size, enc.mean, enc.std, crop_scale=tuple(d.crop_scale), hflip=d.hflip)
    dataset = build_pretrain_dataset(d, transform, enc.image_size)
    reporter: Any = dataset if hasattr(dataset, "take_bad") else None
    if reporter is not None:
        reporter.log_bad = False  # the paths come back with the batches: the loop logs each once
    collate = Collator(model.tokenizer, model.config.text.max_length, bad_source=reporter)
    kwargs: dict[str, Any] = dict(batch_size=d.batch_size, collate_fn=collate, num_workers=d.num_workers,
                                  pin_memory=dist.device.type == "cuda", drop_last=True,
                                  timeout=d.worker_timeout if d.num_workers > 0 else 0,
                                  # its own generator: creating an iterator must not draw from the global RNG
                                  generator=torch.Generator().manual_seed(config.train.seed))
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, **kwargs), dataset, None
    seeded = SeededDataset(dataset, config.train.seed)
    if len(seeded) < d.batch_size * dist.world_size:
        raise UserError(f"data.batch_size {d.batch_size} x {dist.world_size} process(es) exceeds the "
                        f"{len(seeded)} training samples")
    sampler = ResumableSampler(len(seeded), config.train.seed, dist.rank, dist.world_size, d.batch_size)
    return DataLoader(seeded, sampler=sampler, **kwargs), seeded, sampler


def batches(loader: DataLoader[Any], dataset: Any, sampler: ResumableSampler | None, state: TrainState) -> Iterator[Any]:
    """Endless batches across epochs, starting at the saved position (exact for map-style data;
    skip-by-count for streaming data)."""
    skip = state.batches_in_epoch
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(state.epoch)
        drop = 0 if sampler is not None else skip  # batches to read and discard here
        if sampler is not None:
            sampler.set_epoch(state.epoch, start=skip * loader.batch_size)  # type: ignore[operator]
        elif hasattr(dataset, "skip_batches"):  # streams skip whole rounds undecoded (vlp/data/streaming.py)
            drop = dataset.skip_batches(skip, max(1, loader.num_workers))
        produced = readable = False
        for i, batch in enumerate(loader):
            if i < drop:
                continue
            produced = True
            readable = readable or len(batch.get("images", (None,))) > 0
            yield batch
        if skip == 0:
            faults.check_epoch(produced, readable, state)
        state.epoch += 1
        state.batches_in_epoch = 0
        skip = 0


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def pretrain(config: Config, output_dir: str | Path | None = None, resume: bool = False,
             model: VLPModel | None = None, overwrite: bool = False) -> Path:
    """Run pretraining (or retrieval fine-tuning of ``model``) as ``config`` says; returns the run directory.

    A run directory that already holds a run is continued with ``resume``, replaced with ``overwrite``, and
    otherwise refused (vlp.train.run_dir)."""
    tune_allocator()
    dist = init_distributed(config.train.device)
    run_dir = run_dir_for(config, output_dir)
    prepare_run_dir(run_dir, resume, overwrite, dist)
    faults.check_vocabulary(config, finetuning=model is not None)
    seed_everything(config.train.seed)
    model = prepare_model(config, model if model is not None else build_model(config.model)).to(dist.device)
    autocast = autocast_factory(config.train.precision, dist.device)
    objective = PretrainObjective(model, config.objective, autocast=autocast,
                                  chunk_size=config.train.contrastive_chunk_size).to(dist.device)
    loader, dataset, sampler = build_loader(config, model, dist)
    evaluate = run_evaluator(config, model, run_dir, dist)

    def save_weights(directory: Path) -> None:
        model.save_pretrained(directory, {"run": to_dict(config)})
        extra = objective.extra_state_dict()
        if extra:
            ckpt.save_tensors(directory / "objective.safetensors", extra)

    def load_weights(directory: Path) -> None:
        load_model_weights(model, directory / "model.safetensors", dist.device)
        extra_path = directory / "objective.safetensors"
        if extra_path.is_file():
            objective.load_extra_state_dict({k: v.to(dist.device) for k, v in ckpt.load_tensors(extra_path).items()})

    job = TrainingJob(model, objective, loader, dataset, sampler, save_weights, load_weights, evaluate)
    return run_training(config, job, run_dir, dist, resume)


def _final_writer(config: Config, job: TrainingJob) -> Callable[[Path], None]:
    """final/ is a plain checkpoint: LoRA adapters are merged into their base weights first (training is
    over and the last step_N checkpoint, with the adapters, is already written)."""
    if config.train.lora_rank <= 0:
        return job.save_weights

    def write(directory: Path) -> None:
        from vlp.train.lora import merge_lora

        merge_lora(job.module)
        job.save_weights(directory)

    return write


def load_model_weights(model: nn.Module, path: Path, device: torch.device) -> None:
    """Resume/init weights; a file that does not fit the model names the tensors (one line)."""
    from vlp.models.persist import load_weights_file

    load_weights_file(model, path, str(device))


def run_training(config: Config, job: TrainingJob, run_dir: Path, dist: DistInfo, resume: bool) -> Path:
    """The generic loop: accumulation, clipping, optimizer + schedule, checkpoints, metrics, evaluation."""
    if config.train.device == "cuda" and dist.device.type != "cuda":
        raise UserError("train.device is cuda but no CUDA device is available")
    if config.train.epochs > 0:  # recorded in config.yaml as the max_steps it resolves to
        steps = steps_for_epochs(config.train.epochs, job.loader, config.train.grad_accum)
        log.info("train.epochs %d: %d optimizer steps (%d batches per epoch)", config.train.epochs, steps,
                 len(job.loader))
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, max_steps=steps))
    ckpt_root = run_dir / "checkpoints"
    main = dist.rank == 0
    if main:
        (run_dir / "plots").mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    if dist.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    objective, module = job.objective, job.module
    latest = ckpt.resumable_checkpoint(ckpt_root) if resume else None
    if resume and latest is None and main:
        log.warning("--resume: no complete checkpoint in %s, starting from scratch", ckpt_root)
    if latest is not None:
        job.load_weights(latest)  # before wrapping: FSDP shards the loaded weights, DDP broadcasts rank 0's
    from vlp.train.distributed import parallelize

    objective.set_engine(parallelize(objective, dist, config.train.fsdp, config.train.compile, config.train.seed))
    if config.train.fsdp and dist.world_size > 1 and job.evaluate is not None:
        # evaluation calls sub-modules directly, outside FSDP's root forward: not supported in the loop
        log.warning("train.fsdp: no evaluation during training; run 'vlp eval' on the final/ checkpoint")
        job.evaluate = None
    ema = weight_ema.build_ema(config.train, module)  # after wrapping: under FSDP it averages the shards
    if ema is not None and latest is not None:
        weight_ema.restore_ema(ema, latest)

    effective = config.data.batch_size * config.train.grad_accum * dist.world_size
    lr = scaled_lr(config.optim.lr, config.optim.base_batch_size, effective, config.optim.lr_scaling)
    optimizer = build_optimizer(module, config.optim, lr, dist.device.type)
    scheduler = build_scheduler(optimizer, config.schedule, config.train.max_steps)
    state = TrainState()
    if latest is not None:
        restore_trainer(latest, optimizer, scheduler, state, objective, dist, config)

    metrics = MetricsLogger(run_dir, enabled=main, tensorboard=config.train.tensorboard)
    if main:
        log.info(lr_summary(config.optim, effective, lr))
        _warn_coupled_clipping(config, job.objective)
    if main and state.step == 0:
        metrics.log({"step": 0, "lr_scaled": lr, "lr_given": config.optim.lr, "effective_batch_size": effective,
                     **layer_decay.decay_record(config.optim, optimizer)})
    stop = faults.StopFlag()
    data_iter = batches(job.loader, job.dataset, job.sampler, state)
    bar = tqdm(total=config.train.max_steps, initial=state.step, disable=not (main and config.train.progress),
               desc=f"{config.name}", dynamic_ncols=True)
    window_start, window_samples, window_terms = time.perf_counter(), 0, TermWindow()
    saver = TrainerSaver(config, ckpt_root, job, optimizer, scheduler, state, dist, ema)
    try:
        while state.step < config.train.max_steps:
            module.train()
            terms_sum: dict[str, float] = {}
            micro = 0
            while micro < config.train.grad_accum:
                batch = _to_device(next(data_iter), dist.device)
                state.batches_in_epoch += 1
                faults.note_data(batch, state)
                batch = equal_rows(batch)  # gathers need one batch size on all ranks: cut to the smallest
                if batch["images"].shape[0] == 0:  # every sample of the batch was unreadable
                    faults.check_bad_data(config, state)
                    continue
                micro += 1
                out = objective.training_step(batch, scale=1.0 / config.train.grad_accum)
                for key, value in out.terms.items():
                    terms_sum[key] = terms_sum.get(key, 0.0) + float(value) / config.train.grad_accum
                terms_sum["loss"] = terms_sum.get("loss", 0.0) + float(out.total) / config.train.grad_accum
                window_samples += batch["images"].shape[0] * dist.world_size
            state.loss_finite = not faults.any_rank(dist, not math.isfinite(terms_sum.get("loss", 0.0)))
            window_terms.add(terms_sum, state.loss_finite)
            if _optimizer_step(config, module, optimizer, state):
                scheduler.step()
                objective.after_optimizer_step()
                if ema is not None:
                    ema.update(state.step + 1)
            else:
                faults.check_nonfinite(config, state, ckpt_root)
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.samples_seen += effective
            bar.update(1)
            if state.step % config.train.log_every == 0 or state.step == config.train.max_steps:
                elapsed = time.perf_counter() - window_start
                terms_sum = mean_over_ranks(window_terms.mean(), dist.device)  # ITM/MLM terms are per-rank means
                record = {"step": state.step, "epoch": state.epoch,
                          "lr": scheduler.get_last_lr()[layer_decay.full_lr_index(optimizer)],
                          "samples_per_s": window_samples / max(elapsed, 1e-9),
                          **faults.data_counts(state, dist), "nonfinite_steps": state.nonfinite_total,
                          **_gradient_record(state), **terms_sum}
                if ema is not None:
                    record["ema_decay"] = ema.last_decay
                metrics.log(record)
                bar.set_postfix(loss=f"{terms_sum['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                sps=f"{record['samples_per_s']:.0f}")
                window_start, window_samples = time.perf_counter(), 0
            faults.check_bad_data(config, state)
            faults.check_unknown_tokens(config, state, dist)
            every = config.train.checkpoint_every
            stop_now = faults.any_rank(dist, stop.requested)
            if stop_now or (every and state.step % every == 0 and state.step < config.train.max_steps):
                saved = saver.save()
                if stop_now:
                    raise stop.stopped(state.step, saved)
            if job.evaluate is not None and state.step < config.train.max_steps and evaluation_due(config, state.step):
                # every rank: its shard
                metrics.log({"step": state.step, **weight_ema.evaluate(job.evaluate, ema, config, run_dir, state.step, False)})
                window_start = time.perf_counter()
        saver.save()
        with full_state_dicts(objective):
            if main:
                ckpt.write_atomic(run_dir / "final", _final_writer(config, job))
        if ema is not None:  # final_ema/: the same checkpoint with the averaged weights
            with ema.swapped_into(), full_state_dicts(objective):
                if main:
                    ckpt.write_atomic(run_dir / "final_ema", _final_writer(config, job))
        if job.evaluate is not None and evaluation_due(config, state.step, final=True):
            metrics.log({"step": state.step, **weight_ema.evaluate(job.evaluate, ema, config, run_dir, state.step, True)})
    except RuntimeError as err:  # a dead data loader worker is a clean stop, anything else a bug
        stopped = faults.worker_death(err, state.step)
        if stopped is None:
            raise
        raise stopped from err
    finally:
        bar.close()
        stop.restore()
        metrics.close()
    if main:
        plot_metrics(run_dir)
    cleanup()
    return run_dir


def _optimizer_step(config: Config, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState) -> bool:
    """Clip and step; a non-finite loss or gradient norm skips the step (counted; the loop stops after N in a row)."""
    params = [p for p in model.parameters() if p.grad is not None]
    clip = config.optim.grad_clip if config.optim.grad_clip > 0 else math.inf
    norm = torch.nn.utils.clip_grad_norm_(params, clip) if params else torch.tensor(0.0)
    if not faults.step_is_finite(state, norm):
        return False
    value = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP2
    state.window_grad_norm += value
    state.window_clipped += int(value > clip)
    state.window_steps += 1
    optimizer.step()
    return True


def _warn_coupled_clipping(config: Config, objective: Any) -> None:
    """Global-norm clipping with ITM beside a contrastive loss: say what it does to the ITM-only parts."""
    if config.optim.grad_clip > 0 and getattr(objective, "use_itm", False) and config.objective.itc_weight > 0:
        log.warning("optim.grad_clip %g clips the global gradient norm: once the contrastive gradient's norm is "
                    "far above it, the fusion and ITM head (trained by ITM alone) take steps shrunk by the same "
                    "factor and ITM can stay at its label prior (ALBEF and BLIP pretrain without clipping: "
                    "optim.grad_clip 0); grad_norm and grad_clipped_fraction are in metrics.jsonl",
                    config.optim.grad_clip)


def _gradient_record(state: TrainState) -> dict[str, float]:
    """The logging window's mean pre-clip gradient norm and the fraction of its steps that were clipped;
    resets the window. Global-norm clipping scales every parameter's step by the same factor, so a large
    contrastive gradient also shrinks the steps of the parts only ITM trains (fusion, ITM head)."""
    steps = max(state.window_steps, 1)
    record = {"grad_norm": state.window_grad_norm / steps, "grad_clipped_fraction": state.window_clipped / steps}
    state.window_grad_norm, state.window_clipped, state.window_steps = 0.0, 0, 0
    return record
