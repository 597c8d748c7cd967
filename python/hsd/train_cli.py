"""``hsd train``: offline hindsight distillation from the command line.

The flags are the fields of three dataclasses read by ``transformers.HfArgumentParser``:
:class:`ModelArguments`, :class:`DataArguments` and :class:`hsd.HSDConfig` (every
``TrainingArguments`` flag plus hsd's). Give them as flags, as a YAML (or JSON) file, or
both (flags after the file override it)::

    hsd train --model_name_or_path Qwen/Qwen3-4B --dataset_name microsoft/WildFeedback \\
        --output_dir out --bf16 --max_tokens_per_batch 16384
    hsd train config.yaml --learning_rate 1e-6
    accelerate launch -m hsd train config.yaml        # several processes, unchanged
    hsd train config.yaml --resume_from_checkpoint true   # the last checkpoint in output_dir

Everything that can be checked without model weights is checked first (hsd's settings, the
dataset path, the tokenizer and its chat template, the model's configuration against the
chosen teacher and attention), and the data is tokenised before the weights load: a bad
configuration fails in seconds with a one-line reason (exit code 2). A first Ctrl-C finishes
the current optimiser step, saves a checkpoint and exits with 130.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("hsd")

__all__ = ["ModelArguments", "DataArguments", "add_train_commands", "parse_train_args", "run_train"]


@dataclass
class ModelArguments:
    """Which model to train, and how."""

    model_name_or_path: str = field(default=None, metadata={"help": "hub name or local directory of a causal LM"})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "tokenizer (default: the model's)"})
    dtype: str = field(default="float32", metadata={
        "help": "weights' dtype: float32, bfloat16, float16 or auto (use --bf16 for mixed precision)"})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "sdpa, eager, flex_attention, flash_attention_2, ... (default: transformers' choice)"})
    use_peft: bool = field(default=False, metadata={"help": "train a LoRA adapter instead of all weights"})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank (the authors' online trainer: 64)"})
    lora_alpha: int = field(default=128, metadata={"help": "LoRA alpha (the authors': 128)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_target_modules: str = field(default="all-linear", metadata={
        "help": "comma-separated module names, or 'all-linear'"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow models with custom code"})


@dataclass
class DataArguments:
    """Which conversations to learn from (the filters and the layout are in HSDConfig)."""

    dataset_name: str = field(default=None, metadata={
        "help": "hub dataset name, or a local .jsonl/.json/.parquet file or directory"})
    dataset_config: str | None = field(default=None, metadata={"help": "dataset configuration on the hub"})
    dataset_split: str = field(default="train", metadata={"help": "split to train on"})
    dataset_limit: int | None = field(default=None, metadata={"help": "read at most this many conversations"})


_DTYPES = ("float32", "bfloat16", "float16", "auto")


def _parser():
    from transformers import HfArgumentParser

    from .trainer import HSDConfig

    return HfArgumentParser((ModelArguments, DataArguments, HSDConfig), prog="hsd train")


def _file_to_flags(path: Path) -> list[str]:
    """A YAML/JSON config file as flags, so that flags given after it override it."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such config file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        values = json.loads(text)
    else:
        import yaml

        values = yaml.safe_load(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config file must hold a mapping of option names to values")
    flags = []
    for key, value in values.items():
        if value is None:
            continue
        flags.append(f"--{key}")
        if isinstance(value, (list, tuple)):
            flags.extend(str(v) for v in value)
        elif isinstance(value, dict):
            flags.append(json.dumps(value))
        else:
            flags.append(str(value))
    return flags


def parse_train_args(argv: list[str]):
    """(ModelArguments, DataArguments, HSDConfig) from flags and/or a leading config file."""
    argv = list(argv)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")) and not argv[0].startswith("-"):
        argv = _file_to_flags(Path(argv[0])) + argv[1:]
    model_args, data_args, args = _parser().parse_args_into_dataclasses(args=argv)
    if not model_args.model_name_or_path:
        raise ValueError("--model_name_or_path is required")
    if not data_args.dataset_name:
        raise ValueError("--dataset_name is required")
    if model_args.dtype not in _DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(_DTYPES)}; got {model_args.dtype!r}")
    return model_args, data_args, args


def _is_local(name: str) -> bool:
    return (Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1
            or Path(name).suffix in (".jsonl", ".json", ".parquet"))


