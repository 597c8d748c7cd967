"""The ``hsd`` command.

Each command family registers itself with one ``add_*_commands(subparsers)`` function listed
in ``COMMAND_FAMILIES``; a subcommand stores its handler in ``handler`` and returns an exit code.

    hsd data inspect SOURCE [--tokenizer PATH] [--layout tuple|packed] ...
    hsd data convert SOURCE OUTPUT.jsonl [--tokenizer PATH] ...

Exit codes: 0 success (records skipped under ``--on-error skip`` are counted in the report, not
failures; an input without records or without tuples is a warning); 2 bad input data (a bad
record under ``--on-error raise``, an unreadable file, a template that cannot render a
conversation), a missing file or tokenizer, or a bad option value; 130 interrupted. ``convert``
writes ``OUTPUT.jsonl.partial`` and renames it to ``OUTPUT.jsonl`` only when the run succeeds,
so a failed run never leaves a truncated output that looks complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ._cli_common import json_object, non_negative_int

logger = logging.getLogger("hsd")

# hsd.data.FORMATS, spelled out so that building the parser imports nothing heavy.
SOURCE_FORMATS = ("wildchat", "wildfeedback", "lmsys", "sharegpt", "messages", "tuples")


# ---- hsd data -----------------------------------------------------------------------------


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "off") else int(text)


def _add_pipeline_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("source")
    src.add_argument("source", help="hub dataset name, local .jsonl/.json/.parquet file or directory, or a "
                                    "datasets builder ('json', 'parquet') with --data-files")
    src.add_argument("--format", choices=SOURCE_FORMATS, help="source schema (default: detected from the first row)")
    src.add_argument("--split", default="train")
    src.add_argument("--config-name", default=None, help="dataset configuration name on the hub")
    src.add_argument("--data-files", nargs="+", default=None)
    src.add_argument("--limit", type=non_negative_int, default=None, help="read at most this many conversations")
    src.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                     help="bad records: stop with an error naming the record, or skip and count")
    flt = p.add_argument_group("filters")
    flt.add_argument("--filters", choices=("paper", "none"), default="none",
                     help="filter preset: 'none' keeps every well-formed conversation; 'paper' is the authors' "
                          "preprocessing (FilterConfig.paper, METHOD.md §1)")
    flt.add_argument("--assistant-runs", choices=("first", "last", "skip"), default=None,
                     help="what a run of consecutive assistant messages yields: its first message as y, its last "
                          "(the authors' WildFeedback script) or no tuple (their WildChat script); default: the preset's")
    lay = p.add_argument_group("layout (needs --tokenizer)")
    lay.add_argument("--tokenizer", default=None, help="tokenizer name or local path (AutoTokenizer)")
    lay.add_argument("--layout", choices=("tuple", "packed"), default="tuple")
    lay.add_argument("--template", default="offline", help="'offline', 'online' or a format string with {followup}")
    lay.add_argument("--history-messages", type=_optional_int, default=5, help="per-tuple history (or 'none')")
    lay.add_argument("--max-prompt-tokens", type=_optional_int, default=None)
    lay.add_argument("--max-followup-tokens", type=_optional_int, default=None)
    lay.add_argument("--max-response-tokens", type=_optional_int, default=None)
    lay.add_argument("--max-length", type=_optional_int, default=None, help="packed: window length in tokens")
    lay.add_argument("--ignore-first-k", type=int, default=2)
    lay.add_argument("--followup-overflow", choices=("drop", "truncate"), default="drop")
    lay.add_argument("--end-of-turn-token", default=None,
                     help="the token that closes a reply and is scored after it (default: detected from the template)")
    lay.add_argument("--chat-template-kwargs", type=json_object, default={}, metavar="JSON",
                     help="variables for the chat template, e.g. '{\"enable_thinking\": false}' (Qwen3)")


def load_tokenizer(name: str):
    """``AutoTokenizer.from_pretrained(name)``, with a clear error for a local path that is not there.

    A name that exists on disk, or that can only be a path (starts with ``/``, ``.`` or ``~``,
    or has more than one ``/``), is never looked up on the hub.
    """
    from transformers import AutoTokenizer

    path = Path(name).expanduser()
    local = path.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
    if local and not path.exists():
        raise FileNotFoundError(f"{name}: no such tokenizer directory")
    if local and path.is_dir() and not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                          "tokenizer.model", "vocab.json")):
        raise FileNotFoundError(f"{name}: no tokenizer files in this directory (tokenizer.json, tokenizer_config.json, ...)")
    try:
        return AutoTokenizer.from_pretrained(str(path) if local else name)
    except (OSError, ValueError) as e:
        where = "the local directory" if local else "the hub (or the cache)"
        raise OSError(f"{name}: cannot load a tokenizer from {where}: {e}") from None


def _pipeline(args, report):
    """(tuples iterator, examples iterator or None, tokenizer or None) for the parsed arguments."""
    from hsd.data import FilterConfig, LayoutConfig, extract_tuples, iter_examples, read_conversations

    # Everything that can fail on the options is built before the first record is read.
    tokenizer = config = None
    if args.tokenizer is not None:
        tokenizer = load_tokenizer(args.tokenizer)
        config = LayoutConfig(
            history_messages=args.history_messages,
            max_prompt_tokens=args.max_prompt_tokens,
            max_followup_tokens=args.max_followup_tokens,
            max_response_tokens=args.max_response_tokens,
            max_length=args.max_length,
            ignore_first_k=args.ignore_first_k,
            followup_overflow=args.followup_overflow,
            chat_template_kwargs=args.chat_template_kwargs,
            end_of_turn_token=args.end_of_turn_token,
        )
    conversations = read_conversations(
        args.source, args.format, args.split, streaming=True, config_name=args.config_name,
        data_files=args.data_files, on_error=args.on_error, limit=args.limit, report=report,
    )
    if getattr(args, "progress", False):
        from tqdm.auto import tqdm

        conversations = tqdm(conversations, desc="conversations", unit="conv", file=sys.stderr)
    overrides = {} if args.assistant_runs is None else {"assistant_runs": args.assistant_runs}
    tuples = extract_tuples(conversations, FilterConfig.preset(args.filters, **overrides), report)
    if tokenizer is None:
        return tuples, None, None
    examples = iter_examples(tuples, tokenizer, args.template, config, args.layout, report, on_error=args.on_error)
    return tuples, examples, tokenizer


def _warn_if_empty(report) -> None:
    if report.records_read and not report.tuples_kept:
        logger.warning("no tuples kept from %d records; the report below says why", report.records_read)


def _data_inspect(args) -> int:
    from hsd.data import DataReport, TupleExample
    from hsd.data.inspect import render_example, text_histogram

    report = DataReport()
    tuples, examples, tokenizer = _pipeline(args, report)
    shown: list = []
    if examples is None:
        lengths = {"response characters": [], "follow-up characters": [], "history messages": []}
        for t in tuples:
            lengths["response characters"].append(len(t.y))
            lengths["follow-up characters"].append(len(t.o))
            lengths["history messages"].append(len(t.x))
            if len(shown) < args.examples:
                shown.append(f"conversation {t.conversation_id!r} turn {t.turn_index}\n"
                             f"--- last user message ---\n{t.x[-1]['content']}\n--- y ---\n{t.y}\n--- o ---\n{t.o}")
    else:
        lengths = {}
        for ex in examples:
            if isinstance(ex, TupleExample):
                values = {"student tokens": len(ex.student_ids), "teacher tokens": len(ex.teacher_ids),
                          "shared prefix tokens": ex.prefix_len, "response tokens": len(ex.response_ids)}
            else:
                values = {"sequence tokens": len(ex.input_ids), "scored responses": len(ex.tuples),
                          "student branches": len(ex.student_branches),
                          "teacher suffix tokens": sum(len(t.teacher_suffix_ids) for t in ex.tuples)}
            for name, value in values.items():
                lengths.setdefault(name, []).append(value)
            if len(shown) < args.examples:
                shown.append(render_example(ex, tokenizer))
    _warn_if_empty(report)
    if args.json:
        print(json.dumps({"report": report.as_dict(), "lengths": lengths}))
        return 0
    print(report.summary())
    for name, values in lengths.items():
        print()
        print(text_histogram(values, title=name))
    for text in shown:
        print("\n" + "=" * 72 + "\n" + text)
    return 0


def _data_convert(args) -> int:
    from hsd.data import DataReport

    output = Path(args.output)
    if output.suffix != ".jsonl":
        raise ValueError(f"the output must be a .jsonl file, got {output}")
    source = Path(args.source)
    if source.exists() and source.resolve() in (output.resolve(), output.resolve().parent):
        # Writing over the input, or into the input directory (a later run would read it back).
        raise ValueError(f"the output {output} would overwrite the input {source} or join its files")
    report = DataReport()
    tuples, examples, _ = _pipeline(args, report)
    records = (t.to_row() for t in tuples) if examples is None else (ex.to_dict() for ex in examples)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    written = 0
    try:
        with open(partial, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += 1
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, output)
    _warn_if_empty(report)
    print(report.summary(), file=sys.stderr)
    print(f"wrote {written} {'tuples' if examples is None else args.layout + ' examples'} to {output}", file=sys.stderr)
    return 0


def add_data_commands(subparsers) -> None:
    """``hsd data inspect`` and ``hsd data convert``."""
    data = subparsers.add_parser("data", help="read, filter, tokenise and inspect conversation datasets")
    commands = data.add_subparsers(dest="data_command", required=True)

    inspect = commands.add_parser("inspect", help="counts, length histograms and rendered examples")
    _add_pipeline_arguments(inspect)
    inspect.add_argument("--examples", type=int, default=2, help="how many examples to print")
    inspect.add_argument("--json", action="store_true", help="print counts and lengths as JSON")
    inspect.set_defaults(handler=_data_inspect)

    convert = commands.add_parser("convert", help="write tuples (no --tokenizer) or layout examples as jsonl")
    _add_pipeline_arguments(convert)
    convert.add_argument("output", help="output .jsonl path")
    convert.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    convert.set_defaults(handler=_data_convert)


# ---- entry point --------------------------------------------------------------------------

from .info import add_info_commands  # noqa: E402  (hsd info)
from .train_cli import add_train_commands  # noqa: E402  (hsd train)
from .online_cli import add_online_commands  # noqa: E402  (hsd chat, hsd inspect)
from .demo_cli import add_demo_commands  # noqa: E402  (hsd demo)

#: Functions that add one command family to the ``hsd`` parser.
COMMAND_FAMILIES = [add_data_commands, add_info_commands, add_online_commands, add_train_commands, add_demo_commands]


def build_parser() -> argparse.ArgumentParser:
    """The ``hsd`` argument parser with every registered command family."""
    parser = argparse.ArgumentParser(prog="hsd", description="hindsight self-distillation from logged conversations")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_commands in COMMAND_FAMILIES:
        add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``hsd`` command; returns the exit code (see the module docstring: 0 success, 2 bad
    input data, missing files or bad option values, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(name)s: %(message)s")
    try:
        return args.handler(args)
    except BrokenPipeError:  # `hsd data inspect ... | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as e:  # hsd.data.DataError, bad option values, missing files
        if args.verbose:
            raise
        print(f"hsd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hsd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
