"""Tests of the reward functions, ``evaluate_rewards`` and the bundled verifiable tasks."""

from __future__ import annotations

import math
import re
import textwrap

import pytest

from plait.plugins.basics.data import IGNORE_INDEX, tokenize_example
from plait.plugins.basics.tokenizer import load_tokenizer
from plait.plugins.infinite_sampling.rewards import (
    ExactMatch,
    PythonCallable,
    RegexFormat,
    evaluate_rewards,
)
from plait.plugins.infinite_sampling.tasks import SINGLE_TOKEN_LETTERS, AdditionTask, CopyTask

# --------------------------------------------------------------------------
# Reward functions
# --------------------------------------------------------------------------

def test_exact_match():
    fn = ExactMatch()
    prompts = ["3+4="] * 5
    completions = ["7", " 7\n", "70", "", "7 "]
    assert fn(prompts, completions, answer=["7", "7", "7", "7", " 7"]) == [1.0, 1.0, 0.0, 0.0, 1.0]
    strict = ExactMatch(strip=False)
    assert strict(prompts, completions, answer=["7"] * 5) == [1.0, 0.0, 0.0, 0.0, 0.0]
    # Non-string fields are compared as strings; other fields are ignored.
    assert ExactMatch(field="target")(["p"], ["12"], target=[12], answer=["x"]) == [1.0]
    with pytest.raises(ValueError, match=r"no field 'answer'.*target"):
        fn(["p"], ["x"], target=["x"])
    with pytest.raises(ValueError, match="2 values but there are 1"):
        fn(["p"], ["x"], answer=["x", "y"])


def test_regex_format_fullmatch_and_search():
    completions = ["42", "42 apples", "x", "<a>7</a>"]
    prompts = [""] * 4
    assert RegexFormat(r"\d+")(prompts, completions) == [1.0, 0.0, 0.0, 0.0]
    assert RegexFormat(r"\d+", mode="search", reward=0.5)(prompts, completions) == [0.5, 0.5, 0.0, 0.5]
    assert RegexFormat(r"<a>\d</a>", reward=2.0)(prompts, completions, answer=["a"] * 4) == [0, 0, 0, 2.0]
    assert RegexFormat(r"a.b", flags=re.DOTALL)([""], ["a\nb"]) == [1.0]
    with pytest.raises(ValueError, match="invalid regex"):
        RegexFormat("(")
    with pytest.raises(ValueError, match="mode"):
        RegexFormat("a", mode="match")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = "plait_test_user_rewards"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        def length_reward(prompts, completions, **fields):
            return [float(len(c)) for c in completions]

        class Holder:
            @staticmethod
            def neg(prompts, completions, **fields):
                return [-1.0 for _ in completions]

        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    import sys
    sys.modules.pop(name, None)


def test_python_callable(user_module):
    fn = PythonCallable(f"{user_module}:length_reward")
    assert fn(["a", "b"], ["xyz", ""], answer=["1", "2"]) == [3.0, 0.0]
    assert fn.name == f"{user_module}:length_reward"
    assert PythonCallable(f"{user_module}.length_reward")(["a"], ["ab"]) == [2.0]
    assert PythonCallable(f"{user_module}:Holder.neg")(["a"], ["ab"]) == [-1.0]


@pytest.mark.parametrize("path, message", [
    ("no_such_module_xyz:fn", r"'no_such_module_xyz:fn'.*cannot import module 'no_such_module_xyz'"),
    ("{m}:missing", r"'{m}:missing'.*no attribute 'missing'"),
    ("{m}:NOT_CALLABLE", r"'{m}:NOT_CALLABLE' is not callable"),
    ("nocolon", r"'nocolon' must look like"),
    ("", "non-empty"),
])
def test_python_callable_errors(user_module, path, message):
    with pytest.raises(ValueError, match=message.format(m=user_module)):
        PythonCallable(path.format(m=user_module))


# --------------------------------------------------------------------------
# evaluate_rewards
# --------------------------------------------------------------------------

PROMPTS = ["1+1=", "2+2=", "3+3=", "4+4="]
COMPLETIONS = ["2", "5", "6", "8!"]
FIELDS = {"answer": ["2", "4", "6", "8"]}


def test_evaluate_rewards_weighted_sum():
    fns = [ExactMatch(), RegexFormat(r"\d+")]
    res = evaluate_rewards(fns, [1.0, 0.25], PROMPTS, COMPLETIONS, FIELDS)
    assert res.rewards == [1.25, 0.25, 1.25, 0.0]
    assert res.per_function == {"exact_match[answer]": [1.0, 0.0, 1.0, 0.0], r"regex_fullmatch[\d+]": [1.0, 1.0, 1.0, 0.0]}
    assert res.skipped == 0 and res.skipped_by_function == {}
    # default weights = 1; duplicate names get a suffix
    res = evaluate_rewards([ExactMatch(), ExactMatch()], None, PROMPTS, COMPLETIONS, FIELDS)
    assert res.rewards == [2.0, 0.0, 2.0, 0.0]
    assert list(res.per_function) == ["exact_match[answer]", "exact_match[answer]#1"]


