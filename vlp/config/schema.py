"""Frozen dataclass configs mirrored by YAML. Every field carries its documentation in ``metadata["doc"]``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlp.precision import DEFAULT_PRECISION

__all__ = [
    "ImageEncoderConfig",
    "TextEncoderConfig",
    "FusionConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "DataConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "EvalConfig",
    "VQAConfig",
    "Config",
]


def doc(default: Any, text: str) -> Any:
    """A dataclass field with a default and its documentation (used by the generated reference)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


def section(cls: type, text: str) -> Any:
    return field(default_factory=cls, metadata={"doc": text})


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageEncoderConfig:
    type: str = doc("vit", "Image encoder registry name: vit (native), timm, open_clip.")
    name: str = doc("", "timm model name (e.g. vit_base_patch16_224) or open_clip model name (e.g. ViT-B-16).")
    weights: str = doc("", "Local weights file (.safetensors, .pt, .bin); empty = random init. Never downloads.")
    image_size: int = doc(224, "Input resolution (square).")
    patch_size: int = doc(16, "Patch size (native ViT; passed to timm/open_clip when they accept it).")
    patch_embed: str = doc("patch", "Native ViT patch embedding: patch (one convolution, kernel = stride = patch_size, as ViT) or conv_stem (log2(patch_size) 3x3 stride-2 convolutions, channels doubling up to width, BatchNorm and ReLU between them: timm's ConvStem, after Xiao et al. 2021, 'Early convolutions help transformers see better'; patch_size a power of 2, at least 4).")
    width: int = doc(768, "Token width of the native ViT.")
    depth: int = doc(12, "Number of transformer blocks of the native ViT.")
    num_heads: int = doc(12, "Attention heads of the native ViT.")
    mlp_ratio: float = doc(4.0, "MLP hidden width / token width.")
    dropout: float = doc(0.0, "Dropout inside the encoder.")
    layer_norm_eps: float = doc(1e-6, "LayerNorm epsilon of the native ViT (BLIP's Hugging Face vision tower: 1e-5).")
    mean: tuple[float, ...] = doc(CLIP_MEAN, "Per-channel normalization mean (stored with every checkpoint).")
    std: tuple[float, ...] = doc(CLIP_STD, "Per-channel normalization std.")
    options: dict[str, Any] = doc({}, "Extra keyword arguments: timm.create_model kwargs, or open_clip vision_cfg overrides.")


@dataclass(frozen=True)
class TextEncoderConfig:
    type: str = doc("transformer", "Text encoder registry name: transformer (native), hf, open_clip.")
    name: str = doc("", "hf: a local model directory (config, weights, tokenizer); open_clip: model name.")
    weights: str = doc("", "Local weights file for open_clip; empty = random init. Never downloads.")
    tokenizer: str = doc("synthetic", "Tokenizer: 'synthetic' (word vocabulary of the embedded dataset), 'clip' (open_clip's bundled BPE), or a local path (tokenizer.json or a Hugging Face tokenizer directory).")
    vocab_size: int = doc(0, "Embedding rows; 0 = the tokenizer's vocabulary size.")
    width: int = doc(768, "Token width of the native text transformer.")
    depth: int = doc(12, "Number of transformer blocks of the native text transformer.")
    num_heads: int = doc(12, "Attention heads of the native text transformer.")
    mlp_ratio: float = doc(4.0, "MLP hidden width / token width.")
    max_length: int = doc(64, "Maximum tokens per caption (longer captions are truncated).")
    dropout: float = doc(0.0, "Dropout inside the encoder.")
    causal: bool = doc(False, "Causal self-attention (CLIP text tower); MLM needs bidirectional layers.")
    pooling: str = doc("cls", "Pooled embedding: cls (first token), eos (last real token, as CLIP), mean.")
    fusion_first_token: str = doc("", "native transformer of depth 0 only: this token replaces the first token of the text given to the fusion (BLIP's [ENC]: ITM reads an [ENC] state, ITC the [CLS] state); empty = unchanged.")
    options: dict[str, Any] = doc({}, "hf: a BertConfig dict for a random model when name is empty; open_clip: text_cfg overrides.")


