"""zspa_jax as an lmms-eval model (`--model zspa_jax`) and the local `zspa_shapes` task.

References: `zspa_jax.generate` / `zspa_jax.forward` for the plugin's answers and scores,
`benchmarks/accuracy.py` (its own loop and scorer) for the task's accuracy. All on the
embedded demo model and the first 14 test questions of the procedural shapes VQA.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import zspa_jax
from zspa_jax.demo import scenes
from zspa_jax.demo.run import demo_model_path
from zspa_jax.eval import make_task
from zspa_jax.eval.args import parse_model_args
from zspa_jax.eval.runner import GenRequest, LoglikelihoodRequest, Runner, cut_at_stops, load_model

N_QUESTIONS = 14
DEMO = demo_model_path()
PRUNED = "keep=64,keep_positions=true"  # the README's headline setting for the demo model


@pytest.fixture(scope="module")
def vlm():
    return zspa_jax.load(DEMO)


@pytest.fixture(scope="module")
def exs():
    return scenes.examples("test", N_QUESTIONS)


@pytest.fixture(scope="module")
def task_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms_tasks")
    make_task.write_task(root, N_QUESTIONS)
    return root


@pytest.fixture(scope="module")
def task_manager(task_root):
    from lmms_eval.tasks import TaskManager

    return TaskManager(include_path=str(task_root))


def runner(vlm, model_args: str = "", **kwargs) -> Runner:
    args = dict(a.split("=", 1) for a in model_args.split(",") if a)
    return Runner(parse_model_args({"pretrained": str(DEMO), **args, **kwargs}), vlm)


def requests(exs, **gen_kwargs) -> list[GenRequest]:
    return [GenRequest(scenes.chat_prompt(e.qa.question), (e.image(),), gen_kwargs) for e in exs]


@pytest.fixture(scope="module")
def benchmark_answers(vlm, exs):
    """benchmarks/accuracy.py's answers on the same questions: unpruned, and ZSPAPrune K=64."""
    from benchmarks import accuracy

    ev = accuracy.Evaluator(vlm, exs, batch=N_QUESTIONS, keep_positions=True)
    full = ev.answers(ev.select("uniform", "question", vlm.tokens_per_image))
    pruned = ev.answers(ev.select("zspaprune r=0.6", "question", 64))
    return {
        "": (full, accuracy.score(exs, full)["overall"]),
        PRUNED: (pruned, accuracy.score(exs, pruned)["overall"]),
    }


# --------------------------------------------------------------------------- the runner


@pytest.mark.parametrize("model_args", ["", PRUNED])
@pytest.mark.slow
def test_answers_equal_generate_and_batch_size_does_not_change_them(vlm, exs, model_args):
    prune_args = parse_model_args(
        {"pretrained": str(DEMO), **dict(a.split("=", 1) for a in model_args.split(",") if a)}
    )
    reference = zspa_jax.generate(
        vlm,
        [scenes.chat_prompt(e.qa.question) for e in exs],
        [e.image() for e in exs],
        prune=prune_args.prune,
        keep_positions=prune_args.keep_positions,
        max_new_tokens=4,
    ).texts
    by8 = runner(vlm, model_args, batch_size=8).generate_until(requests(exs, max_new_tokens=4))
    assert by8 == reference
    if model_args == PRUNED:
        assert (
            runner(vlm, model_args, batch_size=1).generate_until(requests(exs, max_new_tokens=4))
            == reference
        )


@pytest.mark.parametrize("budget", ["row", "image"])
@pytest.mark.slow
def test_documents_with_several_images_equal_generate(vlm, exs, budget):
    """A document with two images goes through `generate` with the image list; prompts of
    different image counts are batched apart (budget="image" needs one count per batch)."""
    two = scenes.chat_prompt(exs[0].qa.question).replace(scenes.IMAGE_TOKEN, scenes.IMAGE_TOKEN * 2)
    reqs = [GenRequest(two, (exs[0].image(), exs[1].image()), {"max_new_tokens": 3})] + requests(
        exs[2:5], max_new_tokens=3
    )
    r = runner(vlm, f"{PRUNED},budget={budget}", batch_size=4)
    got = r.generate_until(reqs)
    prune = r.args.prune
    assert prune.budget == budget
    expect = [
        zspa_jax.generate(
            vlm,
            [req.context],
            [list(req.images)],
            prune=prune,
            keep_positions=True,
            max_new_tokens=3,
        ).texts[0]
        for req in reqs
    ]
    assert got == expect