def test_evaluate_rewards_none_abstains():
    def only_even(prompts, completions, **f):
        return [1.0 if i % 2 == 0 else None for i in range(len(completions))]
    res = evaluate_rewards([only_even], [2.0], PROMPTS, COMPLETIONS, FIELDS)
    assert res.rewards == [2.0, 0.0, 2.0, 0.0] and res.skipped == 0


def crashes_on_bang(prompts, completions, **fields):
    out = []
    for c in completions:
        if "!" in c:
            raise ZeroDivisionError("bad\ncompletion")
        out.append(1.0)
    return out


def nan_on_five(prompts, completions, **fields):
    return [math.nan if c == "5" else 1.0 for c in completions]


def test_evaluate_rewards_fail_names_sample_and_function():
    with pytest.raises(ValueError) as info:
        evaluate_rewards([ExactMatch(), crashes_on_bang], None, PROMPTS, COMPLETIONS, FIELDS)
    msg = str(info.value)
    assert "\n" not in msg
    assert "'crashes_on_bang'" in msg and "sample 3" in msg and "ZeroDivisionError: bad completion" in msg

    with pytest.raises(ValueError, match=r"'nan_on_five' failed on sample 1: returned a non-finite value nan$"):
        evaluate_rewards([nan_on_five], None, PROMPTS, COMPLETIONS, FIELDS)

    def inf_and_text(prompts, completions, **f):
        return [1.0, math.inf, "x", -math.inf]
    with pytest.raises(ValueError, match=r"'inf_and_text' failed on sample 1: .*inf \(and 2 more sample"):
        evaluate_rewards([inf_and_text], None, PROMPTS, COMPLETIONS, FIELDS)


def test_evaluate_rewards_skip_zeroes_and_counts():
    res = evaluate_rewards(
        [ExactMatch(), crashes_on_bang, nan_on_five], [1.0, 10.0, 100.0], PROMPTS, COMPLETIONS, FIELDS,
        on_error="skip",
    )
    # exact: [1,0,1,0]; crashes_on_bang: [1,1,1,skip]; nan_on_five: [1,skip,1,1]
    assert res.rewards == [111.0, 10.0, 111.0, 100.0]
    assert res.skipped == 2
    assert res.skipped_by_function == {"crashes_on_bang": 1, "nan_on_five": 1}
    assert res.per_function["crashes_on_bang"] == [1.0, 1.0, 1.0, 0.0]


def test_evaluate_rewards_structural_errors_always_raise():
    def wrong_length(prompts, completions, **f):
        return [1.0]
    for policy in ("fail", "skip"):
        with pytest.raises(ValueError, match=r"'wrong_length' returned 1 values for 4 samples"):
            evaluate_rewards([wrong_length], None, PROMPTS, COMPLETIONS, FIELDS, on_error=policy)
    with pytest.raises(ValueError, match="2 weights for 1"):
        evaluate_rewards([ExactMatch()], [1.0, 2.0], PROMPTS, COMPLETIONS, FIELDS)
    with pytest.raises(ValueError, match="on_error"):
        evaluate_rewards([ExactMatch()], None, PROMPTS, COMPLETIONS, FIELDS, on_error="ignore")
    with pytest.raises(ValueError, match="field 'answer' has 3 values"):
        evaluate_rewards([ExactMatch()], None, PROMPTS, COMPLETIONS, {"answer": ["1", "2", "3"]})


def test_evaluate_rewards_batch_only_failure():
    def batch_of_one_only(prompts, completions, **f):
        if len(completions) > 1:
            raise RuntimeError("cannot batch")
        return [0.5]
    with pytest.raises(ValueError, match=r"'batch_of_one_only' raised on the batch of 4 samples"):
        evaluate_rewards([batch_of_one_only], None, PROMPTS, COMPLETIONS, FIELDS)
    res = evaluate_rewards([batch_of_one_only], None, PROMPTS, COMPLETIONS, FIELDS, on_error="skip")
    assert res.rewards == [0.5] * 4 and res.skipped == 0


def test_evaluate_rewards_accepts_tensor_and_numpy_scalars():
    import numpy as np
    import torch

    def mixed(prompts, completions, **f):
        return [torch.tensor(1.5), np.float32(0.5), True, 2]
    assert evaluate_rewards([mixed], None, PROMPTS, COMPLETIONS, FIELDS).rewards == [1.5, 0.5, 1.0, 2.0]


# --------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------

def solve_addition(prompt: str) -> str:
    """Independent solver: parse 'a+b+...=' character by character."""
    assert prompt.endswith("=")
    total, current = 0, ""
    for ch in prompt[:-1]:
        if ch == "+":
            total, current = total + int(current), ""
        else:
            assert ch.isdigit()
            current += ch
    return str(total + int(current))