@dataclass(frozen=True)
class FusionConfig:
    type: str = doc("none", "Fusion registry name: none (dual encoder), single_stream (ViLT), dual_stream (ALBEF/METER).")
    depth: int = doc(6, "Number of fusion layers.")
    num_heads: int = doc(12, "Attention heads per fusion layer; the text width must divide by it.")
    mlp_ratio: float = doc(4.0, "MLP hidden width / token width.")
    dropout: float = doc(0.0, "Dropout inside fusion layers.")
    init: str = doc("xavier", "Initialization of a fusion block built from scratch: xavier (Xavier-uniform linear weights, as MAE and timm's jax ViT init) or bert (truncated normal std 0.02, BERT/ALBEF's rule, whose small gain below width 768 lets a random cross-attention change the [CLS] state the match head reads by little: swapping the demo model's image at init moves 0.6% of its norm, 9% with xavier). Loaded or converted weights replace it.")
    update_image: bool = doc(False, "dual_stream only: False = ALBEF one-way (text attends to image); True = METER co-attention.")
    image_width: int = doc(0, "dual_stream one-way only: width of the image tokens the cross-attention reads, its keys and values projecting from it directly (BLIP large: 1024 into a 768 text stream); 0 = the text width (image tokens are projected to it first).")
    share_text_layers: bool = doc(False, "dual_stream one-way only (BLIP): the text encoder (native transformer, depth 0) runs these layers without cross-attention for its own embedding, so one BERT stack serves ITC (text only) and ITM (with the image).")


@dataclass(frozen=True)
class ModelConfig:
    name: str = doc("", "Preset name, recorded in checkpoints.")
    image: ImageEncoderConfig = section(ImageEncoderConfig, "Image encoder.")
    text: TextEncoderConfig = section(TextEncoderConfig, "Text encoder.")
    fusion: FusionConfig = section(FusionConfig, "Fusion block stack.")
    embed_dim: int = doc(256, "Contrastive embedding width (linear projections); 0 = use the encoders' own pooled embeddings.")
    contrastive: str = doc("itc", "Contrastive loss: itc (softmax InfoNCE) or siglip (sigmoid).")
    temperature: float = doc(0.07, "Initial softmax temperature (logit scale = 1/temperature).")
    temperature_min: float = doc(0.01, "Lower clamp of the temperature (open_clip: 0.01, i.e. scale <= 100; ALBEF: 0.001).")
    temperature_max: float = doc(100.0, "Upper clamp of the temperature (ALBEF: 0.5).")
    learn_temperature: bool = doc(True, "Learn the temperature (log scale parameter).")
    siglip_bias: float = doc(-10.0, "Initial SigLIP logit bias.")
    itm_head: bool = doc(True, "Add the image-text matching head (needs fusion).")
    mlm_head: bool = doc(False, "Add the masked-language-modeling head (needs fusion and bidirectional text).")