@pytest.mark.slow
def test_until_stop_strings_cut_the_answer(vlm, exs):
    prompt = scenes.chat_prompt(scenes.CAPTION_QUESTION)  # multi-word answers: a caption
    images = [e.image() for e in exs[:4]]
    reference = zspa_jax.generate(vlm, [prompt] * 4, images, max_new_tokens=24).texts
    assert all("," in t or " at " in t for t in reference)  # the stops below do occur
    reqs = [
        GenRequest(prompt, (im,), {"max_new_tokens": 24, "until": [" at ", ","]}) for im in images
    ]
    assert runner(vlm, batch_size=4).generate_until(reqs) == [
        re.split(" at |,", t)[0] for t in reference
    ]
    reqs = [
        GenRequest(prompt, (im,), {"max_new_tokens": 24, "until": "background"}) for im in images
    ]
    assert runner(vlm, batch_size=4).generate_until(reqs) == [
        t.split("background")[0] for t in reference
    ]
    # max_new_tokens is honoured: 3 tokens of the same caption
    short = runner(vlm, batch_size=4).generate_until(
        [GenRequest(prompt, (im,), {"max_new_tokens": 3}) for im in images]
    )
    assert short == [" ".join(t.split()[:3]) for t in reference]


def test_cut_at_stops_takes_the_earliest_stop():
    assert cut_at_stops("a, b. c", [".", ","]) == "a"
    assert cut_at_stops("abc", ["", "x"]) == "abc"


