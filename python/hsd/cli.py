"""The ``hsd`` command.

Each command family registers itself with one ``add_*_commands(subparsers)`` function listed
in ``COMMAND_FAMILIES``; a subcommand stores its handler in ``handler`` and returns an exit code.

    hsd data inspect SOURCE [--tokenizer PATH] [--layout tuple|packed] ...
    hsd data convert SOURCE OUTPUT.jsonl [--tokenizer PATH] ...
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

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
    src.add_argument("--limit", type=int, default=None, help="read at most this many conversations")
    src.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                     help="bad records: stop with an error naming the record, or skip and count")
    flt = p.add_argument_group("filters")
    flt.add_argument("--filters", choices=("paper", "none"), default="none", help="filter preset (paper: METHOD.md §1)")
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


def _pipeline(args, report):
    """(tuples iterator, examples iterator or None, tokenizer or None) for the parsed arguments."""
    from hsd.data import FilterConfig, LayoutConfig, extract_tuples, iter_examples, read_conversations

    conversations = read_conversations(
        args.source, args.format, args.split, streaming=True, config_name=args.config_name,
        data_files=args.data_files, on_error=args.on_error, limit=args.limit, report=report,
    )
    if getattr(args, "progress", False):
        from tqdm.auto import tqdm

        conversations = tqdm(conversations, desc="conversations", unit="conv", file=sys.stderr)
    tuples = extract_tuples(conversations, FilterConfig.preset(args.filters), report)
    if args.tokenizer is None:
        return tuples, None, None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = LayoutConfig(
        history_messages=args.history_messages,
        max_prompt_tokens=args.max_prompt_tokens,
        max_followup_tokens=args.max_followup_tokens,
        max_response_tokens=args.max_response_tokens,
        max_length=args.max_length,
        ignore_first_k=args.ignore_first_k,
        followup_overflow=args.followup_overflow,
    )
    examples = iter_examples(tuples, tokenizer, args.template, config, args.layout, report)
    return tuples, examples, tokenizer


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
                          "teacher suffix tokens": sum(len(t.teacher_suffix_ids) for t in ex.tuples)}
            for name, value in values.items():
                lengths.setdefault(name, []).append(value)
            if len(shown) < args.examples:
                shown.append(render_example(ex, tokenizer))
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
        raise SystemExit(f"hsd: error: the output must be a .jsonl file, got {output}")
    report = DataReport()
    tuples, examples, _ = _pipeline(args, report)
    records = (t.to_row() for t in tuples) if examples is None else (ex.to_dict() for ex in examples)
    output.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(output, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            written += 1
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

#: Functions that add one command family to the ``hsd`` parser.
COMMAND_FAMILIES = [add_data_commands]


def build_parser() -> argparse.ArgumentParser:
    """The ``hsd`` argument parser with every registered command family."""
    parser = argparse.ArgumentParser(prog="hsd", description="hindsight self-distillation from logged conversations")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_commands in COMMAND_FAMILIES:
        add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``hsd`` command; returns the exit code (2 for bad input data or option values)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(name)s: %(message)s")
    try:
        return args.handler(args)
    except (ValueError, OSError) as e:  # hsd.data.DataError, bad option values, missing files
        if args.verbose:
            raise
        print(f"hsd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