@dataclass(frozen=True)
class ObjectiveConfig:
    itc_weight: float = doc(1.0, "Weight of the contrastive term.")
    itm_weight: float = doc(1.0, "Weight of the matching term (0 disables ITM). Follows the model when a YAML config leaves it out: 1 with a fusion block and model.itm_head, else 0 (a dual encoder needs no objective section).")
    mlm_weight: float = doc(0.0, "Weight of the MLM term (0 disables MLM).")
    mlm_probability: float = doc(0.15, "Fraction of real, non-special tokens selected for MLM (80/10/10).")
    hard_negatives: bool = doc(True, "Sample ITM negatives from the softmaxed contrastive similarities (else uniformly).")
    negative_exclusion: str = doc("text", "Which batch columns may never be an ITM negative: text (default: the pair, the same image id, and any caption equal to the positive's after open_clip's canonicalization or with the same truncated token ids; for image negatives, any image with such a caption), shared_text (text, and a caption that is also another image's among the candidates, such as an alt-text 'logo' or a class-level 'a red circle', is never a negative text and its row draws no negative image: any image may fit it), image_id (the pair and the same image id: ALBEF's retrieval fine-tuning) or pair (only the pair itself: ALBEF's pretraining).")
    negative_margin: float = doc(-1.0, "Also never draw an ITM negative whose contrastive similarity exceeds the positive's by more than this (cosine units; likely unlabelled positives); < 0 disables.")
    itm_negative_pool: int = doc(0, "ITM hard negatives are also mined from this rank's last N training pairs (their raw images and token ids are kept; the drawn ones are re-encoded by the current towers without gradient, so they train the fusion block and the ITM head). A batch rarely holds the near-duplicates that ITM re-ranking must separate among ITC's top k of a large gallery. The negative rules apply to pool rows too (same image id, same text). Kept in objective.safetensors for exact resume (N images' worth of memory). 0 = the batch only (ALBEF).")
    itm_pool_start: int = doc(0, "Optimizer steps mined from the batch alone before the negative pool is used: a match head that meets the pool's harder negatives from the start may stay at its label prior (measured on the demo: 340+ steps at 0.63 from step 1, none from step 400).")
    itc_text_positives: bool = doc(False, "Contrastive targets: pairs whose captions are the same text (canonicalized, or the same token ids) are positives too, not only the pair and its image id. Not with momentum > 0 (the feature queue keeps image ids only).")
    momentum: float = doc(0.0, "EMA coefficient of the momentum encoder (ALBEF: 0.995); 0 disables it.")
    queue_size: int = doc(0, "Momentum feature queue length (ALBEF: 65536); needs momentum > 0.")
    distill_alpha: float = doc(0.4, "Weight of the momentum pseudo-targets in ITC (ALBEF's alpha).")
    local_loss: bool = doc(False, "Multi-process: each rank computes the loss of its own rows against all (labels offset by rank).")
    patch_dropout: float = doc(0.0, "FLIP patch dropout: in training steps the image tower keeps a random max(1, int(L x (1 - p))) of its L patch tokens per image (class/prefix tokens always kept); evaluation and the momentum encoder see every patch. Native vit, timm ViT-style models (timm's PatchDropout) and open_clip ViT or timm-trunk towers. 0 = the tower as built (no patch dropout unless its options set one).")
    distill_from: str = doc("", "A vlp checkpoint directory (e.g. from vlp convert) used as a frozen teacher: its softmax ITC logits are soft targets for the student's (open_clip's DistillClipLoss: contrastive + distill terms, the teacher's own logit scale). The teacher re-tokenizes the captions and re-transforms the images to its own size and normalization. Softmax ITC only (not SigLIP); empty = no teacher.")
    teacher_weight: float = doc(1.0, "Weight of the teacher-distillation term (logged as distill); 1 = open_clip's sum of the two terms.")


