"""Bad input across the public surface: a clear error from the project's own code, never a
raw traceback from a dependency and never a silent answer.

A hypothesis fuzz test throws generated malformed calls at `generate`, `forward`,
`select_tokens`, `PruneConfig` and `load` (on the embedded demo model); subprocess tests
cover the CLIs; the rest pins the rules for the image token, `encode` and `stats`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

import zspa_jax
from zspa_jax.demo import scenes
from zspa_jax.demo.run import demo_model_path

REPO = Path(__file__).resolve().parents[1]
PROJECT_DIRS = tuple(str(REPO / d) + os.sep for d in ("zspa_jax", "models", "convert"))
BUG_TYPES = (AttributeError, KeyError, IndexError, AssertionError)


@pytest.fixture(scope="module")
def demo():
    return zspa_jax.load(demo_model_path())


@pytest.fixture(scope="module")
def demo_batch(demo):
    image = scenes.render(scenes.make_scene("test", 0))
    prompts = [
        scenes.chat_prompt("what colour is the cross ?"),
        scenes.chat_prompt("how many shapes are there ?"),
    ]
    return image, zspa_jax.encode(demo, prompts, [image, image])


def assert_clear_error(call) -> BaseException:
    """`call()` must raise ValueError/TypeError/FileNotFoundError from the project's code."""
    try:
        result = call()
        if hasattr(result, "__next__"):  # a stream only runs when iterated
            list(result)
    except BUG_TYPES as e:
        raise AssertionError(f"a bug's exception type: {type(e).__name__}: {e}") from e
    except (ValueError, TypeError, FileNotFoundError) as e:
        frames = traceback.extract_tb(e.__traceback__)
        where = frames[-1].filename if frames else ""
        assert where.startswith(PROJECT_DIRS), (
            f"raised outside the project, at {where}: {type(e).__name__}: {e}"
        )
        assert str(e).strip(), f"{type(e).__name__} without a message"
        return e
    except Exception as e:  # noqa: BLE001 (any other type is a raw error)
        raise AssertionError(f"raw {type(e).__name__} from a dependency: {e}") from e
    raise AssertionError(f"malformed call returned normally: {result!r:.200}")


# --------------------------------------------------------------------------- fuzzing

