"""Tokenisation cost and windowing of long conversations, packed vs per-tuple (CPU only).

For conversations of N turns with realistic message lengths (users: a sentence to a paragraph;
assistants: several paragraphs), tokenised with a byte-level BPE trained in-process, prints:
conversation tokens, windows, student tokens / conversation tokens, the shortest context a
scored reply sees (against min(history, max_length / 2)), and the tokenisation time of the
packed layout and of the per-tuple layout (the paper's 5-message history, and unlimited).
Times are the best of ``--repeat`` cold runs (segment cache cleared), in process CPU seconds by
default (``--clock cpu``: all threads, robust on a shared machine), or wall seconds (``--clock wall``).

    .venv/bin/python bench/bench_data.py --turns 40 160 --max-length 2048
"""

from __future__ import annotations

import argparse
import time

from hsd.data import ChatRenderer, Conversation, DataReport, LayoutConfig, conversation_tuples, tokenize_conversation, tokenize_tuple
from hsd.data.testing import synthetic_conversation, tiny_chat_tokenizer


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def best_time(fn, repeat: int, renderer: ChatRenderer, clock=time.process_time) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        renderer.clear_cache()  # cold: no segment ids memoised from an earlier run
        start = clock()
        out = fn()
        best = min(best, clock() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, nargs="+", default=[20, 40, 80, 160])
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--style", default="chatml", help="chat template style (hsd.data.testing.CHAT_TEMPLATES)")
    parser.add_argument("--kwargs", default="", help="'nothink' passes enable_thinking=False")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--per-tuple-unlimited", action="store_true", help="also time per-tuple with all history")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="process CPU time or wall time")
    args = parser.parse_args()
    clock = CLOCKS[args.clock]

    corpus = [m["content"] for seed in range(3) for m in synthetic_conversation(20, seed=100 + seed)]
    tok = tiny_chat_tokenizer(args.style, vocab_size=2000, corpus=corpus)
    kwargs = {"enable_thinking": False} if args.kwargs == "nothink" else {}
    renderer = ChatRenderer.for_tokenizer(tok, kwargs)
    packed_cfg = LayoutConfig(history_messages=None, max_length=args.max_length, chat_template_kwargs=kwargs)
    header = (f"{'turns':>5} {'conv tok':>8} {'windows':>7} {'student tok':>11} {'ratio':>5} {'min ctx':>7} "
              f"{'need':>5} {'packed s':>8} {'tuple(5) s':>10}")
    if args.per_tuple_unlimited:
        header += f" {'tuple(all) s':>12} {'ratio(all)':>10}"
    print(f"style={args.style} {kwargs or ''} max_length={args.max_length} clock={args.clock}")
    print(header)
    for turns in args.turns:
        messages = synthetic_conversation(turns, seed=turns)
        tuples = conversation_tuples(Conversation(messages, id=f"long{turns}"))
        report = DataReport()

        def packed():
            r = DataReport()
            return tokenize_conversation(tuples, tok, "offline", packed_cfg, r), r

        t_packed, (examples, report) = best_time(packed, args.repeat, renderer, clock)
        # The shortest context (student tokens before y) a scored reply sees, against what the
        # window plan promises it: min(its whole history, max_length / 2).
        whole = tokenize_conversation(tuples, tok, "offline", LayoutConfig(history_messages=None, chat_template_kwargs=kwargs))[0]
        history = {p.turn_index: whole.position_ids[p.response_start] for p in whole.tuples}
        slack = [(e.position_ids[p.response_start], min(history[p.turn_index], args.max_length // 2))
                 for e in examples for p in e.tuples]
        min_ctx, need = min(slack, key=lambda pair: pair[0] - pair[1])
        cfg5 = LayoutConfig(history_messages=5, chat_template_kwargs=kwargs)
        t_tuple, _ = best_time(lambda: [tokenize_tuple(t, tok, "offline", cfg5) for t in tuples], args.repeat, renderer,
                               clock)
        line = (f"{turns:>5} {report.conversation_tokens:>8} {len(examples):>7} {report.student_tokens:>11} "
                f"{report.student_token_ratio:>5.2f} {min_ctx:>7} {need:>5} {t_packed:>8.3f} {t_tuple:>10.3f}")
        if args.per_tuple_unlimited:
            all_cfg = LayoutConfig(history_messages=None, chat_template_kwargs=kwargs)
            t_all, exs = best_time(lambda: [tokenize_tuple(t, tok, "offline", all_cfg) for t in tuples], 1, renderer,
                                   clock)
            line += f" {t_all:>12.3f} {sum(len(e.student_ids) for e in exs) / report.conversation_tokens:>10.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