@dataclass(frozen=True)
class DataConfig:
    source: str = doc("synthetic", "Dataset registry name: synthetic, json (JSON/JSONL, or a CSV/TSV table by its .csv/.tsv suffix), csv (the same reader), hf, webdataset, hf_stream (a datasets directory read in iterable mode).")
    train: str = doc("", "Training data: JSON/JSONL or CSV/TSV file, Hugging Face datasets directory, or tar shard pattern.")
    image_root: str = doc("", "Directory that image paths in the data are relative to.")
    test: str = doc("", "Held-out retrieval split (JSON/JSONL, caption may be a list; or CSV/TSV); empty = the synthetic test split when source is synthetic.")
    test_image_root: str = doc("", "Image root of the test split; empty = image_root.")
    csv_separator: str = doc("\t", "Column separator of CSV/TSV pair files (open_clip's --csv-separator; a tab by default, also for .csv names).")
    csv_image_key: str = doc("filepath", "Column of CSV/TSV pair files holding the image path, relative to image_root (open_clip's --csv-img-key).")
    csv_caption_key: str = doc("title", "Column of CSV/TSV pair files holding the caption (open_clip's --csv-caption-key).")
    synthetic_train_size: int = doc(20000, "Synthetic training images.")
    synthetic_test_size: int = doc(1000, "Synthetic test images.")
    synthetic_seed: int = doc(0, "Seed of the synthetic generator.")
    synthetic_repeated_captions: float = doc(0.0, "Fraction of synthetic training images captioned only by a class-level caption that repeats across images ('a red circle', 'two shapes'), as web alt-texts do; the test split keeps full descriptions.")
    batch_size: int = doc(64, "Batch size per process per micro-step.")
    samples_per_epoch: int = doc(0, "Streaming sources (webdataset, hf_stream): samples in one epoch, which every process then splits into the same number of batches (samples_per_epoch // (batch_size x processes)); 0 = count them (local tar shards, dataset rows x captions).")
    num_workers: int = doc(2, "DataLoader worker processes.")
    worker_timeout: float = doc(0.0, "Seconds to wait for one batch from the data workers before the run stops with an error naming the step (a hung worker, e.g. on a stalled network file system); 0 = no limit. Needs num_workers > 0.")
    crop_scale: tuple[float, ...] = doc((0.5, 1.0), "Random resized crop scale range for training.")
    hflip: bool = doc(False, "Random horizontal flip (off by default: captions say left/right).")
    max_bad_fraction: float = doc(0.01, "Stop when more than this fraction of samples are unreadable (after 200 samples).")
    max_unk_fraction: float = doc(0.05, "Stop when more than this fraction of the caption tokens (special tokens left out) are unknown to the tokenizer; above 1% the run warns. The fraction is logged as unk_fraction.")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = doc(1e-4, "Peak learning rate: used as given when base_batch_size is 0, else the lr for an effective batch of base_batch_size.")
    base_batch_size: int = doc(0, "0 = lr is used as given (as open_clip's --lr); > 0 = the effective batch (batch_size x grad_accum x processes) that lr is given for, and lr is scaled to the actual one by lr_scaling. The shipped configs set it.")
    lr_scaling: str = doc("linear", "How lr scales with effective batch / base_batch_size when base_batch_size > 0: linear, sqrt or none.")
    weight_decay: float = doc(0.02, "AdamW weight decay (not applied to norms, biases, embeddings, temperature).")
    betas: tuple[float, ...] = doc((0.9, 0.98), "AdamW betas.")
    eps: float = doc(1e-6, "AdamW epsilon.")
    grad_clip: float = doc(0.0, "Clip the global gradient norm to this value; 0 disables (as ALBEF, BLIP and open_clip pretrain). With ITM beside a contrastive loss, clipping the global norm also shrinks the steps of the parts only ITM trains (fusion, ITM head) whenever the contrastive gradient is large; grad_norm and grad_clipped_fraction are logged.")
    image_layer_decay: float = doc(1.0, "Layer-wise lr decay of the image tower (BEiT; timm's param_groups_layer_decay): a parameter of layer l gets lr x decay^(max_layer - l), the stem being layer 0, block i layer i + 1 and the final norm part of the last block (max_layer = depth; timm's grouping for timm towers); vlp's projections, the fusion and the heads keep the full lr. 1 = off.")
    text_layer_decay: float = doc(1.0, "Layer-wise lr decay of the text tower, as image_layer_decay. 1 = off.")
    fusion_lr_scale: float = doc(1.0, "Learning-rate multiplier of the cross-modal part: fusion block, image-to-fusion projection and the ITM/MLM/VQA heads (METER trains its cross-modal layers and heads at 5x the towers' lr). 1 = one lr for all.")


