"""`distgpt <command>`: train, prepare, sample.

`train` and `sample` take Hydra overrides (model=gpt2_124m +run=debug_cpu train.max_steps=50);
`prepare` takes ordinary flags. A user's mistake ends in one line on stderr and exit code 2,
never a traceback.
"""
import argparse
import sys
import time

SILENT_RANK_GRACE_S = 3.0  # how long a rank that stays silent about an error waits before exiting

USAGE = """distgpt <command> [args]

commands:
  train   [overrides...]      train a GPT-2 (Hydra overrides: model=gpt2_124m +run=single_gpu ...)
  prepare INPUT... [--out D]  tokenize .txt/.jsonl/.parquet into llm.c-format train/val shards
  sample  CHECKPOINT [flags]  generate text from a checkpoint directory (or a run directory)
  bench   [--model M --batch B]  time the CUDA training step (tokens/s, MFU, memory)
  eval    hellaswag RUN_OR_CKPT  HellaSwag accuracy of a checkpoint (acc, acc_norm)
  plot    RUN_DIR... [--out F]   a PNG of loss, val loss, lr, tokens/s, HellaSwag for several runs
  export  RUN_OR_CKPT --format hf|llmc --out PATH   weights for transformers or llm.c
"""


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    commands = {"train": cmd_train, "prepare": cmd_prepare, "sample": cmd_sample, "bench": cmd_bench,
                "eval": cmd_eval, "plot": cmd_plot, "export": cmd_export}
    if command not in commands:
        # `distgpt model=tiny` is a train with overrides
        if "=" in command:
            command, rest = "train", argv
        else:
            return _fail(f"unknown command '{command}'; choose one of: {', '.join(commands)}")
    try:
        return commands[command](rest) or 0
    except KeyboardInterrupt:
        print("\ninterrupted; resume=auto continues from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as exc:  # user-facing errors become one line; bugs keep their traceback
        if _is_user_error(exc):
            return _fail(str(exc), _same_on_every_rank(exc))
        raise


def _is_user_error(exc):
    from distgpt.checkpoint import CheckpointError
    from distgpt.config import ConfigError
    from distgpt.data.shards import ShardError
    from distgpt.data.sources import PrepareError
    from distgpt.parallel.rendezvous import RendezvousError
    from distgpt.interop.hf import FormatError
    from distgpt.train import TrainingError
    return isinstance(exc, (ConfigError, ShardError, CheckpointError, TrainingError, FileNotFoundError,
                            FormatError, PrepareError, RendezvousError))


def _same_on_every_rank(exc):
    from distgpt.config import ConfigError
    return isinstance(exc, ConfigError) or getattr(exc, "same_on_every_rank", False)


def _fail(message, same_on_every_rank=True):
    """A config mistake is met by every rank alike, so rank 0 alone reports it; anything
    else (a file missing on one node, one rank's optimizer shard) is reported by each rank
    that meets it, with its rank."""
    from distgpt.parallel.bootstrap import launcher_rank
    from distgpt.logging import error
    line = message.strip().splitlines()[0] if message.strip() else "failed"
    rank = launcher_rank()
    if rank == 0:
        error(line)
    elif not same_on_every_rank:
        error(f"rank {rank}: {line}")
    else:
        # a launcher ends the whole job when the first rank exits non-zero: a silent rank that
        # got there first would take rank 0 down before its line is out
        time.sleep(SILENT_RANK_GRACE_S)
    return 2


def cmd_train(overrides):
    from distgpt.config import load_config
    from distgpt.parallel.bootstrap import bootstrap
    from distgpt.train import Trainer
    cfg = load_config(overrides)
    device = resolve_device(cfg)
    dist = bootstrap(device, comm_timeout_s=cfg.comm_timeout_s, rendezvous=cfg.rendezvous)
    return Trainer(cfg, dist).run()  # 0, or preemption.PREEMPTED_EXIT_CODE (75) after a SIGTERM/SIGUSR1


def resolve_device(cfg):
    import torch
    from distgpt.config import ConfigError
    device = cfg.device
    if device == "auto":
        device = "cuda" if cfg.backend == "cuda" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible; use device=cpu backend=reference "
                          "(e.g. +run=debug_cpu), or run on a GPU machine")
    if cfg.backend == "cuda" and device != "cuda":
        raise ConfigError("backend=cuda runs on device=cuda only; use backend=reference on the CPU")
    return device


