"""The multiple-choice scorer against a hand computation, and task prompts against lm-eval's templates."""

from __future__ import annotations

import math

import json

import pytest
import torch

from foe.eval.scoring import encode_pair, score_items
from foe.eval.tasks import MCItem, load_task
from foe.tokenizer import eos_id, train_bpe
from tests.conftest import build, tiny

TEXT = ["The cat sat on the mat. The dog sat on the log. Two plus two is four, not five. " * 20,
        "Question: what is it?\nAnswer: it is a cat. Hello and goodbye. " * 20]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXT, 320)


@torch.no_grad()
def _chain_loglik(model, ctx_ids: list[int], cont_ids: list[int]) -> float:
    """log p(cont | ctx) token by token, one forward pass per prefix: no batching, padding or slicing."""
    total, prefix = 0.0, list(ctx_ids)
    for t in cont_ids:
        logits = model(torch.tensor([prefix])).logits[0, -1].double()
        total += float(logits.log_softmax(-1)[t])
        prefix.append(t)
    return total


@pytest.mark.parametrize("arch", ["moe", "foe"])
def test_scorer_matches_hand_computation(tok, arch: str) -> None:
    model = build(tiny(arch), seed=3)
    items = [MCItem("The cat sat on the", ["mat.", "log and the dog.", "moon"], 0),
             MCItem("Question: two plus two?\nAnswer: ", ["four", "five"], 0),  # trailing space moves
             MCItem("", ["Hello", "goodbye and hello"], 1)]  # empty context -> EOS
    expected_acc = expected_norm = 0
    for it in items:
        lls = []
        for c in it.choices:
            ctx = it.context.rstrip(" ")
            cont = it.context[len(ctx):] + " " + c
            ctx_ids = tok.encode(ctx).ids if ctx else [eos_id(tok)]
            cont_ids = tok.encode(ctx + cont).ids[len(ctx_ids):] if ctx else tok.encode(cont).ids
            assert (ctx_ids, cont_ids) == encode_pair(tok, it.context, " " + c)
            lls.append(_chain_loglik(model, ctx_ids, cont_ids))
        expected_acc += lls.index(max(lls)) == it.gold
        norm = [ll / len(c) for ll, c in zip(lls, it.choices)]
        expected_norm += norm.index(max(norm)) == it.gold
    for batch_size in (1, 4):
        got = score_items(model, tok, items, batch_size=batch_size)
        # lm-eval's stderr of a 0/1 mean: sample std (n - 1) / sqrt(n) = sqrt(p (1 - p) / (n - 1)).
        se = [math.sqrt(p * (1 - p) / 2) for p in (expected_acc / 3, expected_norm / 3)]
        assert got == pytest.approx({"acc": expected_acc / 3, "acc_stderr": se[0], "acc_norm": expected_norm / 3,
                                     "acc_norm_stderr": se[1], "n": 3}, abs=1e-12)


def test_loglikelihoods_match_chain_rule(tok) -> None:
    from foe.eval.scoring import loglikelihoods
    model = build(tiny("foe"), seed=5)
    requests = [("The dog sat", " on the log."), ("Two plus", " two is four, not five."), ("", "Hello")]
    got = loglikelihoods(model, tok, requests, batch_size=3)  # padded batch of different lengths
    for (ctx, cont), g in zip(requests, got):
        ref = _chain_loglik(model, *encode_pair(tok, ctx, cont))
        assert g == pytest.approx(ref, abs=2e-4)


RECORDS = {
    "arc_easy": ({"id": "x", "question": "Which is a mammal?", "choices": {"text": ["shark", "whale"],
                  "label": ["A", "B"]}, "answerKey": "B"},
                 MCItem("Question: Which is a mammal?\nAnswer:", ["shark", "whale"], 1)),
    "boolq": ({"question": "is the sky blue", "passage": "The sky is blue.", "idx": 0, "label": 1},
              MCItem("The sky is blue.\nQuestion: is the sky blue?\nAnswer:", ["no", "yes"], 1)),
    "copa": ({"premise": "The ground was wet.", "choice1": "It rained.", "choice2": "It was sunny.",
              "question": "cause", "idx": 0, "label": 0},
             MCItem("The ground was wet because", [" it rained.", " it was sunny."], 0)),
    "hellaswag": ({"activity_label": "Baking", "ctx_a": "A man mixes flour.", "ctx_b": "he",
                   "endings": ["kneads it [title] well.", "eats  it."], "label": "0"},
                  MCItem("Baking: A man mixes flour. He", ["kneads it. well.", "eats it."], 0)),
    "piqa": ({"goal": "Dry hands", "sol1": "Use a towel.", "sol2": "Use water.", "label": 0},
             MCItem("Question: Dry hands\nAnswer:", ["Use a towel.", "Use water."], 0)),
    "sciq": ({"question": "What is ice?", "distractor1": "steam", "distractor2": "gas", "distractor3": "fire",
              "correct_answer": "frozen water", "support": "  Ice is frozen water."},
             MCItem("Ice is frozen water.\nQuestion: What is ice?\nAnswer:",
                    ["steam", "gas", "fire", "frozen water"], 3)),
}


@pytest.mark.parametrize("task", sorted(RECORDS))
def test_task_prompts_follow_lm_eval(tmp_path, task: str) -> None:
    record, expected = RECORDS[task]
    path = tmp_path / f"{task}.jsonl"
    path.write_text(json.dumps(record) + "\n")
    assert load_task(task, path) == [expected]
    assert len(load_task(task)) >= 20  # the built-in smoke-test set loads