@dataclass(frozen=True)
class ScheduleConfig:
    type: str = doc("cosine", "Learning-rate schedule after warmup: cosine, constant.")
    warmup_steps: int = doc(0, "Linear warmup steps (optimizer steps).")
    min_lr_ratio: float = doc(0.0, "Final lr as a fraction of the peak (cosine).")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = doc(0, "Seed of python, numpy, torch and the data workers.")
    max_steps: int = doc(1000, "Optimizer steps to run (ignored when epochs > 0).")
    epochs: int = doc(0, "Passes over the training data instead of max_steps (as open_clip's --epochs): the run takes epochs x batches per epoch / grad_accum optimizer steps (streaming sources: data.samples_per_epoch or their counted size); 0 = max_steps.")
    grad_accum: int = doc(1, "Micro-batches accumulated per optimizer step.")
    precision: str = doc("fp32", "fp32 or bf16 (autocast on CPU and CUDA).")
    device: str = doc("auto", "auto, cpu or cuda.")
    checkpoint_every: int = doc(500, "Save a checkpoint every N steps (and always at the end); 0 = only at the end.")
    keep_last: int = doc(2, "Checkpoints kept in checkpoints/ (older ones are deleted).")
    log_every: int = doc(10, "Write metrics every N steps (loss terms: their mean over those N steps).")
    freeze_image: bool = doc(False, "Freeze the image encoder.")
    freeze_text: bool = doc(False, "Freeze the text encoder.")
    freeze_image_unlocked_groups: int = doc(0, "With freeze_image: the last N layer groups of the image tower stay trainable (open_clip's --lock-image-unlocked-groups). vlp's image projection, which freeze_image never freezes, counts as the last group: 2 = the projection and the encoder's last group (native ViT: last block + final norm; timm: timm's groups; open_clip: its own lock). 0 and 1 = only the projection trains.")
    freeze_text_unlocked_layers: int = doc(0, "With freeze_text: the last N layer groups of the text tower stay trainable (open_clip's --lock-text-unlocked-layers), vlp's text projection counting as the last one, as freeze_image_unlocked_groups. open_clip text towers freeze their LayerNorms with their layers (open_clip's lock supports nothing else).")
    lora_rank: int = doc(0, "LoRA rank on fusion linear layers (base weights frozen); 0 = full tuning.")
    grad_checkpointing: bool = doc(False, "Activation checkpointing in every encoder and fusion block.")
    contrastive_chunk_size: int = doc(0, "Gradient-cache chunk size for the contrastive loss; 0 = whole batch at once.")
    max_nonfinite_steps: int = doc(5, "Stop after this many non-finite steps in a row.")
    compile: bool = doc(False, "torch.compile every transformer block in place (encoders, fusion, momentum copy); checkpoints are unchanged.")
    fsdp: bool = doc(False, "Multi-process: shard parameters, gradients and optimizer state with FSDP2 (fully_shard per transformer block) instead of DistributedDataParallel; for models whose training state does not fit one device.")
    progress: bool = doc(True, "Show a progress bar.")
    init_image_size: int = doc(0, "Fine-tuning (vlp finetune --init): train at this image resolution; a checkpoint saved at another size has its image tower rebuilt with the position embeddings interpolated (timm's resample_abs_pos_embed, open_clip's resize_pos_embed; a one-line note in the log), and the run's checkpoints are at the new size. 0 = the checkpoint's size.")
    tensorboard: bool = doc(False, "Also write every metrics.jsonl record as TensorBoard scalars to <run_dir>/tensorboard/ (needs the optional tensorboard package: pip install 'vlp[tensorboard]'); metrics.jsonl stays the record.")
    ema_decay: float = doc(0.0, "Keep an exponential moving average of the model weights with this decay per update (timm ModelEmaV3; e.g. 0.999); it is evaluated and saved beside the online weights (final_ema/, ema.safetensors in every checkpoint) and never changes training; 0 = off. Not the momentum encoder (objective.momentum).")
    ema_every: int = doc(1, "Update the weight EMA after every N-th optimizer step (the decay applies per update).")
    ema_start_step: int = doc(0, "The weight EMA copies the weights until this optimizer step, then averages (timm's update_after_step).")
    ema_warmup: bool = doc(False, "Warm the EMA decay up: min(ema_decay, 1 - (1 + t / ema_warmup_gamma) ** -ema_warmup_power) at update step t (timm's use_warmup).")
    ema_warmup_gamma: float = doc(1.0, "Warm-up gamma of the weight EMA (timm's warmup_gamma).")
    ema_warmup_power: float = doc(2 / 3, "Warm-up power of the weight EMA (timm's warmup_power; 2/3 for long runs, 3/4 for shorter ones).")
    ema_min_decay: float = doc(0.0, "Lower bound of the warmed-up EMA decay (timm's min_decay).")