def cmd_prepare(args):
    parser = argparse.ArgumentParser(prog="distgpt prepare",
                                     description="Tokenize text into llm.c-format token shards.")
    parser.add_argument("inputs", nargs="+", help=".txt (one document), .jsonl (one per line) or .parquet "
                        "(one per row) files; directories of them; globs (quote them: 'data/*.parquet')")
    parser.add_argument("--out", default="data", help="output directory (default: data)")
    parser.add_argument("--name", default=None, help="shard name prefix (default: the first input's file "
                        "stem, directory name, or a glob's last plain folder)")
    parser.add_argument("--val-tokens", type=int, default=None,
                        help="the first N tokens are validation (FineWeb recipes: 100000000)")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="the last fraction of tokens is validation (default 0.1 without --val-tokens)")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    parser.add_argument("--text-key", "--text-column", dest="text_key", default="text",
                        help="the .jsonl field or .parquet column holding the text (default: text)")
    parser.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: every core)")
    parser.add_argument("--tokenizer", default=None, help="GPT-2 rank file (default: the packaged one)")
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    a = parser.parse_args(args)
    from distgpt.data.prepare import prepare
    prepare(a.inputs, a.out, name=a.name, val_fraction=a.val_fraction, val_tokens=a.val_tokens,
            shard_tokens=a.shard_tokens, text_key=a.text_key, rank_file=a.tokenizer, workers=a.workers,
            progress=not a.no_progress)


def cmd_sample(args):
    parser = argparse.ArgumentParser(prog="distgpt sample", description="Generate text from a checkpoint.")
    parser.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its latest checkpoint)")
    parser.add_argument("--prompt", default="\n")
    parser.add_argument("--tokens", type=int, default=200, help="how many tokens to generate")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=40, help="0 = no top-k cut")
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(args)
    from distgpt.sample import sample_from_checkpoint
    sample_from_checkpoint(a.checkpoint, a.prompt, a.tokens, a.temperature, a.top_k, a.seed)


def cmd_eval(args):
    from distgpt.hellaswag import DEFAULT_PATH, SOURCE_URL
    parser = argparse.ArgumentParser(prog="distgpt eval", description="Evaluate a checkpoint.",
                                     epilog=f"HellaSwag's val set: {SOURCE_URL}")
    parser.add_argument("task", choices=["hellaswag"])
    parser.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its latest checkpoint)")
    parser.add_argument("--file", default=DEFAULT_PATH, help=f"the HellaSwag .jsonl (default: {DEFAULT_PATH})")
    parser.add_argument("--limit", type=int, default=0, help="score the first N items only (0 = all)")
    a = parser.parse_args(args)
    from distgpt.hellaswag import evaluate_checkpoint
    evaluate_checkpoint(a.checkpoint, a.file, a.limit)


def cmd_plot(args):
    from distgpt.plot import main as plot_main
    return plot_main(args)


def cmd_export(args):
    parser = argparse.ArgumentParser(prog="distgpt export", description="Write a checkpoint's weights for "
                                     "Hugging Face transformers (a GPT2LMHeadModel directory) or llm.c (a model .bin).")
    parser.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its latest checkpoint)")
    parser.add_argument("--format", choices=("hf", "llmc"), required=True)
    parser.add_argument("--out", required=True, help="hf: a directory; llmc: a .bin file")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    a = parser.parse_args(args)
    from distgpt.interop import export
    print(f"wrote {export(a.checkpoint, a.format, a.out, a.dtype)}")


def cmd_bench(args):
    from distgpt.bench import main as bench_main
    return bench_main(args)
