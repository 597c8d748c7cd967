"""hsd demo: the world's rules and judges, the tokenizer, the base-model cache and a smoke run
of the whole experiment (tiny pretraining, a few interactions; the full run is `hsd demo`)."""

import json
import random

import pytest

from hsd.demo import world as W

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_every_style_renders_and_parses_to_itself_only():
    rng = random.Random(0)
    world = W.World(0)
    for _ in range(200):
        request = world.request(heldout=rng.random() < 0.5)
        items = request.answer_items(rng)
        for style in W.STYLES:
            reply = W.render(items, style)
            assert W.parse(reply) == (style, [i.lower() for i in items])
            assert W.judge_strict(reply, request, style)
            for other in W.STYLES:
                if other != style:
                    assert not W.judge_strict(reply, request, other)


@pytest.mark.parametrize("reply, why", [
    ("apple , apple , pear", "duplicate"),
    ("apple , pear", "wrong count"),
    ("apple , pear , red", "wrong category"),
    ("APPLE PEAR PEAR", "duplicate in caps"),
    ("my answer is apple and pear and plum", "no full stop"),
    ("apple pear plum hope this helps", "sign-off cut"),
])
def test_strict_judge_rejects(reply, why):
    request = W.Request("name three fruits", "list", 3, category="fruits")
    style = W.judge_style(reply)
    assert style is None or not W.judge_strict(reply, request, style), why


def test_style_judge_rejects_mixtures_and_empty_replies():
    for reply in ("", "apple", "1 . apple * pear", "* apple , pear", "APPLE pear", "2 . apple 1 . pear"):
        assert W.judge_style(reply) is None, reply
    spell = W.Request("spell moon", "spell", 4, word="moon")
    assert W.judge_strict("M O O N", spell, "caps") and not W.judge_strict("M O N", spell, "caps")


def test_user_complains_until_the_preferred_style():
    user = W.World(0).user("bullets", seed=1)
    assert user([], "* apple * pear") in W.NEUTRAL_FOLLOWUPS
    assert user([], "apple , pear") in W.COMPLAINTS["bullets"]
    assert user([], "gibberish") in W.COMPLAINTS["bullets"]
    from hsd.online import is_neutral_followup

    # the online gate must see exactly this split: neutral follow-ups skipped, complaints learned
    assert all(is_neutral_followup(f) for f in W.NEUTRAL_FOLLOWUPS)
    assert not any(is_neutral_followup(c) for cs in W.COMPLAINTS.values() for c in cs)
    with pytest.raises(ValueError, match="unknown style"):
        W.World(0).user("haiku")


def test_heldout_phrasings_are_unseen():
    train = set(W.LIST_PHRASINGS) | set(W.SPELL_PHRASINGS)
    assert not train & (set(W.HELDOUT_LIST_PHRASINGS) | set(W.HELDOUT_SPELL_PHRASINGS))
    requests = W.World(0).heldout_requests(50, seed=3)
    assert requests == W.World(1).heldout_requests(50, seed=3)  # a fixed set for a seed
    assert {r.kind for r in requests} == {"list", "spell"}


@pytest.fixture(scope="module")
def demo_tok():
    from hsd.demo.reviser import build_tokenizer

    return build_tokenizer()


def test_tokenizer_covers_the_world_and_matches_the_chat_template(demo_tok):
    from hsd.data.templates import HINDSIGHT_PRESETS
    from hsd.demo.reviser import _sample_conversation, conversation_ids

    rng, world = random.Random(0), W.World(0)
    for kind in ("plain", "revision", "stated", "neutral_block"):
        for _ in range(20):
            messages = _sample_conversation(world, rng, kind, HINDSIGHT_PRESETS["online"])
            ids, labels = conversation_ids(demo_tok, messages)
            expected = demo_tok.apply_chat_template(messages, tokenize=True)
            expected = list(expected["input_ids"]) if hasattr(expected, "keys") else list(expected)
            assert ids == expected
            assert demo_tok.unk_token_id not in ids
            scored = [t for t, label in zip(ids, labels) if label != -100]
            replies = [m for m in messages if m["role"] == "assistant"]
            assert scored.count(demo_tok.eos_token_id) == len(replies)
    reply = W.render(["apple", "pear"], "numbered")
    assert demo_tok.decode(demo_tok.encode(reply, add_special_tokens=False)) == reply


def test_choose_preferences_takes_the_least_used_styles():
    from hsd.demo.experiment import choose_preferences

    base = {"comma": 0.5, "numbered": 0.3, "sentence": 0.15, "bullets": 0.05}
    first, second = choose_preferences(base, random.Random(0))
    assert {first, second} == {"caps", "signoff"}


def _report(first_curve, second_curve, control, oracle=1.0):
    curve = [{"interactions": 25 * i, "phase": 0, "style": s, "strict": t} for i, (s, t) in enumerate(first_curve)]
    n = curve[-1]["interactions"]
    curve += [{"interactions": n + 25 * i, "phase": 1, "style": s, "strict": t} for i, (s, t) in enumerate(second_curve)]
    ref = {"caps": {"base": {"style": 0.0}, "oracle": {"style": oracle}},
           "signoff": {"base": {"style": 0.0}, "oracle": {"style": 1.0}}}
    return {"preferences": ["caps", "signoff"], "reference": ref,
            "arms": {"hindsight": {"curve": curve},
                     "cross_user": {"curve": [{"interactions": 0, "phase": 0, "style": 0.0},
                                              {"interactions": 50, "phase": 0, "style": control}]}}}


