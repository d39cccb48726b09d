"""The plugin's model arguments: parsed from lmms-eval's `--model_args`, checked up front.

Every check here runs in the model's constructor, before lmms-eval loads any task, and a
bad value is a `ValueError` that names the argument:

    pretrained=DIR        a converted checkpoint directory (python -m convert.<family> SRC DIR)
    keep=K | ratio=R      visual tokens kept (a count, or a fraction in (0, 1]); neither: no pruning
    method=M              one of zspa_jax.PRUNE_METHODS (default zspaprune)
    <option>=V            each option of the chosen method (its record's `options`: core_ratio,
                          layer, image_pivots, contextual_share, ...), parsed with its type
                          and range (zspa_jax.prune_args)
    prompt_scope=S        question | all_text (default question)
    budget=G              row | image: keep/ratio over a prompt's visual tokens together, or per image (default row)
    keep_positions=B      kept tokens keep their original RoPE positions (default false)
    batch_size=B          requests per zspa_jax.generate / forward call (default 1)
    dtype=D               bfloat16 | float16 | float32: the parameters' and compute dtype (default: as stored)
    mesh=DxM              split the model over D ("data") x M ("model") devices (zspa_jax.load(mesh=);
                          default one device)
    max_new_tokens=T      when a task does not set it (default 32)
    seed=S                sampling seed (and the `random` method's) (default 0)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import zspa_jax
from models.layers import DTYPES as LIBRARY_DTYPES
from zspa_jax.prune_args import OPTION_NAMES, prune_config

DTYPES = tuple(LIBRARY_DTYPES)  # what zspa_jax.load(dtype=) takes
# Passed by lmms-eval's evaluator to every model; accepted and not used (JAX picks the device).
IGNORED = ("device", "max_batch_size")


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    """Checked model arguments (see the module docstring)."""

    pretrained: Path
    prune: zspa_jax.PruneConfig | None = None
    keep_positions: bool = False
    batch_size: int = 1
    dtype: str | None = None
    mesh: tuple[int, int] | None = None  # (data, model) axis sizes
    max_new_tokens: int = 32
    seed: int = 0


def _mesh(value: Any) -> tuple[int, int] | None:
    """ "2x4" -> (2, 4): data x model (lmms-eval splits model_args on "," and "=")."""
    if value in (None, ""):
        return None
    data, sep, model = str(value).strip().partition("x")
    if not sep or not data.isdigit() or not model.isdigit() or int(data) < 1 or int(model) < 1:
        raise _fail("mesh", "DxM (data x model devices, e.g. 2x4)", value)
    return int(data), int(model)


def _fail(name: str, what: str, value: Any) -> ValueError:
    return ValueError(f"zspa_jax model_args: {name} must be {what}, got {value!r}")


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(name, f"an integer >= {minimum}", value)
    return value


def _float(name: str, value: Any, lo: float, hi: float, lo_open: bool = False) -> float:
    try:
        x = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        x = math.nan
    ok = (lo < x if lo_open else lo <= x) and x <= hi
    if not ok:
        raise _fail(name, f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]", value)
    return x


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise _fail(name, "true or false", value)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise _fail(name, f"one of {', '.join(choices)}", value)
    return value


def _pretrained(value: Any) -> Path:
    if value is None or value == "":
        raise ValueError(
            "zspa_jax model_args: pretrained is required: the directory of a converted checkpoint "
            "(python -m convert.<family> SRC DIR), e.g. --model_args pretrained=./llava-1.5-7b"
        )
    path = Path(str(value)).expanduser()
    if not path.is_dir():
        raise ValueError(f"zspa_jax model_args: pretrained={str(value)!r} is not a directory")
    if not (path / "zspa_config.json").is_file():
        raise ValueError(
            f"zspa_jax model_args: pretrained={str(value)!r} is not a converted zspa_jax checkpoint "
            "(no zspa_config.json); convert it first: python -m convert.<family> SRC DIR"
        )
    return path


def parse_model_args(kwargs: Mapping[str, Any]) -> ModelArgs:
    """Check `kwargs` (lmms-eval's parsed `--model_args` plus its `batch_size`/`device`).

    Unknown names are an error (a typo would otherwise silently evaluate something else).
    """
    known = {f.name for f in dataclasses.fields(ModelArgs)} - {"prune"}
    pruning = ("method", *OPTION_NAMES, "prompt_scope", "budget")
    known |= {"keep", "ratio", *pruning, *IGNORED}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(
            f"zspa_jax model_args: unknown argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    keep, ratio = kwargs.get("keep"), kwargs.get("ratio")
    if keep is not None and ratio is not None:
        raise ValueError(
            f"zspa_jax model_args: give keep or ratio, not both (got keep={keep!r}, ratio={ratio!r})"
        )
    method = _choice("method", kwargs.get("method", "zspaprune"), tuple(zspa_jax.PRUNE_METHODS))
    scope = kwargs.get("prompt_scope", "question")
    if not isinstance(scope, str):
        raise _fail("prompt_scope", "a string such as question or all_text", scope)
    budget = kwargs.get("budget", "row")
    if not isinstance(budget, str):
        raise _fail("budget", "row or image", budget)
    prune = None
    if keep is None and ratio is None:
        given = [n for n in pruning if n in kwargs]
        if given:
            raise ValueError(
                f"zspa_jax model_args: {', '.join(given)} configure pruning, which needs keep or ratio "
                "(e.g. keep=64); without either every visual token is kept"
            )
    else:
        keep = None if keep is None else _int("keep", keep, 1)
        ratio = None if ratio is None else _float("ratio", ratio, 0.0, 1.0, lo_open=True)
        options = {name: kwargs[name] for name in OPTION_NAMES if name in kwargs}
        try:  # the chosen method's options, parsed with each Option's type and range
            prune = prune_config(keep, ratio, method, options, budget=budget, prompt_scope=scope)
        except ValueError as e:  # the library's message names the field or option
            raise ValueError(f"zspa_jax model_args: {e}") from None
    dtype = kwargs.get("dtype")
    return ModelArgs(
        pretrained=_pretrained(kwargs.get("pretrained")),
        prune=prune,
        keep_positions=_bool("keep_positions", kwargs.get("keep_positions", False)),
        batch_size=_int(
            "batch_size", 1 if kwargs.get("batch_size") is None else kwargs["batch_size"], 1
        ),
        dtype=None if dtype in (None, "", "auto") else _choice("dtype", dtype, DTYPES),
        mesh=_mesh(kwargs.get("mesh")),
        max_new_tokens=_int("max_new_tokens", kwargs.get("max_new_tokens", 32), 1),
        seed=_int("seed", kwargs.get("seed", 0), 0),
    )