@pytest.mark.slow
def test_loglikelihood_is_the_sum_of_continuation_log_probs_from_forward(vlm, exs):
    r = runner(vlm, PRUNED, batch_size=4)
    e = exs[0]
    cases = [(e, f" {e.qa.answer}"), (e, " no"), (e, " no ."), (e, " blue star")]
    got = r.loglikelihood(
        [LoglikelihoodRequest(scenes.chat_prompt(e.qa.question), c, (e.image(),)) for e, c in cases]
    )
    for (_, cont), (logp, greedy) in zip(cases, got):
        prompt = scenes.chat_prompt(e.qa.question)
        batch = zspa_jax.encode(vlm, [prompt + cont], [e.image()])
        logits = zspa_jax.forward(
            vlm, **batch, prune=r.args.prune, keep_positions=r.args.keep_positions
        )[0]
        n = len(cont.split())
        target = batch["input_ids"][0, -n:]
        steps = logits[-n - 1 : -1].astype(np.float64)
        log_probs = (
            steps
            - np.log(np.exp(steps - steps.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - steps.max(-1, keepdims=True)
        )
        assert logp == pytest.approx(float(log_probs[np.arange(n), target].sum()), abs=1e-4)
        assert greedy == bool((steps.argmax(-1) == target).all())
    assert got[0][1] == (
        zspa_jax.generate(
            vlm,
            scenes.chat_prompt(exs[0].qa.question),
            exs[0].image(),
            prune=r.args.prune,
            keep_positions=r.args.keep_positions,
            max_new_tokens=1,
        ).texts[0]
        == exs[0].qa.answer
    )


@pytest.mark.slow
def test_mesh_arg_loads_the_model_onto_a_mesh(vlm):
    r = Runner(parse_model_args({"pretrained": str(DEMO), "mesh": "1x1"}))
    assert dict(r.vlm.mesh.shape) == {"data": 1, "model": 1}
    e = scenes.example("test", 0)
    request = GenRequest(scenes.chat_prompt(e.qa.question), (e.image(),), {"max_new_tokens": 2})
    assert r.generate_until([request]) == runner(vlm).generate_until([request])


@pytest.mark.slow
def test_dtype_bfloat16_casts_the_parameters(vlm):
    import jax
    from flax import nnx

    r = Runner(parse_model_args({"pretrained": str(DEMO), "dtype": "bfloat16"}))
    leaves = jax.tree.leaves(nnx.state(r.vlm.model, nnx.Param))
    assert leaves and all(
        x.dtype == jax.numpy.bfloat16
        for x in leaves
        if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)
    )
    e = scenes.example("test", 0)
    assert r.generate_until(
        [GenRequest(scenes.chat_prompt(e.qa.question), (e.image(),), {"max_new_tokens": 1})]
    )[0] in (scenes.vocabulary())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "nonsense", "keep": 64}, "method must be one of"),
        ({"keep": 577}, "keep=577 exceeds the 576 visual tokens"),
        ({"keep": 64, "ratio": 0.5}, "keep or ratio, not both"),
        (
            {"pretrained": "/nonexistent/model"},
            "pretrained='/nonexistent/model' is not a directory",
        ),
        ({"pretrained": str(DEMO.parent)}, "not a converted zspa_jax checkpoint"),
        ({"pretrained": None}, "pretrained is required"),
        ({"dtype": "float8"}, "dtype must be one of float32, bfloat16, float16"),
        ({"ratio": 1.5}, "ratio must be a number in (0, 1]"),
        ({"keep": 64, "prompt_scope": "everything"}, "prompt_scope"),
        ({"keep": 64, "budget": "images"}, "budget must be one of ('row', 'image'), got 'images'"),
        ({"method": "divprune"}, "method configure pruning, which needs keep or ratio"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"kep": 64}, "unknown argument(s) kep"),
        ({"mesh": "0x2"}, "mesh must be DxM (data x model devices"),
        ({"mesh": "data=2"}, "mesh must be DxM"),
        ({"mesh": "4x4"}, "mesh=4x4 needs 16 devices, this process sees 1"),
    ],
)
def test_bad_model_args_are_clear_errors(kwargs, message):
    args = {"pretrained": str(DEMO), **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        load_model(parse_model_args({k: v for k, v in args.items() if v is not None}))


# --------------------------------------------------------------------------- lmms-eval


def test_registered_through_the_lmms_eval_models_entry_point():
    from lmms_eval import models

    from zspa_jax.eval.lmms_model import ZSPAJax

    assert "zspa_jax" in models.list_available_models()
    assert models.get_model("zspa_jax") is ZSPAJax


@pytest.mark.slow
def test_bad_model_args_fail_before_any_task_is_loaded(task_root, tmp_path):
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    broken = tmp_path / "tasks"
    shutil.copytree(task_root, broken)
    shutil.rmtree(broken / "zspa_shapes" / "data")  # loading the task would fail on its data
    yaml = broken / "zspa_shapes" / "zspa_shapes.yaml"
    yaml.write_text(yaml.read_text().replace(str(task_root), str(broken)))
    manager = TaskManager(include_path=str(broken))
    for model_args, message in [
        (f"pretrained={DEMO},keep=64,method=magic", "method must be one of"),
        (f"pretrained={DEMO},keep=1000", "keep=1000 exceeds the 576 visual tokens"),
        (f"pretrained={tmp_path / 'missing'}", "is not a directory"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            evaluator.simple_evaluate(
                model="zspa_jax", model_args=model_args, tasks=["zspa_shapes"], task_manager=manager
            )


def test_multi_round_generation_feeds_each_round_back(vlm, exs):
    from lmms_eval.api.instance import Instance

    from zspa_jax.eval.lmms_model import ZSPAJax

    model = ZSPAJax.__new__(ZSPAJax)
    model.runner = runner(vlm)
    model.task_dict = {"t": {"test": [{"i": 0}]}}
    questions = [exs[0].qa.question, exs[1].qa.question]

    def doc_to_text(doc, previous_output, round_idx, previous_round_info):
        done = round_idx >= len(questions)
        return (
            None,
            None if done else scenes.chat_prompt(questions[round_idx]),
            done,
            previous_output,
            None,
        )

    inst = Instance(
        "generate_until_multi_round",
        (
            scenes.chat_prompt(questions[0]),
            {"max_new_tokens": 2},
            lambda doc: [exs[0].image()],
            doc_to_text,
            0,
            "t",
            "test",
        ),
        0,
        {"task": "t", "doc_id": 0, "repeats": 1},
    )
    expected = zspa_jax.generate(
        vlm, [scenes.chat_prompt(q) for q in questions], [exs[0].image()] * 2, max_new_tokens=2
    ).texts
    assert model.generate_until_multi_round([inst]) == [expected]


@pytest.mark.parametrize("model_args", ["", PRUNED])
@pytest.mark.slow
def test_task_accuracy_equals_the_benchmark(task_manager, benchmark_answers, exs, model_args):
    from lmms_eval import evaluator

    out = evaluator.simple_evaluate(
        model="zspa_jax",
        model_args=f"pretrained={DEMO},{model_args}".rstrip(","),
        tasks=["zspa_shapes"],
        batch_size=8,
        task_manager=task_manager,
        log_samples=True,
    )
    samples = sorted(out["samples"]["zspa_shapes"], key=lambda s: s["doc_id"])
    assert [s["doc"]["question"] for s in samples] == [e.qa.question for e in exs]
    answers, accuracy = benchmark_answers[model_args]
    assert [s["filtered_resps"][0] for s in samples] == answers
    assert out["results"]["zspa_shapes"]["exact_match,none"] == pytest.approx(accuracy, abs=1e-12)


@pytest.mark.slow
def test_lmms_eval_cli_runs_the_local_task_offline(task_root, benchmark_answers, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cli = Path(sys.executable).with_name("lmms-eval")
    cmd = [
        str(cli),
        "--model",
        "zspa_jax",
        "--model_args",
        f"pretrained={DEMO},{PRUNED}",
        "--tasks",
        "zspa_shapes",
        "--include_path",
        str(task_root),
        "--limit",
        "7",
        "--batch_size",
        "8",
        "--output_path",
        str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result_files = list((tmp_path / "out").rglob("*results*.json"))
    assert len(result_files) == 1, result_files
    value = json.loads(result_files[0].read_text())["results"]["zspa_shapes"]["exact_match,none"]
    answers, _ = benchmark_answers[PRUNED]
    truths = [e.qa.answer for e in scenes.examples("test", 7)]
    assert value == pytest.approx(np.mean([a == t for a, t in zip(answers[:7], truths)]), abs=1e-12)
    assert re.search(r"\|zspa_shapes\|.*\|exact_match\|", proc.stdout), proc.stdout[-2000:]