def solve_copy(prompt: str) -> str:
    m = re.fullmatch(r"copy:((?: \S)+) =", prompt)
    assert m, prompt
    return m.group(1)


@pytest.mark.parametrize("make, solve", [
    (lambda seed: AdditionTask(seed=seed), solve_addition),
    (lambda seed: AdditionTask(seed=seed, max_sum=None, n_eval=20), solve_addition),
    (lambda seed: AdditionTask(seed=seed, n_operands=3, max_operand=5, max_sum=None, n_eval=40), solve_addition),
    (lambda seed: CopyTask(seed=seed), solve_copy),
])
def test_task_determinism_disjoint_and_correct(make, solve):
    a, b, c = make(0), make(0), make(1)
    for split in ("train", "eval"):
        assert a.examples(split) == b.examples(split)
    assert a.examples("train") != c.examples("train")
    train, eval_ = a.examples("train"), a.examples("eval")
    assert len(train) == a.n_train and len(eval_) == a.n_eval and train and eval_
    train_prompts = [e["prompt"] for e in train]
    eval_prompts = [e["prompt"] for e in eval_]
    assert len(set(train_prompts)) == len(train_prompts) and len(set(eval_prompts)) == len(eval_prompts)
    assert not set(train_prompts) & set(eval_prompts)
    for e in train + eval_:
        assert set(e) == {"prompt", "answer", "completion"}
        assert e["answer"] == solve(e["prompt"]) == e["completion"]
    # ExactMatch scores the task's own answers 1 and a wrong one 0.
    assert ExactMatch()([e["prompt"] for e in eval_], [e["answer"] for e in eval_],
                        answer=[e["answer"] for e in eval_]) == [1.0] * len(eval_)
    # copies: mutating a returned example does not change the dataset
    train[0]["answer"] = "mutated"
    assert a.examples("train")[0]["answer"] != "mutated"
    assert a.label_words is None


def test_addition_default_size_and_coverage():
    task = AdditionTask()
    all_prompts = {e["prompt"] for s in ("train", "eval") for e in task.examples(s)}
    expected = {f"{x}+{y}=" for x in range(10) for y in range(10) if x + y <= 9}
    assert all_prompts == expected and len(expected) == 55
    assert (task.n_train, task.n_eval) == (44, 11)
    assert len(AdditionTask(n_train=10, n_eval=5).examples("train")) == 10


def test_task_size_errors():
    with pytest.raises(ValueError, match="exceeds the 55 distinct addition problems"):
        AdditionTask(n_train=50, n_eval=10)
    with pytest.raises(ValueError, match="exceeds the 8 distinct sequences"):
        CopyTask(n_train=8, n_eval=1, alphabet="abcdefgh", min_len=1, max_len=1)
    with pytest.raises(ValueError, match="split"):
        AdditionTask().examples("test")
    with pytest.raises(ValueError, match="alphabet"):
        CopyTask(alphabet="aab")


def test_copy_task_large_space_uses_rejection_sampling():
    task = CopyTask(n_train=50, n_eval=10, alphabet=SINGLE_TOKEN_LETTERS, min_len=4, max_len=6)
    for e in task.examples("train") + task.examples("eval"):
        assert 4 <= len(e["answer"].split()) <= 6 and e["answer"] == solve_copy(e["prompt"])
    assert CopyTask(n_train=50, n_eval=10, alphabet=SINGLE_TOKEN_LETTERS, min_len=4, max_len=6).examples(
        "eval") == task.examples("eval")


def test_task_tokenization_lengths():
    tok = load_tokenizer()

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    for letter in SINGLE_TOKEN_LETTERS:
        assert len(ids(" " + letter)) == 1, letter
    for e in AdditionTask(max_sum=None, n_eval=20).examples("train"):
        assert len(ids(e["prompt"])) == 4  # digit + digit =
        assert len(ids(e["answer"])) == len(e["answer"])  # one token per digit
    for e in AdditionTask().examples("eval"):
        assert len(ids(e["answer"])) == 1  # default: single-token answers
    for e in CopyTask().examples("train"):
        n = len(e["answer"].split())
        assert len(ids(e["answer"])) == n
        assert len(ids(e["prompt"])) == 5 + n + 2  # "copy:" is 5 tokens, " =" is 2
    # The completion feeds the basics SFT tokenizer: bos + prompt + answer + eos, loss on the answer.
    e = AdditionTask().examples("train")[0]
    row = tokenize_example(tok, e["prompt"], e["completion"], max_length=32)
    assert row["input_ids"] == [tok.bos_token_id] + ids(e["prompt"]) + ids(e["answer"]) + [tok.eos_token_id]
    assert row["labels"][:5] == [IGNORE_INDEX] * 5 and row["labels"][5:] == ids(e["answer"]) + [tok.eos_token_id]
