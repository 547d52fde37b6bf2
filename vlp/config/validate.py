"""Checks of impossible values, run before any work starts; each failure names the key and value."""

from __future__ import annotations

import logging

from vlp.config.schema import RERANK_SCORES, Config, ModelConfig
from vlp.errors import ConfigError
from vlp.precision import PRECISIONS

__all__ = ["validate_config", "validate_model_config", "k_test_for_gallery"]

log = logging.getLogger("vlp")

# vlp.losses.negatives.NEGATIVE_EXCLUSIONS, spelled out so that checking a config imports no torch
NEGATIVE_EXCLUSIONS = ("shared_text", "text", "image_id", "pair")


def _require(ok: bool, key: str, value: object, why: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r}: {why}")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, key, value, f"expected one of {', '.join(allowed)}")


def k_test_for_gallery(k_test: int, num_images: int | None = None, num_texts: int | None = None,
                       name: str = "eval.k_test") -> int:
    """The one check of k_test (the ITC candidates the ITM head re-ranks per query), wherever it is given:
    config validation, the start of a training run, ``vlp eval retrieval`` and the evaluation itself.

    It must be positive (``name`` is the key or flag the error names). With a gallery (``num_images``
    images and ``num_texts`` captions) a larger value is clamped to the gallery with a one-line note: a
    small test set then re-ranks all its candidates instead of failing.
    """
    if k_test <= 0:
        where = f"config key '{name}'" if "." in name else name  # a key, or a flag or argument
        raise ConfigError(f"{where} = {k_test}: must be positive (the candidates re-ranked per query)")
    if num_images is None or num_texts is None:
        return k_test
    gallery = min(num_images, num_texts)
    if k_test > gallery:
        log.warning("%s %d is larger than the test gallery (%d images, %d captions): re-ranking the top %d "
                    "candidates instead", name, k_test, num_images, num_texts, gallery)
        return gallery
    return k_test


def conv_stem_fits_patch(patch_size: int) -> bool:
    """A stem of stride-2 convolutions reaches a patch size that is a power of 2, at least 4."""
    return patch_size >= 4 and (patch_size & (patch_size - 1)) == 0


