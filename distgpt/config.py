"""Typed configuration: dataclass schemas registered in Hydra's ConfigStore, composed from
configs/ (config.yaml plus the model/, data/, optim/ and run/ groups), then validated.

Structured schemas make Hydra refuse unknown keys and wrong types; validate() refuses values
that cannot work, in one line naming the field, before anything is allocated.
"""
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration that cannot work; the message is one line naming the field and the fix."""


@dataclass
class ModelConfig:
    name: str = "tiny"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    vocab_size: int = 50257
    padded_vocab_size: int = 50304  # a multiple of 128, so the lm head tiles evenly
    block_size: int = 1024  # maximum sequence length (rows of wpe)


@dataclass
class DataConfig:
    train: str = "data/tinyshakespeare/tinyshakespeare_train_*.bin"  # shard glob
    val: str = "data/tinyshakespeare/tinyshakespeare_val_*.bin"
    # what to tokenize into those shards when they do not exist yet: a .txt/.jsonl path, or
    # 'builtin:tinyshakespeare' (shipped with the package); '' means the shards must exist
    source: str = "builtin:tinyshakespeare"
    # training windows (one global step's tokens each) in a new order every epoch, drawn from
    # seed and the epoch; false reads them in file order. Validation is never shuffled
    shuffle: bool = True


@dataclass
class OptimConfig:
    lr: float = 6e-4
    schedule: str = "cosine"  # cosine | linear | constant | wsd (warm-up, stable, decay)
    warmup_steps: int = 0
    final_lr_frac: float = 0.1  # lr at the last step, as a fraction of lr
    decay_frac: float = 0.2  # wsd: the last fraction of steps spent decaying
    weight_decay: float = 0.1  # on matmul weights and embeddings only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # by global norm; 0 turns clipping off


@dataclass
class TrainConfig:
    micro_batch: int = 4  # B: sequences per rank per micro-step
    seq_len: int = 1024  # T
    total_batch_tokens: int = 0  # tokens per optimizer step; 0 = micro_batch * seq_len * world
    max_steps: int = 300
    stop_after: int = 0  # end this invocation after this many steps, with a checkpoint (to fit
    #                      a job's time slot; resume=auto goes on); 0 = run to max_steps
    val_every: int = 50  # 0 = never
    val_steps: int = 10  # global batches (train.total_batch_tokens each) per validation
    sample_every: int = 100  # 0 = never
    sample_tokens: int = 48
    sample_prompt: str = "\n"
    checkpoint_every: int = 100  # 0 = only at the end
    keep_checkpoints: int = 2  # newest kept; older ones are deleted after a successful save
    log_every: int = 10
    hellaswag_every: int = 0  # steps between HellaSwag evaluations (hellaswag_path); 0 = never
    hellaswag_limit: int = 0  # items per evaluation; 0 = all 10,042
    recompute: int = 0  # 0 none, 1 GELU, 2 GELU + layernorm (activation memory for time)
    recompute_layers: int = -1  # only the first N layers recompute at train.recompute, the others
    #                            one level less (finer steps of memory for time); -1 = every layer
    cuda_graphs: bool = True  # backend=cuda: replay each micro-step's forward + backward as a
    #                          CUDA graph (no per-launch host cost; bitwise the same results)
    # the spike guard (distgpt/spikes.py): a step whose loss or grad norm is not finite, or lies
    # more than this many standard deviations above the mean of the last skip_window accepted
    # steps (once skip_min_samples were accepted), is skipped: its batch is dropped, weights and
    # AdamW moments stay as they were. 0 turns the z-score check off (non-finite steps are always skipped).
    skip_loss_zscore: float = 6.0
    skip_norm_zscore: float = 6.0
    skip_window: int = 128
    skip_min_samples: int = 20
    skip_max_in_a_row: int = 20  # this many skipped steps in a row stop the run (it diverged)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    backend: str = "reference"  # reference (PyTorch ops) | cuda (our kernels)
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # parameters and activations: float32 | bfloat16 | float64
    seed: int = 1337
    out_dir: str = "runs"
    name: str = "${model.name}"  # the run directory is out_dir/name: no timestamps, so every
    #                               rank of a multi-process run agrees on it
    init_from: str = ""  # start a new run from pretrained weights: hf:DIR (a GPT-2 save_pretrained
    #                      directory) or llmc:FILE (an llm.c model .bin); '' = GPT-2's random init
    resume: str = "auto"  # auto (latest checkpoint in the run directory, if any) | none | a path
    zero_stage: int = 1  # 0: all-reduce grads; 1: shard AdamW state across ranks
    deterministic: bool = False  # backend=cuda: bitwise-reproducible runs and resumes, through a
    #                              deterministic attention backward (~8% slower at 124M)
    matmul_dgelu: str = "auto"  # backend=cuda: how the fc projection's input gradient takes the GELU
    #                            derivative: auto (each form timed once per shape, the fastest
    #                            kept; fused when deterministic) | fused | transposed | split, to
    #                            pin one where `distgpt bench` shows auto misjudging your GPU
    matmul_bias_column: str = "auto"  # backend=cuda: the fc and qkv bias gradients from their
    #                                  weight-gradient products, over the layernorm outputs kept
    #                                  beside a column of ones (true), or from a column-sum pass
    #                                  (false); auto: up to 1024 channels (124M, 350M), where
    #                                  it measured as fast or faster (not at 1558M)
    fp8: bool = False  # the transformer blocks' matmuls with fp8 operands (e4m3 weights and
    #                    activations, per-tensor scales; the lm head, master weights and AdamW
    #                    unchanged); backend=cuda needs Hopper/Ada. The fp8_* defaults below are the
    #                    measured recipe (README, FP8: its speed and loss against bf16)
    fp8_gradients: str = "e4m3"  # fp8=true: the format of the gradients entering the matmuls'
    #                              backward: e4m3 (one more mantissa bit; closer to bf16's loss,
    #                              see model/fp8.py) | e5m2 (more range)
    fp8_scaling: str = "delayed"  # fp8=true: delayed (the casts of tensors no kernel of ours
    #                               writes take their scale from the amaxes of the last
    #                               fp8_amax_history steps: one read) | current (each cast's
    #                               scale from its tensor's own amax: an extra read of those)
    fp8_amax_history: int = 16  # fp8_scaling=delayed: forwards (and backwards) a scale looks back on
    fp8_margin: int = 0  # fp8_scaling=delayed: a delayed scale leaves 2^margin of headroom above the
    #                      history's amax (a tensor whose range grows past it is clipped otherwise)
    fp8_weight_gradients: bool = True  # fp8=true: the blocks' weight gradients as fp8 products of
    #                                    the output gradients and inputs (transposed fp8 copies)
    #                                    instead of bf16 ones; the inputs' copies are kept from the
    #                                    forward, so nothing is rebuilt and train.recompute has no
    #                                    effect (7C bytes a token a layer more: false saves them)
    fp8_fuse_gelu: bool = True  # fp8=true with fp8 weight gradients and delayed scaling: fc's output
    #                             gradient cast into fp8, and fc's bias gradient taken, in the GELU
    #                             derivative's own pass, with a delayed scale (1558M: 3.5% a step);
    #                             false: the bf16 gradient written, then cast by current scaling
    fp8_gelu_in_matmul: bool = True  # fp8=true with fp8 weight gradients and delayed scaling: the fc
    #                                  matmul's epilogue writes its GELU output in fp8 (a delayed
    #                                  scale) and one byte transpose copies it for the weight
    #                                  gradient; false: the bf16 output written, then cast
    fp8_layernorm_cast: bool = True  # fp8=true with fp8 weight gradients and delayed scaling: ln1 and
    #                                  ln2 write their outputs as the qkv and fc inputs' e4m3 casts
    #                                  (a delayed scale in place of current scaling) and one byte
    #                                  transpose copies each for the weight gradient; false: the
    #                                  bf16 outputs written, then cast by current scaling
    fp8_delayed_weights: bool = True  # fp8_scaling=delayed: the weights' fp8 casts take delayed scales
    #                                   too (from the weight amaxes' history): one pass a matrix,
    #                                   not an amax pass and a cast (with fp8_layernorm_cast, 1558M
    #                                   B=16: about 1.7 ms a step less on an H200, README FP8)
    comm_timeout_s: float = 600.0  # a collective waiting longer aborts every rank (a rank died or hangs)
    overlap_comm: str = "auto"  # sum each bucket of gradients over ranks during the backward (on a
    #                             communication stream): true | false | auto (when the ranks span
    #                             nodes: over NVLink it does not pay, see parallel/data_parallel.py)
    bucket_mb: float = 25.0  # gradient bucket size: layers are grouped until a bucket holds this much
    gather_in_forward: str = "auto"  # zero_stage=1: all-gather the updated weights during the next
    #                                  step's forward, bucket by bucket, instead of after the update:
    #                                  true | false | auto (where overlap_comm=auto overlaps)
    rendezvous: str = ""  # ranks started without MPI meet here: file:DIR (shared) or tcp:HOST:PORT
    #                       (rank 0's address); rank and world come from RANK/WORLD_SIZE/LOCAL_RANK or srun
    wandb: bool = False
    wandb_project: str = "distgpt"
    hellaswag_path: str = "data/hellaswag_val.jsonl"  # HellaSwag's val set (see `distgpt eval --help`)


ConfigStore.instance().store(name="distgpt_schema", node=Config)

BACKENDS = ("reference", "cuda")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float64")
FP8_GRADIENT_FORMATS = ("e5m2", "e4m3")
# the fc projection's input gradient with the GELU derivative (backends/cuda/matmul.py): timed
# once per shape (auto), cuBLASLt's DGELU epilogue on the stored weight, on its transpose, or the
# plain product and our GELU-derivative kernel
DGELU_FORMS = ("auto", "fused", "transposed", "split")
SCHEDULES = ("cosine", "linear", "constant", "wsd")
# one GPU thread sums the spike guard's window each step: a few thousand values stay microseconds
MAX_SKIP_WINDOW = 4096
# The fp8 path's on/off switches, one row each: what it does when on, whether it acts only in the
# recipe (fp8 weight gradients and delayed scaling; otherwise delayed scaling alone), and what a
# run's start-up line and a bench result say when it leaves its default (Config's field). The
# model, the trainer and `distgpt bench` (a --[no-]flag each) all read them from here.
FP8_SWITCHES = {
    "fp8_fuse_gelu": ("fc's output gradient cast with the GELU derivative, in one pass", True,
                      "fc's gradient cast apart from the GELU derivative"),
    "fp8_gelu_in_matmul": ("fc's matmul writes its GELU output in fp8", True,
                           "fc's GELU output cast apart from its matmul"),
    "fp8_layernorm_cast": ("ln1 and ln2 write their outputs as the next matmuls' fp8 casts, with delayed "
                           "scales", True, "ln1 and ln2 outputs cast apart"),
    "fp8_delayed_weights": ("the weights' casts take delayed scales too, one pass a matrix", False,
                            "weights cast by current scaling"),
}


def config_dir() -> Path:
    """configs/ inside an installed package, or at the top of a source checkout."""
    packaged = resources.files("distgpt") / "configs"
    if packaged.is_dir() and (Path(str(packaged)) / "config.yaml").exists():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "configs"


def _group_choices(group):
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def load_config(overrides=()) -> Config:
    """Compose configs/config.yaml with Hydra command-line style overrides and validate it."""
    overrides = list(overrides)
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            composed = compose(config_name="config", overrides=overrides)
        cfg = OmegaConf.to_object(composed)
    except MissingConfigException as exc:
        raise ConfigError(_missing_preset_message(exc, overrides)) from None
    except (HydraException, OmegaConfBaseException) as exc:
        # Hydra's own first line is generic ("Could not override 'x'"); OmegaConf's cause
        # names the key and the schema, which is what the user needs
        raise ConfigError(f"config: {_first_line(exc.__cause__ or exc)}") from None
    validate(cfg)
    return cfg


def _first_line(exc):
    text = str(exc).strip()
    if "full_key:" in text:  # OmegaConf: "Key 'x' not in 'TrainConfig'\n    full_key: train.x"
        key = text.split("full_key:")[1].split()[0]
        return f"{key}: {text.splitlines()[0]} (see distgpt/config.py for the fields and types)"
    return text.splitlines()[0] if text else type(exc).__name__


def _missing_preset_message(exc, overrides):
    for item in overrides:
        key, _, value = item.lstrip("+~").partition("=")
        if key in ("model", "data", "optim", "run") and value not in _group_choices(key):
            return (f"config: unknown {key} preset '{value}'; choose one of: "
                    f"{', '.join(_group_choices(key))}")
    return f"config: {str(exc).strip().splitlines()[0]}"


def validate(cfg: Config, world_size: int = 1) -> None:
    """Refuse a configuration that cannot work, naming the field. world_size enters only the
    batch arithmetic, so the trainer calls this again once it knows the world."""
    m, t, o = cfg.model, cfg.train, cfg.optim
    if cfg.rendezvous:
        from distgpt.parallel.rendezvous import parse
        try:
            parse(cfg.rendezvous)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if m.n_layer < 1 or m.n_head < 1 or m.n_embd < 1:
        raise ConfigError("model: n_layer, n_head and n_embd must be positive")
    if m.n_embd % m.n_head:
        raise ConfigError(f"model.n_head: {m.n_head} heads do not divide model.n_embd={m.n_embd}; "
                          f"choose a head count that divides the width")
    if m.padded_vocab_size < m.vocab_size:
        raise ConfigError(f"model.padded_vocab_size={m.padded_vocab_size} is smaller than "
                          f"model.vocab_size={m.vocab_size}")
    if not 1 <= t.seq_len <= m.block_size:
        raise ConfigError(f"train.seq_len={t.seq_len} must be in 1..model.block_size={m.block_size}")
    if t.micro_batch < 1:
        raise ConfigError(f"train.micro_batch={t.micro_batch} must be at least 1")
    per_micro_step = t.micro_batch * t.seq_len * world_size
    if t.total_batch_tokens < 0 or t.total_batch_tokens % per_micro_step:
        raise ConfigError(
            f"train.total_batch_tokens={t.total_batch_tokens} is not a multiple of micro_batch x "
            f"seq_len x world size = {t.micro_batch} x {t.seq_len} x {world_size} = "
            f"{per_micro_step}; set it to a multiple of {per_micro_step} (or 0 for one micro-step)")
    if t.stop_after < 0:
        raise ConfigError(f"train.stop_after={t.stop_after} must be >= 0 (0 runs to train.max_steps)")
    if t.max_steps < 1:
        raise ConfigError(f"train.max_steps={t.max_steps} must be at least 1")
    if t.skip_loss_zscore < 0 or t.skip_norm_zscore < 0:
        raise ConfigError(f"train.skip_loss_zscore={t.skip_loss_zscore} and train.skip_norm_zscore="
                          f"{t.skip_norm_zscore} must be >= 0 (0 turns the spike check off)")
    if not 2 <= t.skip_min_samples <= t.skip_window <= MAX_SKIP_WINDOW:
        raise ConfigError(f"train.skip_min_samples={t.skip_min_samples} and train.skip_window={t.skip_window} "
                          f"need 2 <= skip_min_samples <= skip_window <= {MAX_SKIP_WINDOW}")
    if t.skip_max_in_a_row < 1:
        raise ConfigError(f"train.skip_max_in_a_row={t.skip_max_in_a_row} must be at least 1")
    if t.recompute not in (0, 1, 2):
        raise ConfigError(f"train.recompute={t.recompute}: choose 0 (none), 1 (GELU) or 2 (GELU + layernorm)")
    if t.recompute_layers != -1 and not (t.recompute > 0 and 0 <= t.recompute_layers <= cfg.model.n_layer):
        raise ConfigError(f"train.recompute_layers={t.recompute_layers}: with train.recompute >= 1, choose 0 to "
                          f"n_layer={cfg.model.n_layer} layers (the first N recompute, the others one level "
                          f"less), or -1 for every layer")
    for name, value, choices in (("backend", cfg.backend, BACKENDS), ("device", cfg.device, DEVICES),
                                 ("dtype", cfg.dtype, DTYPES), ("optim.schedule", o.schedule, SCHEDULES)):
        if value not in choices:
            raise ConfigError(f"{name}='{value}': choose one of {', '.join(choices)}")
    if cfg.seed < 0:
        raise ConfigError(f"seed={cfg.seed} must be >= 0 (it seeds the weights and the data order)")
    if cfg.zero_stage not in (0, 1):
        raise ConfigError(f"zero_stage={cfg.zero_stage}: choose 0 (all-reduce) or 1 (sharded AdamW)")
    for name in ("overlap_comm", "gather_in_forward", "matmul_bias_column"):
        if str(getattr(cfg, name)).lower() not in ("auto", "true", "false"):
            raise ConfigError(f"{name}={getattr(cfg, name)}: choose auto, true or false")
    if not cfg.bucket_mb > 0:
        raise ConfigError(f"bucket_mb={cfg.bucket_mb} must be > 0 (megabytes of gradient per bucket; 25 is usual)")
    if o.warmup_steps < 0 or not 0.0 <= o.final_lr_frac <= 1.0 or not 0.0 < o.decay_frac <= 1.0:
        raise ConfigError("optim: warmup_steps >= 0, final_lr_frac in [0, 1] and decay_frac in (0, 1] are required")
    if o.lr <= 0 or o.grad_clip < 0:
        raise ConfigError(f"optim: lr={o.lr} must be > 0 and grad_clip={o.grad_clip} >= 0")
    if cfg.matmul_dgelu not in DGELU_FORMS:
        raise ConfigError(f"matmul_dgelu={cfg.matmul_dgelu}: choose one of {', '.join(DGELU_FORMS)}")
    if cfg.fp8_gradients not in FP8_GRADIENT_FORMATS:
        raise ConfigError(f"fp8_gradients={cfg.fp8_gradients}: choose one of {', '.join(FP8_GRADIENT_FORMATS)}")
    if cfg.fp8_scaling not in ("current", "delayed"):
        raise ConfigError(f"fp8_scaling={cfg.fp8_scaling}: choose current or delayed")
    if cfg.fp8_amax_history < 1:
        raise ConfigError(f"fp8_amax_history={cfg.fp8_amax_history} must be >= 1 (steps of amax a delayed scale "
                          f"looks back on; 16 is usual)")
    if not 0 <= cfg.fp8_margin <= 8:
        raise ConfigError(f"fp8_margin={cfg.fp8_margin} must be in 0..8 (powers of two of headroom a delayed "
                          f"scale leaves; 0 or 1 is usual)")
    if cfg.fp8 and cfg.fp8_weight_gradients and (t.micro_batch * t.seq_len) % 16:
        raise ConfigError(f"fp8_weight_gradients=true: train.micro_batch x train.seq_len = "
                          f"{t.micro_batch * t.seq_len} tokens must be a multiple of 16 (the fp8 weight "
                          f"gradient's K); change either, or fp8_weight_gradients=false")
    if cfg.fp8 and m.n_embd % 16:
        raise ConfigError(f"fp8=true: model.n_embd={m.n_embd} must be a multiple of 16 (fp8 matmuls' shapes); "
                          f"pick another width or fp8=false")
    if cfg.backend == "reference" and cfg.dtype == "bfloat16":
        raise ConfigError("dtype=bfloat16 needs backend=cuda; the reference backend runs float32 or float64")
    if cfg.init_from and cfg.init_from.partition(":")[0] not in ("hf", "llmc"):
        raise ConfigError(f"init_from='{cfg.init_from}': write hf:DIR (Hugging Face GPT-2) or llmc:FILE (llm.c .bin)")
    if cfg.resume not in ("auto", "none") and not os.path.isdir(cfg.resume):
        raise ConfigError(f"resume='{cfg.resume}': no such checkpoint directory; use resume=auto, "
                          f"resume=none or the path of a checkpoint")


def fp8_switch_notes(settings):
    """What of FP8_SWITCHES acts and leaves its default, in the table's order: settings maps
    fp8_scaling, fp8_weight_gradients and the switches (one left out: its default) to values."""
    delayed = settings["fp8_scaling"] == "delayed"
    recipe = delayed and settings["fp8_weight_gradients"]
    return [note for key, (_, needs_recipe, note) in FP8_SWITCHES.items()
            if (recipe if needs_recipe else delayed) and settings.get(key, getattr(Config, key)) != getattr(Config, key)]


def accumulation_steps(cfg: Config, world_size: int) -> int:
    """Micro-steps per optimizer step on each rank."""
    per_micro_step = cfg.train.micro_batch * cfg.train.seq_len * world_size
    return max(1, cfg.train.total_batch_tokens // per_micro_step)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