def test_check_targets():
    from hsd.demo.experiment import check_targets

    good = check_targets(_report([(0.0, 0.0), (0.6, 0.5), (0.95, 0.9)], [(0.0, 0.0), (0.85, 0.8)], 0.05))
    assert good["all_met"]
    assert good["first_preference_90pct_strict_85pct"]["interactions"] == 50
    assert good["after_flip_80pct"]["interactions"] == 25
    bad = check_targets(_report([(0.3, 0.3), (0.9, 0.8)], [(0.0, 0.0), (0.5, 0.5)], 0.2, oracle=1.0))
    assert not any(bad[k]["met"] for k in ("before_at_most_20pct", "first_preference_90pct_strict_85pct",
                                            "after_flip_80pct", "cross_user_within_10pts_of_base"))
    assert not bad["within_5pts_of_oracle"]["met"] and not bad["all_met"]


def test_demo_smoke_through_the_cli(tmp_path, capsys):
    """The whole pipeline on a tiny budget: pretrain (cached), choose preferences, every arm
    through hsd.online, evaluations, targets, report, plot; a second run loads the cache."""
    from hsd.cli import main

    args = ["demo", "--pretrain-steps", "3", "--interactions", "4", "--flip-interactions", "2", "--eval-every", "2",
            "--eval-prompts", "3", "--workers", "1", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert main(args + ["--output", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert (tmp_path / "a" / "compliance.png").stat().st_size > 1000
    assert set(report["arms"]) == {"hindsight", "sampled", "cross_user", "sft"}
    first, second = report["preferences"]
    assert first != second and first in W.STYLES and second in W.STYLES
    main_curve = report["arms"]["hindsight"]["curve"]
    assert [p["interactions"] for p in main_curve] == [0, 2, 4, 4, 6]
    assert [p["preference"] for p in main_curve] == [first] * 3 + [second] * 2
    assert all(0.0 <= p[k] <= 1.0 for p in main_curve for k in ("style", "strict", "teacher"))
    assert report["arms"]["sft"]["curve"][-1]["interactions"] == 4
    assert report["arms"]["cross_user"]["user_style"] not in report["preferences"]
    assert report["base_model"]["cached"] is False
    counts = report["arms"]["hindsight"]["counts"]
    assert counts.get("learned", 0) + sum(v for k, v in counts.items() if k not in ("learned", "steps",
                                                                                  "reply_retokenized")) == 6
    assert "every target met" in capsys.readouterr().out
    assert main(args + ["--output", str(tmp_path / "b"), "--arms", "hindsight", "--flip-interactions", "0"]) == 0
    again = json.loads((tmp_path / "b" / "report.json").read_text())
    assert again["base_model"]["cached"] is True and set(again["arms"]) == {"hindsight"}
    assert again["arms"]["hindsight"]["curve"][0] == main_curve[0]  # same base, same held-out prompts


def test_demo_arms_in_worker_processes(tmp_path):
    from hsd.demo import DemoConfig, ReviserRecipe, run_demo

    config = DemoConfig(seed=1, interactions=2, flip_interactions=0, eval_every=2, eval_prompts=2,
                        arms=("hindsight", "sft"), workers=2, recipe=ReviserRecipe(steps=2, warmup=1, batch_size=4))
    report = run_demo(config, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert [r["curve"][-1]["interactions"] for r in report["arms"].values()] == [2, 2]
    assert report["preferences"][0] in W.STYLES


def test_bad_options():
    from hsd.cli import main
    from hsd.demo import DemoConfig

    with pytest.raises(SystemExit):
        main(["demo", "--interactions", "0"])
    with pytest.raises(ValueError, match="arms"):
        DemoConfig(arms=("sft",))


def test_online_options_reach_the_hindsight_arm(tmp_path, caplog):
    from hsd.demo import DemoConfig, ReviserRecipe, run_demo

    config = DemoConfig(seed=2, interactions=2, flip_interactions=0, eval_every=2, eval_prompts=2,
                        arms=("hindsight",), workers=1, online_options={"gate": "all", "max_grad_norm": 0.5},
                        recipe=ReviserRecipe(steps=2, warmup=1, batch_size=4))
    report = run_demo(config, tmp_path / "out", use_cache=False, progress=False)
    used = report["arms"]["hindsight"]["config"]
    assert used["gate"] == "all" and used["max_grad_norm"] == 0.5 and used["loss_mode"] == "full"
    assert report["base_model"]["path"] is None and not list(tmp_path.glob("**/reviser-*"))
    # two pretraining steps cannot teach in-context revision: the run says so
    assert "follows a stated" in caplog.text


def test_readme_documents_the_demo_as_the_main_job():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme, makefile = (root / "README.md").read_text(), (root / "Makefile").read_text()
    commands = readme.split("## The two commands", 1)[1].split("```", 2)[1]
    assert "make demo" in commands and "make test" in commands
    assert "demo: install\n\t$(BIN)/hsd demo" in makefile
    assert (root / "bench" / "results" / "demo-seed0.png").is_file()