def validate_model_config(model: ModelConfig, prefix: str = "model") -> None:
    img, txt, fus = model.image, model.text, model.fusion
    for key, value in [
        ("image.image_size", img.image_size), ("image.patch_size", img.patch_size),
        ("image.width", img.width), ("image.num_heads", img.num_heads),
        ("text.width", txt.width), ("text.num_heads", txt.num_heads),
        ("text.max_length", txt.max_length),
    ]:
        _require(value > 0, f"{prefix}.{key}", value, "must be positive")
    # depth 0 = embeddings only (ViLT feeds patch and word embeddings straight into the fusion)
    _require(img.depth >= 0, f"{prefix}.image.depth", img.depth, "must be >= 0")
    _require(txt.depth >= 0, f"{prefix}.text.depth", txt.depth, "must be >= 0")
    _choice(f"{prefix}.fusion.init", fus.init, ("xavier", "bert"))  # vlp.layers.FUSION_INITS, without torch
    if img.type == "vit":
        _require(img.width % img.num_heads == 0, f"{prefix}.image.num_heads", img.num_heads,
                 f"image width {img.width} is not divisible by it")
        _require(img.image_size % img.patch_size == 0, f"{prefix}.image.patch_size", img.patch_size,
                 f"image_size {img.image_size} is not divisible by it")
        _choice(f"{prefix}.image.patch_embed", img.patch_embed, ("patch", "conv_stem"))  # vlp.encoders.vit
        if img.patch_embed == "conv_stem":
            _require(conv_stem_fits_patch(img.patch_size), f"{prefix}.image.patch_size", img.patch_size,
                     "conv_stem needs a power of 2, at least 4")
            _require(img.width % max(img.patch_size // 2, 1) == 0, f"{prefix}.image.width", img.width,
                     f"conv_stem needs it divisible by patch_size / 2 = {img.patch_size // 2}")
    else:
        _require(img.patch_embed == "patch", f"{prefix}.image.patch_embed", img.patch_embed,
                 "applies to the native vit encoder only")
    if txt.type == "transformer":
        _require(txt.width % txt.num_heads == 0, f"{prefix}.text.num_heads", txt.num_heads,
                 f"text width {txt.width} is not divisible by it")
    _choice(f"{prefix}.text.pooling", txt.pooling, ("cls", "eos", "mean"))
    _choice(f"{prefix}.contrastive", model.contrastive, ("itc", "siglip"))
    _require(model.embed_dim >= 0, f"{prefix}.embed_dim", model.embed_dim, "must be >= 0")
    _require(0 < model.temperature_min <= model.temperature <= model.temperature_max,
             f"{prefix}.temperature", model.temperature, "must lie in [temperature_min, temperature_max] and be > 0")
    if fus.type != "none":
        _require(fus.depth > 0, f"{prefix}.fusion.depth", fus.depth, "must be positive")
        _require(fus.num_heads > 0, f"{prefix}.fusion.num_heads", fus.num_heads, "must be positive")
        if txt.type == "transformer":
            _require(txt.width % fus.num_heads == 0, f"{prefix}.fusion.num_heads", fus.num_heads,
                     f"fusion width {txt.width} is not divisible by it")
    else:
        _require(not model.mlm_head, f"{prefix}.mlm_head", model.mlm_head, "MLM needs a fusion block")
    if model.mlm_head:
        _require(not txt.causal, f"{prefix}.text.causal", txt.causal, "MLM needs bidirectional text layers")


def validate_config(config: Config) -> None:
    validate_model_config(config.model)
    o, d, op, s, t, e = config.objective, config.data, config.optim, config.schedule, config.train, config.eval
    _require(op.lr > 0, "optim.lr", op.lr, "must be positive")
    _require(op.base_batch_size >= 0, "optim.base_batch_size", op.base_batch_size, "must be >= 0 (0 = lr as given)")
    _choice("optim.lr_scaling", op.lr_scaling, ("linear", "sqrt", "none"))
    _require(op.weight_decay >= 0, "optim.weight_decay", op.weight_decay, "must be >= 0")
    _require(op.grad_clip >= 0, "optim.grad_clip", op.grad_clip, "must be >= 0")
    for key, value in (("optim.image_layer_decay", op.image_layer_decay), ("optim.text_layer_decay", op.text_layer_decay)):
        _require(0 < value <= 1, key, value, "must be in (0, 1] (1 = no layer-wise decay)")
    _require(len(op.betas) == 2 and all(0 <= b < 1 for b in op.betas), "optim.betas", list(op.betas),
             "expected two values in [0, 1)")
    _choice("schedule.type", s.type, ("cosine", "constant"))
    _require(s.warmup_steps >= 0, "schedule.warmup_steps", s.warmup_steps, "must be >= 0")
    _require(0 <= s.min_lr_ratio <= 1, "schedule.min_lr_ratio", s.min_lr_ratio, "must be in [0, 1]")
    _require(d.batch_size > 0, "data.batch_size", d.batch_size, "must be positive")
    _require(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    _require(d.worker_timeout >= 0, "data.worker_timeout", d.worker_timeout, "must be >= 0 (0 = no limit)")
    _require(0 <= d.max_bad_fraction <= 1, "data.max_bad_fraction", d.max_bad_fraction, "must be in [0, 1]")
    _require(len(d.csv_separator) == 1 or d.csv_separator == "\\t", "data.csv_separator", d.csv_separator,
             "must be one character (a tab: \"\\t\" in YAML)")
    _require(bool(d.csv_image_key), "data.csv_image_key", d.csv_image_key, "must name a column")
    _require(bool(d.csv_caption_key), "data.csv_caption_key", d.csv_caption_key, "must name a column")
    _require(len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1, "data.crop_scale",
             list(d.crop_scale), "expected [min, max] within (0, 1]")
    _require(t.max_steps > 0, "train.max_steps", t.max_steps, "must be positive")
    _require(t.epochs >= 0, "train.epochs", t.epochs, "must be >= 0 (0 = train.max_steps)")
    _require(0 <= d.max_unk_fraction <= 1, "data.max_unk_fraction", d.max_unk_fraction, "must be in [0, 1]")
    _require(t.grad_accum > 0, "train.grad_accum", t.grad_accum, "must be positive")
    _choice("train.precision", t.precision, ("fp32", "bf16"))
    _choice("train.device", t.device, ("auto", "cpu", "cuda"))
    _require(t.checkpoint_every >= 0, "train.checkpoint_every", t.checkpoint_every, "must be >= 0")
    _require(t.keep_last > 0, "train.keep_last", t.keep_last, "must be positive")
    _require(t.log_every > 0, "train.log_every", t.log_every, "must be positive")
    _require(t.contrastive_chunk_size >= 0, "train.contrastive_chunk_size", t.contrastive_chunk_size, "must be >= 0")
    _require(t.init_image_size >= 0, "train.init_image_size", t.init_image_size, "must be >= 0 (0 = the checkpoint's)")
    for key, value, frozen in (("freeze_image_unlocked_groups", t.freeze_image_unlocked_groups, t.freeze_image),
                               ("freeze_text_unlocked_layers", t.freeze_text_unlocked_layers, t.freeze_text)):
        _require(value >= 0, f"train.{key}", value, "must be >= 0")
        _require(value == 0 or frozen, f"train.{key}", value,
                 f"needs train.freeze_{key.split('_')[1]}: true (it unlocks part of a frozen tower)")
    _require(0 <= t.ema_decay < 1, "train.ema_decay", t.ema_decay, "must be in [0, 1) (0 = no weight EMA)")
    _require(t.ema_every > 0, "train.ema_every", t.ema_every, "must be positive")
    _require(t.ema_start_step >= 0, "train.ema_start_step", t.ema_start_step, "must be >= 0")
    _require(t.ema_warmup_gamma > 0, "train.ema_warmup_gamma", t.ema_warmup_gamma, "must be positive")
    _require(t.ema_warmup_power > 0, "train.ema_warmup_power", t.ema_warmup_power, "must be positive")
    _require(0 <= t.ema_min_decay < 1, "train.ema_min_decay", t.ema_min_decay, "must be in [0, 1)")
    _require(t.ema_decay == 0 or t.lora_rank == 0, "train.ema_decay", t.ema_decay,
             "a weight EMA with train.lora_rank > 0 is not supported (final/ merges the adapters)")
    _require(o.itc_weight >= 0 and o.itm_weight >= 0 and o.mlm_weight >= 0, "objective", "weights",
             "loss weights must be >= 0")
    _require(0 < o.mlm_probability < 1, "objective.mlm_probability", o.mlm_probability, "must be in (0, 1)")
    _require(0 <= o.momentum < 1, "objective.momentum", o.momentum, "must be in [0, 1)")
    _require(o.queue_size >= 0, "objective.queue_size", o.queue_size, "must be >= 0")
    _require(o.itm_negative_pool >= 0, "objective.itm_negative_pool", o.itm_negative_pool, "must be >= 0")
    _require(o.itm_pool_start >= 0, "objective.itm_pool_start", o.itm_pool_start, "must be >= 0")
    _choice("objective.negative_exclusion", o.negative_exclusion, NEGATIVE_EXCLUSIONS)
    _require(not (o.itc_text_positives and o.momentum > 0), "objective.itc_text_positives", o.itc_text_positives,
             "is not supported with objective.momentum > 0 (the feature queue keeps image ids only)")
    _require(o.queue_size == 0 or o.momentum > 0, "objective.queue_size", o.queue_size,
             "a feature queue needs objective.momentum > 0")
    _require(0 <= o.patch_dropout < 1, "objective.patch_dropout", o.patch_dropout, "must be in [0, 1)")
    _require(o.teacher_weight >= 0, "objective.teacher_weight", o.teacher_weight, "must be >= 0")
    _require(not o.distill_from or config.model.contrastive == "itc", "objective.distill_from", o.distill_from,
             "teacher distillation needs the softmax ITC (model.contrastive: itc), not SigLIP")
    if config.model.fusion.type == "none":
        _require(o.itm_weight == 0 or not config.model.itm_head, "objective.itm_weight", o.itm_weight,
                 "ITM needs a fusion block (leave it out: it then follows the model; or set it to 0)")
        _require(o.mlm_weight == 0, "objective.mlm_weight", o.mlm_weight, "MLM needs a fusion block")
        _require(o.itm_negative_pool == 0, "objective.itm_negative_pool", o.itm_negative_pool,
                 "the ITM negative pool needs ITM, which needs a fusion block")
    if o.mlm_weight > 0:
        _require(config.model.mlm_head, "objective.mlm_weight", o.mlm_weight, "needs model.mlm_head: true")
    k_test_for_gallery(e.k_test)
    _choice("eval.score", e.score, RERANK_SCORES)
    _choice("eval.precision", e.precision, PRECISIONS)
    _choice("eval.weights", e.weights, ("online", "ema", "both"))
    _choice("vqa.head_input", config.vqa.head_input, ("fused", "fused+image"))
    _require(e.batch_size > 0, "eval.batch_size", e.batch_size, "must be positive")
    _require(e.zeroshot_every >= -1, "eval.zeroshot_every", e.zeroshot_every, "must be >= -1 (-1 = never, 0 = at the end)")
    _require(not e.zeroshot or bool(e.zeroshot_classes), "eval.zeroshot_classes", e.zeroshot_classes,
             "eval.zeroshot needs the JSON list of its class names")