NOT_BOOL = st.one_of(
    st.integers(), st.text(max_size=3), st.floats(), st.lists(st.booleans(), max_size=2)
)
NOT_NUMBER = st.one_of(
    st.text(max_size=4),
    st.none(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)
NOT_FINITE = st.sampled_from([np.nan, np.inf, -np.inf])


def _with_value(array: np.ndarray, data, value) -> np.ndarray:
    """A copy of `array` with `value` at a drawn position."""
    out = np.array(array)
    index = tuple(data.draw(st.integers(0, d - 1)) for d in out.shape)
    out[index] = value
    return out


def _bad_arrays(data, batch: dict, vocab: int) -> dict:
    """One malformed array argument of the array API, the others valid."""
    ids, pixels, mask = batch["input_ids"], batch["pixel_values"], batch["attention_mask"]
    kind = data.draw(
        st.sampled_from(
            [
                "id_high",
                "id_negative",
                "ids_float",
                "ids_rank",
                "ids_text",
                "pixel_nonfinite",
                "pixel_shape",
                "pixel_int",
                "pixel_complex",
                "mask_value",
                "mask_shape",
                "mask_right_padded",
                "no_image_tokens",
            ]
        )
    )
    out = dict(input_ids=ids, pixel_values=pixels, attention_mask=mask)
    if kind == "id_high":
        out["input_ids"] = _with_value(ids, data, data.draw(st.integers(vocab, 2**31 - 1)))
    elif kind == "id_negative":
        out["input_ids"] = _with_value(ids, data, data.draw(st.integers(-(2**31), -1)))
    elif kind == "ids_float":
        out["input_ids"] = ids.astype(
            data.draw(st.sampled_from([np.float32, np.float64, np.float16]))
        )
    elif kind == "ids_rank":
        out["input_ids"] = ids.reshape((1,) * data.draw(st.integers(1, 2)) + ids.shape)
    elif kind == "ids_text":
        out["input_ids"] = data.draw(st.text(min_size=1, max_size=8))
    elif kind == "pixel_nonfinite":
        out["pixel_values"] = _with_value(pixels, data, data.draw(NOT_FINITE))
    elif kind == "pixel_shape":
        shape = list(pixels.shape)
        axis = data.draw(st.integers(1, 3))
        shape[axis] = data.draw(st.integers(1, 200).filter(lambda d: d != pixels.shape[axis]))
        out["pixel_values"] = np.zeros(shape, np.float32)
    elif kind == "pixel_int":
        out["pixel_values"] = pixels.astype(
            data.draw(st.sampled_from([np.uint8, np.int32, np.int64]))
        )
    elif kind == "pixel_complex":
        out["pixel_values"] = pixels.astype(np.complex64)
    elif kind == "mask_value":
        value = data.draw(
            st.one_of(st.integers(2, 100), st.integers(-100, -1), NOT_FINITE, st.floats(0.01, 0.99))
        )
        out["attention_mask"] = _with_value(mask.astype(np.float64), data, value)
    elif kind == "mask_shape":
        out["attention_mask"] = mask[:, data.draw(st.integers(1, mask.shape[1] - 1)) :]
    elif kind == "mask_right_padded":
        out["attention_mask"] = np.concatenate([mask[:, 1:], np.zeros_like(mask[:, :1])], axis=1)
    elif kind == "no_image_tokens":
        out["input_ids"] = ids[:, -data.draw(st.integers(1, 20)) :]
        out["attention_mask"] = mask[:, -out["input_ids"].shape[1] :]
    return out


def _bad_option(data, vocab: int) -> dict:
    """One malformed keyword option of generate, the others default."""
    name = data.draw(
        st.sampled_from(
            [
                "max_new_tokens",
                "temperature",
                "top_k",
                "top_p",
                "seed",
                "eos_token_id",
                "prune",
                "keep_positions",
                "stream",
            ]
        )
    )
    bad = {
        "max_new_tokens": st.one_of(st.integers(max_value=0), st.floats(), NOT_NUMBER),
        "temperature": st.one_of(st.floats(max_value=-1e-9), NOT_FINITE, NOT_NUMBER),
        "top_k": st.one_of(
            st.integers(max_value=0), st.floats(1, 10), st.text(min_size=1, max_size=3)
        ),
        "top_p": st.one_of(
            st.floats(max_value=0.0),
            st.floats(min_value=1.0 + 1e-6),
            NOT_FINITE,
            st.text(min_size=1, max_size=3),
        ),
        "seed": st.one_of(
            st.integers(max_value=-1),
            st.integers(min_value=2**32),
            st.floats(),
            st.text(max_size=3),
            st.lists(st.integers(), max_size=2),
        ),
        "eos_token_id": st.one_of(
            st.integers(max_value=-1),
            st.integers(min_value=vocab),
            st.text(min_size=1, max_size=3),
            st.lists(st.integers(max_value=-1), min_size=1, max_size=2),
        ),
        "prune": st.one_of(
            st.integers(),
            st.text(max_size=4),
            st.dictionaries(st.just("keep"), st.integers(), min_size=1),
        ),
        "keep_positions": NOT_BOOL,
        "stream": NOT_BOOL,
    }[name]
    value = data.draw(bad)
    options = {name: value}
    if name in ("top_k", "top_p"):
        options["temperature"] = 1.0
    return options


def _bad_prompt_call(data, demo, image):
    kind = data.draw(
        st.sampled_from(["prompt_type", "prompt_entry", "image_type", "image_count", "no_prompts"])
    )
    prompt = scenes.chat_prompt("what colour is the cross ?")
    not_str = st.one_of(st.integers(), st.binary(max_size=3), st.floats())
    if kind == "prompt_type":
        return lambda: zspa_jax.generate(demo, data.draw(not_str), image)
    if kind == "prompt_entry":
        return lambda: zspa_jax.generate(
            demo, [prompt, data.draw(st.one_of(not_str, st.none()))], [image, image]
        )
    if kind == "image_type":
        bad_image = data.draw(
            st.one_of(st.text(max_size=10), st.integers(), st.none(), st.just(np.zeros((4,))))
        )
        return lambda: zspa_jax.generate(demo, [prompt], [bad_image])
    if kind == "image_count":
        count = data.draw(st.integers(0, 4).filter(lambda c: c != 1))
        return lambda: zspa_jax.generate(demo, [prompt], [image] * count)
    return lambda: zspa_jax.generate(demo, [], [])


def _bad_select_call(data):
    b, n, t, d = (
        data.draw(st.integers(1, 3)),
        data.draw(st.integers(2, 12)),
        data.draw(st.integers(1, 5)),
        4,
    )
    rng = np.random.default_rng(data.draw(st.integers(0, 99)))
    visual = rng.standard_normal((b, n, d)).astype(np.float32)
    prompt = rng.standard_normal((b, t, d)).astype(np.float32)
    kwargs = dict(keep=data.draw(st.integers(1, n)))
    kind = data.draw(
        st.sampled_from(
            ["visual_nonfinite", "prompt_nonfinite", "keep", "method", "core_ratio", "shape", "rng"]
        )
    )
    if kind == "visual_nonfinite":
        visual = _with_value(visual, data, data.draw(NOT_FINITE))
    elif kind == "prompt_nonfinite":
        prompt = _with_value(prompt, data, data.draw(NOT_FINITE))
    elif kind == "keep":
        kwargs["keep"] = data.draw(
            st.one_of(
                st.integers(max_value=0),
                st.integers(min_value=n + 1),
                st.floats(),
                st.text(max_size=2),
            )
        )
    elif kind == "method":
        kwargs["method"] = data.draw(
            st.text(max_size=8).filter(lambda m: m not in zspa_jax.PRUNE_METHODS)
        )
    elif kind == "core_ratio":
        kwargs["core_ratio"] = data.draw(
            st.one_of(
                st.floats(max_value=-1e-9),
                st.floats(min_value=1 + 1e-9),
                NOT_FINITE,
                st.text(max_size=2),
            )
        )
    elif kind == "shape":
        prompt = prompt[..., : data.draw(st.integers(1, d - 1))]
    elif kind == "rng":
        kwargs.update(
            method="random", rng=data.draw(st.one_of(st.integers(), st.none(), st.text(max_size=2)))
        )
    return lambda: zspa_jax.select_tokens(jnp.asarray(visual), jnp.asarray(prompt), **kwargs)


def _bad_prune_config(data):
    kind = data.draw(
        st.sampled_from(
            ["keep", "ratio", "both", "neither", "method", "core_ratio", "prompt_scope"]
        )
    )
    if kind == "keep":
        return lambda: zspa_jax.PruneConfig(
            keep=data.draw(
                st.one_of(st.integers(max_value=0), st.floats(), st.text(max_size=3), st.booleans())
            )
        )
    if kind == "ratio":
        bad = st.one_of(
            st.floats(max_value=0.0),
            st.floats(min_value=1.0 + 1e-9),
            NOT_FINITE,
            st.text(max_size=3),
        )
        return lambda: zspa_jax.PruneConfig(ratio=data.draw(bad))
    if kind == "both":
        return lambda: zspa_jax.PruneConfig(
            keep=data.draw(st.integers(1, 9)), ratio=data.draw(st.floats(0.1, 1.0))
        )
    if kind == "neither":
        return lambda: zspa_jax.PruneConfig()
    field = {"method": "method", "core_ratio": "core_ratio", "prompt_scope": "prompt_scope"}[kind]
    valid = {"method": zspa_jax.PRUNE_METHODS, "prompt_scope": ("question", "all_text")}.get(
        field, ()
    )
    if field == "core_ratio":
        bad = st.one_of(
            st.floats(max_value=-1e-9),
            st.floats(min_value=1 + 1e-9),
            NOT_FINITE,
            st.text(max_size=3),
        )
    else:
        bad = st.one_of(st.text(max_size=8), st.integers(), st.none()).filter(
            lambda v: v not in valid
        )
    return lambda: zspa_jax.PruneConfig(keep=4, **{field: data.draw(bad)})


def _bad_load_call(data, tmp_root: Path):
    """A malformed `load`: a wrong path argument, or a copy of the demo checkpoint with one
    drawn file truncated, deleted or overwritten. Returns (call, damaged copy or None)."""
    kind = data.draw(
        st.sampled_from(["path_type", "missing", "processor_flag", "truncate", "delete", "garbage"])
    )
    if kind == "path_type":
        bad = data.draw(
            st.one_of(
                st.integers(), st.none(), st.floats(), st.lists(st.text(max_size=2), max_size=2)
            )
        )
        return (lambda: zspa_jax.load(bad)), None
    if kind == "missing":
        name = data.draw(st.text(st.characters(categories=("L", "N")), min_size=1, max_size=8))
        return (lambda: zspa_jax.load(tmp_root / name / "x")), None
    if kind == "processor_flag":
        flag = data.draw(NOT_BOOL)
        return (lambda: zspa_jax.load(demo_model_path(), processor=flag)), None
    copy = tmp_root / f"damaged{len(list(tmp_root.iterdir()))}"
    shutil.copytree(demo_model_path(), copy)
    target = data.draw(st.sampled_from(sorted(p for p in copy.rglob("*") if p.is_file())))
    if kind == "truncate":
        content = target.read_bytes()
        target.write_bytes(content[: data.draw(st.integers(0, max(len(content) - 1, 0)))])
    elif kind == "delete":
        target.unlink()
    else:
        target.write_bytes(data.draw(st.binary(min_size=1, max_size=64)))
    return (lambda: zspa_jax.load(copy)), copy


@settings(
    max_examples=240, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
)
@given(data=st.data())
@pytest.mark.slow
def test_fuzzed_malformed_calls_fail_clearly(data, demo, demo_batch, tmp_path_factory):
    image, batch = demo_batch
    vocab = demo.config.text.vocab_size
    target = data.draw(
        st.sampled_from(
            [
                "generate",
                "generate_option",
                "generate_prompts",
                "forward",
                "select_tokens",
                "PruneConfig",
                "load",
            ]
        )
    )
    event(target)  # --hypothesis-show-statistics counts the calls per entry point
    if target == "generate":
        call = (lambda a: lambda: zspa_jax.generate(demo, **a, max_new_tokens=2))(
            _bad_arrays(data, batch, vocab)
        )
    elif target == "generate_option":
        call = (lambda o: lambda: zspa_jax.generate(demo, **batch, **o))(_bad_option(data, vocab))
    elif target == "generate_prompts":
        call = _bad_prompt_call(data, demo, image)
    elif target == "forward":
        arrays = _bad_arrays(data, batch, vocab)
        call = lambda: zspa_jax.forward(
            demo, arrays["input_ids"], arrays["pixel_values"], arrays["attention_mask"]
        )  # noqa: E731
    elif target == "select_tokens":
        call = _bad_select_call(data)
    elif target == "PruneConfig":
        call = _bad_prune_config(data)
    else:
        call, damaged = _bad_load_call(data, tmp_path_factory.mktemp("load"))
        if damaged is not None:
            # Some files of a checkpoint are never read (orbax bookkeeping, superseded index
            # nodes): damage there is harmless, so the load must either fail clearly or give
            # exactly the shipped parameters.
            try:
                loaded = zspa_jax.load(damaged)
            except Exception:  # noqa: BLE001 (classified by assert_clear_error below)
                loaded = None
            if loaded is not None:
                for got, want in zip(jax.tree.leaves(loaded.state), jax.tree.leaves(demo.state)):
                    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
                return
    assert_clear_error(call)


def test_bad_vlm_argument_is_named(demo_batch):
    _, batch = demo_batch
    for call in (
        lambda: zspa_jax.generate("path/to/model", "hi"),
        lambda: zspa_jax.forward(None, batch["input_ids"]),
        lambda: zspa_jax.generate_tokens(object(), batch["input_ids"], max_new_tokens=2),
        lambda: zspa_jax.encode(3, "hi"),
    ):
        assert "vlm must be a zspa_jax.VLM" in str(assert_clear_error(call))


def test_non_finite_pixels_and_out_of_range_ids_name_the_row(demo, demo_batch):
    _, batch = demo_batch
    pixels = batch["pixel_values"].copy()
    pixels[1, 2, 3, 4] = np.nan
    error = assert_clear_error(lambda: zspa_jax.generate(demo, **{**batch, "pixel_values": pixels}))
    assert "pixel_values image 1 holds NaN or Inf" in str(error)
    ids = batch["input_ids"].copy()
    ids[1, -1] = demo.config.text.vocab_size + 3
    error = assert_clear_error(
        lambda: zspa_jax.forward(demo, ids, batch["pixel_values"], batch["attention_mask"])
    )
    assert f"input_ids row 1 holds token id {demo.config.text.vocab_size + 3}" in str(error)
    error = assert_clear_error(
        lambda: zspa_jax.generate_tokens(
            demo, jnp.asarray(ids), jnp.asarray(batch["pixel_values"]), max_new_tokens=2
        )
    )
    assert "input_ids row 1" in str(error)


def test_gather_tokens_refuses_out_of_range_indices():
    visual = jnp.ones((2, 4, 3))
    assert "indices row 1 holds 4" in str(
        assert_clear_error(lambda: zspa_jax.gather_tokens(visual, jnp.asarray([[0, 1], [2, 4]])))
    )
    assert "indices row 0 holds -1" in str(
        assert_clear_error(lambda: zspa_jax.gather_tokens(visual, jnp.asarray([[-1, 0], [0, 0]])))
    )
    assert_clear_error(
        lambda: zspa_jax.gather_tokens(visual, jnp.asarray([[0.0, 1.0], [0.0, 1.0]]))
    )
    assert np.isfinite(
        np.asarray(zspa_jax.gather_tokens(visual, jnp.asarray([[0, 3], [1, 2]])))
    ).all()


# --------------------------------------------------------------------------- damaged checkpoints


@pytest.mark.parametrize(
    "damage, file",
    [
        ("garbage", "zspa_config.json"),
        ("no_config_field", "zspa_config.json"),
        ("directory", "zspa_config.json"),
        ("delete", "params/manifest.json"),
        ("garbage", "params/manifest.json"),
        ("delete_group", "params/00000"),
        ("delete", "params/00000/_METADATA"),
        ("truncate_data", "params/00000"),
    ],
)
def test_damaged_checkpoint_names_the_file_and_the_fix(damage, file, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(demo_model_path(), copy)
    target = copy / file
    if damage == "garbage":
        target.write_text("{not json")
    elif damage == "no_config_field":
        target.write_text('{"format": "zspa_jax.checkpoint/1"}')
    elif damage == "directory":
        target.unlink()
        target.mkdir()
    elif damage == "delete":
        target.unlink()
    elif damage == "delete_group":
        shutil.rmtree(target)
    elif damage == "truncate_data":
        for data_file in target.rglob("ocdbt.process_0/d/*"):
            data_file.write_bytes(data_file.read_bytes()[:10])
    error = assert_clear_error(lambda: zspa_jax.load(copy))
    message = str(error)
    assert str(copy / Path(file).parts[0]) in message, message
    assert "re-run the converter" in message


@pytest.mark.slow
def test_damaged_checkpoint_spills_nothing_on_stderr(tmp_path):
    """A failed restore leaves reads in flight; their late callbacks must not print tracebacks."""
    copy = tmp_path / "model"
    shutil.copytree(demo_model_path(), copy)
    for data_file in (copy / "params").rglob("ocdbt.process_0/d/*"):
        data_file.write_bytes(data_file.read_bytes()[:10])
    script = (
        "import sys, time, zspa_jax\n"
        "for _ in range(3):\n"
        "    try:\n"
        f"        zspa_jax.load({str(copy)!r})\n"
        "    except ValueError as e:\n"
        "        print('error:', e)\n"
        "time.sleep(1.0)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=_env()
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("re-run the converter") == 3
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, (
        proc.stderr[-2000:]
    )


# --------------------------------------------------------------------------- command line


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "zspa_jax", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_env(),
    )


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.mark.slow
def test_cli_generate_bad_image_paths(tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    model = str(demo_model_path())
    _assert_one_line_error(
        _cli("generate", "--model", model, "--image", str(tmp_path), "--prompt", "hi"),
        "is a directory",
    )
    _assert_one_line_error(
        _cli("generate", "--model", model, "--image", str(not_an_image), "--prompt", "hi"),
        "not a readable image",
    )
    _assert_one_line_error(
        _cli("generate", "--model", model, "--image", str(tmp_path / "none.png"), "--prompt", "hi"),
        "does not exist",
    )


@pytest.mark.slow
def test_cli_demo_refuses_an_unwritable_out_before_working(tmp_path):
    for out, needle in [
        (tmp_path, "is a directory"),
        (tmp_path / "missing" / "demo.png", "does not exist"),
        (Path("/sys/zspa_demo.png"), "cannot be written"),  # a virtual filesystem
    ]:
        proc = _cli("demo", "--out", str(out))
        _assert_one_line_error(proc, "--out", needle)
        assert "correct:" not in proc.stdout  # refused before the demo ran


# --------------------------------------------------------------------------- rough edges


def test_image_token_is_optional_and_never_counted_twice(demo):
    """Without a chat template the image goes first unless the prompt places it."""
    image = scenes.render(scenes.make_scene("test", 1))
    with_token = zspa_jax.encode(demo, "<image>\nwhat colour is the cross ?", image)
    without = zspa_jax.encode(demo, "what colour is the cross ?", image)
    for name in ("input_ids", "attention_mask", "pixel_values"):
        np.testing.assert_array_equal(with_token[name], without[name])
    assert (
        int((without["input_ids"] == demo.config.image_token_index).sum()) == demo.tokens_per_image
    )
    placed = zspa_jax.encode(demo, scenes.chat_prompt("what colour is the cross ?"), image)[
        "input_ids"
    ][0]
    first_image = int(np.argmax(placed == demo.config.image_token_index))
    assert first_image > 1  # the system text stays before the image, where the prompt put it
    error = assert_clear_error(lambda: zspa_jax.encode(demo, "<image> <image> two?", image))
    assert "2 times" in str(error)
    assert "for 1 image(s)" in str(
        assert_clear_error(lambda: zspa_jax.generate(demo, "<image> <image> x", image))
    )


@pytest.mark.slow
def test_image_token_with_a_chat_template(tiny_hf_llava, converted):
    tiny = tiny_hf_llava("gen")
    vlm = zspa_jax.load(converted(tiny.path))
    image = Image.new("RGB", (28, 28), "red")
    plain = zspa_jax.encode(vlm, "What is shown?", image)
    tagged = zspa_jax.encode(vlm, "<image>\nWhat is shown?", image)
    np.testing.assert_array_equal(plain["input_ids"], tagged["input_ids"])
    assert int((plain["input_ids"] == tiny.image_token_index).sum()) == tiny.tokens_per_image
    inside = zspa_jax.encode(vlm, "Look: <image> What is shown?", image)["input_ids"][0]
    text = tiny.processor.tokenizer.decode(inside[inside != tiny.image_token_index])
    assert text.index("Look:") < text.index("What is shown?")
    assert (inside == tiny.image_token_index).sum() == tiny.tokens_per_image
    assert (
        zspa_jax.generate(vlm, "<image>\nWhat is shown?", image, max_new_tokens=3).sequences.shape[
            0
        ]
        == 1
    )


@pytest.mark.slow
def test_encode_returns_what_the_array_api_takes(demo, demo_batch):
    image, batch = demo_batch
    prompts = [
        scenes.chat_prompt("what colour is the cross ?"),
        scenes.chat_prompt("how many shapes are there ?"),
    ]
    assert sorted(batch) == ["attention_mask", "input_ids", "pixel_values"]
    assert batch["input_ids"].dtype == np.int32 and batch["pixel_values"].dtype == np.float32
    from_strings = zspa_jax.generate(demo, prompts, [image, image], max_new_tokens=3)
    from_arrays = zspa_jax.generate(demo, **batch, max_new_tokens=3)
    np.testing.assert_array_equal(from_strings.sequences, from_arrays.sequences)
    out = zspa_jax.generate_tokens(
        demo, **{k: jnp.asarray(v) for k, v in batch.items()}, max_new_tokens=3
    )
    np.testing.assert_array_equal(
        np.asarray(out.tokens)[:, : from_arrays.sequences.shape[1]], from_arrays.sequences
    )
    logits = zspa_jax.forward(demo, **batch)
    assert logits.shape[:2] == batch["input_ids"].shape


@pytest.mark.slow
def test_stats_name_rows_and_batch_totals(demo):
    image = scenes.render(scenes.make_scene("test", 2))
    prompts = [
        scenes.chat_prompt("what shape is the red object ?"),
        scenes.chat_prompt("is there a green cross ?"),
    ]
    result = zspa_jax.generate(
        demo,
        prompts,
        [image, image],
        prune=zspa_jax.PruneConfig(keep=64),
        max_new_tokens=4,
        keep_positions=True,
    )
    s = result.stats
    mask = zspa_jax.encode(demo, prompts, [image, image])["attention_mask"]
    assert s["batch_size"] == 2
    assert s["prompt_tokens_per_row"] == mask.sum(axis=1).tolist()
    assert s["prompt_tokens_per_row"][0] != s["prompt_tokens_per_row"][1]
    assert s["prompt_tokens_per_row_pruned"] == [n - 576 + 64 for n in s["prompt_tokens_per_row"]]
    assert (s["visual_tokens_per_image"], s["visual_tokens_kept_per_image"]) == (576, 64)
    eos = set(demo.eos_token_ids)
    per_row = [
        next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        for row in result.sequences.tolist()
    ]
    assert s["new_tokens_per_row"] == per_row and s["new_tokens_total"] == sum(per_row)
    assert s["decode_tokens_per_second_total"] == pytest.approx(
        s["new_tokens_total"] / s["decode_seconds"]
    )


@pytest.mark.slow
def test_cli_generate_mesh(tmp_path):
    """--mesh splits the model (here 2 host devices) and answers like one device; a bad
    or too large mesh is one error line."""
    image = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(
        image
    )
    common = [
        "generate",
        "--model",
        str(demo_model_path()),
        "--image",
        str(image),
        "--prompt",
        "what colour is the circle ?",
        "--keep",
        "16",
        "--max-new-tokens",
        "3",
    ]
    plain = _cli(*common)
    assert plain.returncode == 0, plain.stderr[-2000:]
    env = {**_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    split = subprocess.run(
        [sys.executable, "-m", "zspa_jax", *common, "--mesh", "data=1,model=2"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert split.returncode == 0, split.stderr[-2000:]
    assert split.stdout == plain.stdout
    _assert_one_line_error(_cli(*common, "--mesh", "data=0"), "data=D,model=M")
    _assert_one_line_error(_cli(*common, "--mesh", "data=4,model=2"), "needs 8 devices", "sees 1")


@pytest.mark.parametrize(
    "kwargs, error, needle",
    [
        ({"dtype": "int8"}, ValueError, "dtype must be None (as stored) or one of"),
        ({"dtype": 16}, TypeError, "dtype must be None (as stored) or a string"),
        ({"dtype": ["bfloat16"]}, TypeError, "got list"),
        ({"mesh": "data=2,model=4"}, TypeError, "mesh must be a jax.sharding.Mesh"),
        ({"mesh": jax.make_mesh((1,), ("model",))}, ValueError, "missing ['data']"),
    ],
)
def test_load_refuses_bad_mesh_and_dtype(kwargs, error, needle):
    with pytest.raises(error, match=re.escape(needle)):
        zspa_jax.load(demo_model_path(), **kwargs)
