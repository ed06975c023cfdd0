"""Defaults shared by every experiment: the paper's DRT (docs/specification.md §2, §6, §9).

Experiment files import `get_config()` from here and override fields; every architectural
choice of the paper is a field so an ablation is a config file, not a code path.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 404  # the reference's --seed

  model = config.model = ml_collections.ConfigDict()
  # model/architectures.py registers each: "drt" (retrieval), "swa" (sliding-window baseline, no
  # landmarks), "full" (full causal attention with RoPE; needs use_alibi=False) or "landmark"
  # (Landmark Attention baseline, Mohtashami & Jaggi 2023: a landmark per chunk_len tokens, grouped
  # softmax over every earlier block in every one of sum(decoder_layers) layers in training, each
  # query's top-k blocks at inference; docs/design.md). Landmark uses chunk_len, topk,
  # decoder_layers, rope_theta and landmark_selection; window, use_alibi, encoder and retrieval
  # fields are DRT's.
  model.arch = "drt"
  # Rows of the tied embedding; must cover the tokenizer's vocabulary. 0 = exactly the vocabulary
  # size of data.tokenizer (read from its file). 259: the byte tokenizer's 257 and two spare rows.
  model.vocab_size = 259
  model.d_model = 768  # D
  model.num_heads = 12  # h; head_dim = d_model / num_heads
  model.num_kv_heads = 12  # self-attention K/V heads (GQA when < num_heads)
  model.mlp_dim = 2048  # SwiGLU hidden size F (decoder and encoder)
  model.decoder_layers = (6, 6)  # [lower, upper layers of group 1, ...]; G = len - 1
  model.encoder_layers = 2  # bidirectional chunk-encoder depth
  model.chunk_len = 63  # c: real tokens per chunk; each chunk gets one landmark (S = c + 1)
  model.window = 512  # W: query i attends keys [i - W, i] in the landmark-inserted stream (not full)
  model.use_alibi = True  # ALiBi in decoder self-attention, slopes 2^(-8(h+1)/H)
  model.topk = 8  # K: retrieved chunks per chunk
  model.gumbel = True  # Gumbel top-k sampling in training (never in eval)
  # "learned" (landmark scores) or "random" (uniform past chunks; outside training a fixed draw per
  # group, chunk and candidate: docs/design.md)
  model.retrieval = "learned"
  model.residual = "reference"  # "reference": GCA only feeds the MLP input; "standard": x + GCA
  model.softmax_off_by_one = True  # GCA softmax gets +1 in its denominator (the zeroed landmark row)
  model.rms_eps = 1e-5
  model.encoder_rms_eps = 1e-6  # the reference encoder's library default (§8 item 8)
  # RoPE base: DRT's chunk encoder, every layer of full and landmark attention
  model.rope_theta = 10000.0
  # Landmark inference: each query's top-k earlier blocks chosen per head ("per_head", the
  # original's default) or once for all heads by the largest over heads of the landmark softmax
  # ("shared", the original's "max over heads").
  model.landmark_selection = "per_head"
  model.init_std = 0.02
  # Attention/GCA kernels (drt_jax/model/attention_impls.py): "auto" (Triton on Hopper and A100
  # until the Mosaic kernels pass bench/impl_parity.py, XLA elsewhere), "mosaic", "triton" (Pallas
  # interpreter off-GPU) or "xla" (plain JAX); an op a kernel cannot run falls back
  # mosaic -> triton -> xla. Landmark: "auto" or "xla".
  model.impl = "xla"
  model.dtype = "bfloat16"  # compute dtype; params stay float32
  model.remat = False  # rematerialise every block in the backward pass

  data = config.data = ml_collections.ConfigDict()
  # "pydoc" or "pystdlib" (ship with Python); "text", "jsonl", "parquet" or "datasets" (data.path);
  # "tfds" (data.tfds_name). drt_jax/data/sources.py says how each is read.
  data.source = "pydoc"
  data.path = ""  # file or folder (text, jsonl, parquet) or save_to_disk folder (datasets)
  # Held-out files of the same kind as data.path (a DatasetDict: its "validation" split);
  # "" = hold out the last data.eval_fraction of data.path's token stream.
  data.eval_path = ""
  data.text_field = "text"  # the text field of jsonl records, parquet and datasets columns
  data.tfds_name = ""  # e.g. "pg19" or "drt_text_files", for source="tfds"
  data.tfds_data_dir = ""  # TFDS data_dir; empty = TFDS default
  data.tokenizer = "byte"  # "byte" or a path to a HuggingFace tokenizers JSON file
  data.seq_len = 16380  # T: raw tokens per training sample, a multiple of model.chunk_len
  data.eval_fraction = 0.05  # tail of the token stream held out for eval (no eval_path, not tfds)
  data.cache_dir = ""  # where tokenized corpora are cached; empty = ~/.cache/drt_jax
  data.worker_count = 0  # grain worker processes (0 = in the main process)
  # Fraction of training samples turned into synthetic retrieval tasks on their own window
  # (data/tasks.py: needle, question, answer aligned to model.chunk_len); 0 = plain LM.
  data.task_fraction = 0.0
  data.tasks = "passkey"  # comma-separated kinds mixed in: passkey, multikey, multihop
  # Loss weight of the task answers' tokens (every other token weighs 1); 1 = the reference's plain
  # LM loss, where a few answer tokens are drowned by thousands of haystack tokens. The logged
  # training loss is then this weighted mean; eval_loss stays the plain one.
  data.task_answer_weight = 1.0

  train = config.train = ml_collections.ConfigDict()
  train.global_batch_size = 32  # sequences per optimizer step, over all devices
  train.grad_accum_steps = 1  # micro-batches per optimizer step
  train.num_train_steps = 60000
  train.learning_rate = 2e-3
  train.warmup_steps = 1200  # linear warm-up from 0, then cosine decay
  train.lr_floor = 0.0  # final learning rate as a fraction of the peak
  train.b1 = 0.9
  train.b2 = 0.95
  train.eps = 1e-6
  train.weight_decay = 0.001
  train.grad_clip = 1.0  # global L2 norm
  train.log_every = 50
  train.eval_every = 5000
  train.eval_batches = 16  # batches per periodic eval
  # Sequences per eval batch, over all devices; 0 = the training micro-batch (global_batch_size /
  # grad_accum_steps). A held-out set smaller than the batches pads them with unscored rows.
  train.eval_batch_size = 0
  train.checkpoint_every = 5000
  train.keep_checkpoints = 3
  train.init_from = ""  # a run folder whose newest params a new --workdir starts from; "" = random
  # A step whose loss or gradient norm is NaN/inf leaves the params as they were (the update is
  # skipped); this many in a row stop the run, keeping the last good checkpoint.
  train.max_nonfinite_steps = 20
  train.wandb_project = ""  # W&B project to log to as well ("" = none; needs `pip install wandb`)
  train.wandb_mode = "online"  # "online" or "offline" (written under DIR/wandb, synced later)

  mesh = config.mesh = ml_collections.ConfigDict()
  mesh.data = -1  # -1: all devices not used by the other axes
  mesh.fsdp = 1
  mesh.tensor = 1
  # Logical axis name -> mesh axes (MaxText style); params and activations carry logical names.
  config.logical_axis_rules = (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("vocab", "tensor"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("head_dim", None),
      ("norm", None),
      ("length", None),
  )
  return config
