"""The configuration schema: one dataclass per section, each key with its default and a comment.

Loading, merging and checking live in config.py (which re-exports every name here)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    pass


#: what ``eval.tasks`` / ``finealign eval --task`` may name (eval/runner.py runs them)
EVAL_TASKS = ("retrieval", "caption", "classify", "tgir", "vqa")


@dataclass
class ModelConfig:
    preset: str = "tiny"             # architecture preset in models/presets/ (tiny, small, base, bench-tiny)
    arch: str = "coca"               # coca: dual encoder (+ caption / image decoders): CLIP, CoCa, SyCoCa
                                     # fusion: ALBEF-style text encoder + fusion encoder (ITM, MLM heads)
                                     # maccap: frozen coca-arch backbone + adaptor + LM (maccap.*, lm.*)
    fusion_layers: int = 2           # fusion arch: text->image cross-attention layers
    momentum: float = 0.0            # fusion arch: EMA teacher momentum (0 = no teacher; ALBEF 0.995)
    queue_size: int = 0              # fusion arch with a teacher: queue of the teacher's embeddings used as
                                     # extra ITC negatives / distillation targets (ALBEF 65536; 0 = off)
    image_size: int = 32             # input resolution (square)
    patch_size: int = 4              # ViT patch side; grid = image_size // patch_size
    vision_width: int = 128          # ViT token width
    vision_layers: int = 3           # ViT blocks
    vision_heads: int = 4            # ViT attention heads
    text_width: int = 128            # text encoder / decoder width
    text_layers: int = 2             # unimodal (causal) text encoder blocks
    text_heads: int = 4              # text attention heads
    decoder_layers: int = 2          # multimodal caption decoder blocks; 0 = no decoder (CLIP)
    decoder_block: str = "fused"     # fused: self-attn, cross-attn, MLP | open_clip: + an MLP after self-attn
    context_length: int = 32         # max tokens per caption incl. BOS/EOS
    vocab_size: int = 0              # 0 = taken from the tokenizer
    embed_dim: int = 128             # contrastive embedding size
    caption_queries: int = 16        # attentional-pooler queries the decoder attends to
    image_pool: str = "attn"         # attn: CoCa attentional pooler (1 contrastive query) | cls: CLIP cls token
    mim_decoder_layers: int = 0      # image decoder blocks for masked image modeling; 0 = no image decoder
    mim_decoder_width: int = 0       # image decoder width (0 = vision_width * mim_decoder_scale)
    mim_decoder_scale: float = 1.0   # with mim_decoder_width 0: width = this fraction of vision_width, rounded
                                     # to a multiple of the heads (MAE-style narrow decoder: 0.5)
    mim_decoder_heads: int = 0       # image decoder heads (0 = vision_heads)
    mim_text: bool = True            # image decoder cross-attends to the text tokens (TG-MIM); false = plain MIM
    mim_text_from: int = 0           # first image-decoder block with text cross-attention (SemMIM text injection)
    mim_inject: bool = True          # the student's MIM decoder reads the text; false = SemMIM's "no text
                                     # injection" ablation (cross-attention gated off; a teacher still uses it)
    mim_visible: str = "reencode"    # what the image decoder reads at the visible patches (CoCa arch):
                                     # reencode: a second ViT pass over the visible patches only (MAE-style; the
                                     # masked patches never reach it) | shared: the first full-image pass's tokens
                                     # there (no second pass: 0.97x instead of 1.14x CoCa's step at bench-tiny
                                     # bf16 with the half-width decoder; they have attended to the masked
                                     # patches, so their content can leak into the reconstruction). The sycoca
                                     # recipe: reencode + decoder scale 0.5
    masked_pass: str = "joint"       # fusion arch with MLM and MIM: joint: one fusion pass of the masked text over
                                     # the masked image feeds both (SyncMask: words and patches hidden together)
                                     # | separate: MLM reads the whole image, MIM's decoder the clean caption
                                     # fused with the masked image (SemMIM; one more fusion pass)
    mim_target: str = "pixel"        # pixel: normalised pixels | semantic: the teacher's prototype distribution
                                     # (SemMIM; fusion arch with model.prototypes > 0 and a teacher)
    text_fused_targets: bool = False  # semantic targets from teacher patches fused with the text first
    prototypes: int = 0              # fusion arch: K prototypes of the shared projection head (SemMIM 4096)
    proto_dim: int = 256             # prototype head bottleneck (DINO 256)
    pta: bool = False                # TiMix patch-text alignment head: per-patch log-prob "belongs to the text"
    pta_block: int = 0               # 1-based vision block whose output the PTA head reads (0 = the middle one)
    pta_width: int = 0               # PTA head channels C (0 = vision_width)
    mlp_ratio: float = 4.0           # MLP hidden = ratio * width
    init_temperature: float = 0.07   # ITC temperature at init (logit scale = 1/τ, clamped to 100)
    grad_checkpointing: bool = False  # recompute block activations in backward
    attn_low_precision: bool = False  # CPU bf16 attention: scores and softmax in bf16 instead of fp32 (the
                                     # default fp32_softmax_attention): 1.7-2.1x faster attention, 1.2-1.3x its
                                     # output error against fp64 (benchmarks/attention.py)
    # towers' layer options (Hugging Face CLIP import sets them; the defaults are finealign's own layers)
    act: str = "gelu"                # vision/text tower MLP activation: gelu | quick_gelu (OpenAI CLIP) | gelu_tanh
    vision_ln_pre: bool = False      # LayerNorm on the ViT tokens before the first block (CLIP's ln_pre)
    text_mlp_ratio: float = 0.0      # text tower MLP ratio (0 = mlp_ratio)
    text_pool: str = "cls"           # text embedding: cls (own tower: a learnable token after the sequence;
                                     # hf tower: the first token, BERT's [CLS]) | eos (the last real token,
                                     # CLIP) | mean (masked mean of the real tokens, sentence-transformers)
    text_tower: str = "own"          # own: finealign's causal TextEncoder | hf: a Hugging Face AutoModel
                                     # encoder from model.text_path (coca arch without decoder; finealign[hf])
    text_path: str = ""              # hf tower: local directory (config.json, weights, tokenizer.json)
    text_hf_config: dict[str, Any] = field(default_factory=dict)  # hf tower: its config.json, filled when the
                                     # config is resolved so checkpoints rebuild without text_path


@dataclass
class DataConfig:
    source: str = "emoji"            # registered source: shapes, emoji, csv, tsv, jsonl, coco, webdataset
    root: str = "data/emoji"         # dataset directory (or file) for file-based sources
    train: str = "train"             # split name / file / shard pattern for training
    val: str = "val"                 # validation split
    test: str = "test"               # evaluation split
    image_key: str = "filepath"      # csv/tsv column or jsonl key holding the image path
    caption_key: str = "title"       # csv/tsv column or jsonl key holding the caption
    separator: str = ""              # csv/tsv delimiter ("" = source default)
    num_samples: int = 0             # procedural sources: samples per split (0 = source default)
    fraction: float = 1.0            # use this fraction of the training split (data-efficiency studies)
    sampler: str = "random"          # random | grouped: each batch from a few groups (data.group_by) |
                                     # semi_hard: batches of embedding neighbours in a similarity band;
                                     # grouped/semi_hard never put two samples of one item in a batch
    group_by: str = "category"       # grouped sampler: Sample field: category, subcategory, label, item_id
    views: int = 1                   # 2: a second augmented view of every training image (batch.images2)
    semi_hard_band: list[float] = field(default_factory=lambda: [0.3, 0.9])  # preferred similarity to the batch
    semi_hard_upper: float = 0.95    # above it two samples are near-duplicates: never in one batch
    refresh_every: int = 100         # semi_hard: re-embed the pairs before step 1, then every N steps (0: never again)
    refresh_embed: str = "image"     # semi_hard: which embedding defines neighbours: image | text
    batch_size: int = 64             # global training batch, all ranks together (split into micro-batches
                                     # by train.grad_accum)
    eval_batch_size: int = 128       # batch size for evaluation / embedding
    workers: int = 0                 # DataLoader worker processes (per rank)
    shard_split: Any = "auto"        # streams: deal shards to (rank, worker) slots, each shard read once per epoch:
                                     # auto (= when world size > 1) | true | false (every rank reads every shard)
    resample: bool = False           # streams: each (rank, worker) draws shards with replacement, endless
    epoch_batches: int = 0           # data.resample: batches per rank that make one (nominal) epoch
    augment: bool = True             # random resized crop + colour jitter for training images
    strict: bool = False             # first bad sample raises (naming file/line) instead of skip+count
    max_image_pixels: int = 89_478_485  # larger images are skipped ("image too large") from their header,
                                     # never decoded (decompression bombs); 0 = only PIL's own limit
    allow_outside_root: bool = False  # csv/jsonl/coco/emoji: image paths may be absolute or leave the root
                                     # via ".." (else such rows are skipped: "path outside root")
    seed: int = 0                    # seeds procedural sources and shuffling


@dataclass
class TokenizerConfig:
    path: str = ""                   # tokenizer.json to load; "" = train a BPE on the training captions
    vocab_size: int = 2048           # target vocabulary when training a tokenizer
    lowercase: bool = True           # normalise captions to lower case


@dataclass
class MaskingConfig:
    """Which patches each head sees. A masker spec is {type: random|attentive, mask_ratio: r, mask: most|least}."""
    relevance: str = "max"           # patch-text relevance: max | mean of cosine over the real text tokens |
                                     # attention: the (teacher's) fusion cross-attention summed over words
    ic: dict[str, Any] = field(default_factory=dict)   # caption path: masked patches are dropped ({} = all)
    mlm: dict[str, Any] = field(default_factory=dict)  # words masked for MLM: {prob: 0.15} (BERT 80/10/10)
    mim: dict[str, Any] = field(default_factory=dict)  # image decoder: masked patches are reconstructed
    sync: dict[str, Any] = field(default_factory=dict)  # SyncMask: {words: 0.15, patches: 0.25, layer: -1};
                                     # replaces mlm/mim masks with ones from the teacher's cross-attention


@dataclass
class MixerConfig:
    """Image mixing for ``objectives.mixed_itc`` (TiMix and its CutMix / Mixup baselines). The source of
    every image is the batch reversed (``flip(0)``); one window side / λ is drawn per micro-batch."""
    type: str = ""                   # "" = off | timix | cutmix | mixup
    side: list[float] = field(default_factory=lambda: [0.35, 0.75])  # timix/cutmix window side, fraction of the grid
    alpha: float = 1.0               # mixup: λ ~ Beta(alpha, alpha)
    stop: float = 0.667              # no mixing after this fraction of train.steps (TiMix: 20 of 30 epochs)
    scores: str = "auto"             # timix patch scores: auto (PTA when the batch has regions and the model a
                                     # PTA head, else patch-text relevance) | pta | relevance


@dataclass
class MacCapConfig:
    """Zero-shot captioning trained on text only (``model.arch: maccap``; CapDec = subregions 0, samples 1)."""
    backbone: str = ""               # coca-arch checkpoint / run dir (CLIP, CoCa, SyCoCa), frozen
    noise_var: Any = 0.016           # σ² of the Gaussian noise on the unit embeddings (0 = no noise); "auto":
                                     # the backbone's measured gap (BACKBONE_RUN/gap/gap.json, `finealign analyze gap`)
    copies: int = 10                 # L noisy copies of the text embedding (the adaptor's memory)
    queries: int = 32                # adaptor queries = LM prefix length
    adaptor_width: int = 512         # adaptor decoder width d
    adaptor_heads: int = 8
    adaptor_layers: int = 1
    subregions: int = 10             # inference: top-k patches by global-token attention (0 = global only)
    subregion_weight: float = 1.0    # w: memory_i = normalise(g + w · subregion_i)
    samples: int = 4                 # N captions per image, each with fresh noise
    rerank: bool = True              # keep the candidate closest to the image (else the first)


@dataclass
class LMConfig:
    """The language model MacCap writes a prefix into."""
    path: str = ""                   # local Hugging Face causal LM dir ("" = finealign's own small LM)
    trainable: bool = False          # fine-tune the HF LM (the own LM is trained from scratch, always)
    width: int = 256                 # own LM
    layers: int = 4
    heads: int = 4


@dataclass
class TrainConfig:
    steps: int = 1000                # optimizer steps
    lr: float = 5e-4                 # peak learning rate
    min_lr_ratio: float = 0.0        # cosine floor as a fraction of lr
    warmup: int = 100                # linear warm-up steps
    weight_decay: float = 0.1        # AdamW decay, applied only to tensors with dim >= 2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    optimizer: str = "auto"          # AdamW kernels: auto (torch's choice) | foreach | fused (docs/performance.md)
    grad_accum: int = 1              # micro-batches per step (ITC still sees every negative)
    clip_grad: float = 1.0           # max grad norm (0 = off)
    precision: str = "fp32"          # fp32 | bf16 (autocast)
    seed: int = 0
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    log_every: int = 10              # metrics to JSONL / TensorBoard every N steps
    ckpt_every: int = 200            # checkpoint every N steps (and at the end)
    keep: int = 3                    # checkpoints kept (oldest deleted; 0 = keep all)
    run_dir: str = ""                # "" = runs/<recipe>-<timestamp>
    eval_every: int = 0              # retrieval on the val split every N steps (0 = off)
    deterministic: bool = False      # torch.use_deterministic_algorithms
    threads: int = 0                 # torch.set_num_threads (0 = leave as is)
    retain_host_memory: bool = True  # keep freed host memory for reuse: no per-step page faults (glibc)
    compile: bool = False            # torch.compile every transformer block (measured: docs/performance.md)
    # multi-process (torchrun): data.batch_size is the global batch; see docs/scaling.md
    strategy: str = "ddp"            # ddp | fsdp (FSDP2: parameters, gradients, optimizer state sharded)
    gather_with_grad: bool = False   # ITC: all-gather features with gradient (open_clip's option)
    local_loss: bool = False         # ITC: each rank scores only its own rows against all (needs gather_with_grad)
    dist_timeout: float = 600.0      # seconds a collective may wait before the run fails (a dead rank)
    skip_nonfinite: int = 0          # non-finite loss / gradient: skip up to N batches (no optimizer step), then stop


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: ["retrieval", "caption"])
    decode: str = "beam"             # greedy | beam | top_p
    beam_size: int = 3
    top_p: float = 0.9
    temperature: float = 1.0
    max_new_tokens: int = 20
    max_images: int = 0              # cap on evaluated images (tgir: on queries; 0 = all)
    templates: list[str] = field(default_factory=lambda: ["{}", "a picture of {}", "an image of {}"])
    classify_by: str = "label"       # zero-shot classes: the samples' label, category or subcategory
    retrieval_by: str = "image"      # image: a caption matches its own image | item: any image of its item
                                     # (multi-view fashion data: several images share one description)
    k_test: int = 16                 # fusion models: re-rank each query's ITC top-k with the ITM head (0 = off)
    vqa_template: str = "Question: {} Short answer:"   # zero-shot VQA prompt after the image prefix (MacCap)
    vqa_beam_size: int = 5           # zero-shot VQA answers by beam search with this many beams (MacCap: 5; 1 = greedy)
    vqa_max_new_tokens: int = 5      # longest zero-shot VQA answer, in tokens

    def decoding(self) -> dict[str, Any]:
        """The caption decoding settings as ``generate`` / ``caption_images`` keyword arguments, so that every
        verb that captions (eval, caption, serve, report) decodes alike."""
        return {"strategy": self.decode, "max_new_tokens": self.max_new_tokens, "beam_size": self.beam_size,
                "top_p": self.top_p, "temperature": self.temperature}


@dataclass
class Config:
    recipe: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    mixer: MixerConfig = field(default_factory=MixerConfig)
    maccap: MacCapConfig = field(default_factory=MacCapConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    # objective name -> {weight: float, **objective options}; weight 0 or absence switches it off
    objectives: dict[str, dict[str, Any]] = field(default_factory=lambda: {"itc": {"weight": 1.0}})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def active_objectives(self) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.objectives.items() if float(v.get("weight", 1.0)) != 0.0}