# eval.score's values, in one place for the config check, the CLI and the evaluation (vlp.eval.rerank.with_itc)
RERANK_SCORES = ("itm", "itm_logit", "itm+itc", "itm+itc_logit")


@dataclass(frozen=True)
class EvalConfig:
    every: int = doc(0, "Run retrieval eval every N steps (and at the end); 0 = only at the end; -1 = never.")
    k_test: int = doc(16, "Candidates re-ranked by ITM per query.")
    score: str = doc("itm", "Re-rank score: itm (the ITM head's log-odds, logit 1 - logit 0), itm_logit (its match logit alone, as ALBEF and BLIP rank) or itm+itc (the log-odds plus the ITC cosine, as BLIP adds the cosine) or itm+itc_logit (the log-odds plus the ITC logit, logit scale x cosine: both heads' evidence).")
    batch_size: int = doc(128, "Encoding batch size.")
    max_images: int = doc(0, "Evaluate on the first N test images only; 0 = all.")
    precision: str = doc(DEFAULT_PRECISION, "auto, fp32 or bf16 for encoding and re-ranking; auto = bf16 on CUDA with bf16 support, fp32 on every CPU (the same results on every CPU; bf16 on a CPU only when set to bf16).")
    zeroshot: str = doc("", "Zero-shot classification data evaluated during training ('vlp eval zeroshot' format: JSON/JSONL of {image, label}, or a folder per class); empty = none. ITC top-1/top-5 go to metrics.jsonl as eval/zeroshot/..., the last result to eval_zeroshot.json.")
    zeroshot_classes: str = doc("", "JSON list of the class names of eval.zeroshot (needed with it).")
    zeroshot_image_root: str = doc("", "Image root of eval.zeroshot; empty = data.test_image_root, else data.image_root.")
    zeroshot_every: int = doc(0, "Zero-shot evaluation every N optimizer steps (and at the end); 0 = only at the end; -1 = never (open_clip's --zeroshot-frequency counts epochs).")
    weights: str = doc("both", "With train.ema_decay > 0: which weights the evaluations during and after training use: online, ema or both (EMA results are logged as eval_ema/... and written to eval_ema.json).")


@dataclass(frozen=True)
class VQAConfig:
    train: str = doc("", "VQA training questions (JSON list); empty with source synthetic = the synthetic questions.")
    val: str = doc("", "VQA evaluation questions.")
    image_root: str = doc("", "Image root of the VQA files.")
    num_answers: int = doc(3129, "Answer vocabulary size: the most frequent training answers.")
    hidden_mult: int = doc(2, "Classifier hidden width = this x pooled width.")
    head_input: str = doc("fused", "What the classifier reads: fused (the fusion's pooled output, as ViLT) or fused+image (that and the image tower's pooled output concatenated, as METER's head reads both streams).")


@dataclass(frozen=True)
class Config:
    name: str = doc("run", "Run name; default run directory is runs/<name>.")
    model: ModelConfig = section(ModelConfig, "The model.")
    objective: ObjectiveConfig = section(ObjectiveConfig, "Pretraining objective.")
    data: DataConfig = section(DataConfig, "Data.")
    optim: OptimConfig = section(OptimConfig, "Optimizer.")
    schedule: ScheduleConfig = section(ScheduleConfig, "Learning-rate schedule.")
    train: TrainConfig = section(TrainConfig, "Training loop.")
    eval: EvalConfig = section(EvalConfig, "Evaluation.")
    vqa: VQAConfig = section(VQAConfig, "VQA fine-tuning and evaluation.")