def _check_model_config(model_args: ModelArguments, args) -> None:
    """What the model's configuration (no weights) says about the run."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from .step import logit_transform

    name = model_args.model_name_or_path
    if _is_local(name) and not Path(name).expanduser().is_dir():
        raise FileNotFoundError(f"{name}: no such model directory")
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as e:
        raise OSError(f"{name}: cannot read the model's configuration: {str(e).splitlines()[0]}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not model_args.trust_remote_code:
        raise ValueError(f"{name}: model type {config.model_type!r} is not a causal LM transformers can load")
    transform = logit_transform(config)
    if transform is not None:
        raise ValueError(f"{name}: the model transforms its logits ({transform[0]}={transform[1]}); the fused "
                         "hindsight loss scores log-softmax(hidden @ W.T) and cannot train it")
    if args.teacher == "base" and not model_args.use_peft:
        raise ValueError("--teacher base is the model with its LoRA adapter disabled: add --use_peft")
    attn = model_args.attn_implementation or ""
    if attn.startswith(("flash", "paged")) and args.teacher_strategy == "masked":
        raise ValueError(f"--teacher_strategy masked needs an explicit 4D mask, which {attn} cannot take; "
                         "use 'loop' or 'auto'")


def _load_tokenizer(model_args: ModelArguments):
    from .cli import load_tokenizer

    tokenizer = load_tokenizer(model_args.tokenizer_name_or_path or model_args.model_name_or_path)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{model_args.tokenizer_name_or_path or model_args.model_name_or_path}: the tokenizer has "
                         "no chat template (hsd renders conversations with it); use an instruct/chat model's tokenizer")
    return tokenizer


def _load_data(data_args: DataArguments, tokenizer, args):
    from .data import DataReport, extract_tuples, read_conversations
    from .trainer import build_examples

    name = data_args.dataset_name
    if _is_local(name) and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"{name}: no such dataset file or directory")
    report = DataReport()
    conversations = read_conversations(name, args.dataset_format, data_args.dataset_split,
                                       config_name=data_args.dataset_config, on_error=args.data_on_error,
                                       limit=data_args.dataset_limit, report=report)
    tuples = list(extract_tuples(conversations, args.filter_config(), report))
    examples = build_examples(tuples, tokenizer, args, report)
    logger.info("data report:\n%s", report.summary())
    return examples


def _load_model(model_args: ModelArguments):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"trust_remote_code": model_args.trust_remote_code}
    if model_args.dtype != "auto":
        kwargs["dtype"] = getattr(torch, model_args.dtype)
    else:
        kwargs["dtype"] = "auto"
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)
    if model_args.use_peft:
        from peft import LoraConfig, get_peft_model

        targets = model_args.lora_target_modules
        targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
        model = get_peft_model(model, LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                                                 lora_dropout=model_args.lora_dropout, target_modules=targets,
                                                 task_type="CAUSAL_LM"))
    return model


def _resume_value(value, output_dir: str):
    if value is None or value == "":
        return None
    if str(value).lower() in ("true", "last", "latest"):
        from transformers.trainer_utils import get_last_checkpoint

        if not os.path.isdir(output_dir) or get_last_checkpoint(output_dir) is None:
            raise FileNotFoundError(f"--resume_from_checkpoint {value}: no checkpoint-* directory in {output_dir}")
        return True
    if not Path(value).is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: no such checkpoint directory")
    return value


def run_train(argv: list[str], callbacks=None) -> int:
    """Parse, check, load, train; returns the exit code (0 done, 130 stopped by SIGINT after
    saving). ``callbacks``: extra ``TrainerCallback`` objects (for embedding and tests)."""
    model_args, data_args, args = parse_train_args(argv)
    resume = _resume_value(args.resume_from_checkpoint, args.output_dir)
    # everything that can fail without weights, cheapest first
    _check_model_config(model_args, args)
    tokenizer = _load_tokenizer(model_args)
    examples = _load_data(data_args, tokenizer, args)

    from .trainer import HSDTrainer

    model = _load_model(model_args)
    trainer = HSDTrainer(model, args, train_dataset=examples, processing_class=tokenizer, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    if trainer.interrupted:
        print(f"hsd: interrupted at step {trainer.state.global_step}; checkpoint saved in {args.output_dir}; "
              "continue with --resume_from_checkpoint true", file=sys.stderr)
        return 130
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        logger.info("model saved to %s", args.output_dir)
    return 0


def _train(cli_args) -> int:
    argv = cli_args.train_args
    if not argv or any(a in ("-h", "--help") for a in argv):
        _parser().print_help()
        return 0 if argv else 2
    return run_train(argv)


def add_train_commands(subparsers) -> None:
    """``hsd train``: its flags are parsed by HfArgumentParser (``hsd train --help`` lists them)."""
    import argparse

    train = subparsers.add_parser(
        "train", add_help=False, help="offline hindsight distillation (HSDTrainer); hsd train --help for the flags",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        prefix_chars="+")  # no option of its own: every --flag is passed on to HfArgumentParser
    train.add_argument("train_args", nargs="*", help="CONFIG.yaml and/or --flags (see hsd train --help)")
    train.set_defaults(handler=_train)
