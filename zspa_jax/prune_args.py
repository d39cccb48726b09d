"""Pruning arguments as text: the command lines' flags and lmms-eval's model arguments.

Everything here is generated from the method records (`zspa_jax.methods`): the method
names, and one flag / model argument per method option (`Method.options`), parsed with
the option's type and range. `python -m zspa_jax generate`, `python -m zspa_jax.estimate`
and the lmms-eval model (`zspa_jax.eval.args`) all build their `PruneConfig` here.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from zspa_jax.methods import METHODS, Option
from zspa_jax.pruning import BUDGETS, PROMPT_SCOPES, PruneConfig

__all__ = [
    "OPTION_NAMES",
    "add_prune_arguments",
    "options_table",
    "option_owners",
    "parse_option_pairs",
    "prune_config",
    "prune_from_args",
]


def option_owners() -> dict[str, list[tuple[str, Option]]]:
    """Each option name -> the (method, Option) pairs that have it, in the records' order."""
    owners: dict[str, list[tuple[str, Option]]] = {}
    for method in METHODS.values():
        for option in method.options:
            owners.setdefault(option.name, []).append((method.name, option))
    return owners


OPTION_NAMES: tuple[str, ...] = tuple(option_owners())


def option_help(name: str) -> str:
    """One help line for option `name`, from its records: methods, meaning, range, default."""
    pairs = option_owners()[name]
    methods = ", ".join(m for m, _ in pairs)
    first = pairs[0][1]
    defaults = {f"{o.default:g}" for _, o in pairs}
    default = defaults.pop() if len(defaults) == 1 else "per method"
    return f"({methods}) {first.help}. Values: {first.describe()}; default {default}"


def options_table() -> str:
    """The README's table of every method option (Markdown), from the records."""
    lines = [
        "| method | option | meaning | default | values | official default |",
        "|---|---|---|---|---|---|",
    ]
    for method in METHODS.values():
        for o in method.options:
            lines.append(
                f"| `{method.name}` | `{o.name}` | {o.help} | {o.default:g} | {o.describe()} "
                f"| {o.official} |"
            )
    return "\n".join(lines)


def add_prune_arguments(parser: argparse.ArgumentParser, *, several_keeps: bool = False) -> None:
    """--keep/--ratio, --method, --budget, --prompt-scope, one flag per method option
    (--core-ratio, --layer, ...) and --option NAME=VALUE. `several_keeps`: --keep and
    --ratio take several values (a table of budgets)."""
    group = parser.add_argument_group("pruning (every option is the chosen method's)")
    budget = group.add_mutually_exclusive_group()
    many = {"nargs": "+"} if several_keeps else {}
    budget.add_argument("--keep", type=int, help="visual tokens to keep", **many)
    budget.add_argument("--ratio", type=float, help="fraction of visual tokens to keep", **many)
    group.add_argument(
        "--method",
        default="zspaprune",
        choices=tuple(METHODS),
        metavar="METHOD",
        help=f"pruning method: {', '.join(METHODS)} (default zspaprune)",
    )
    group.add_argument(
        "--budget",
        default="row",
        choices=BUDGETS,
        help="row: keep/ratio over a prompt's visual tokens together; image: over each image",
    )
    group.add_argument(
        "--prompt-scope",
        default="question",
        choices=PROMPT_SCOPES,
        help="the text the prompt-aware methods read: the question after the last image, or all",
    )
    for name in OPTION_NAMES:
        option = option_owners()[name][0][1]
        group.add_argument(
            option.flag, dest=f"option_{name}", metavar="VALUE", help=option_help(name)
        )
    group.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a method option by name (repeat the flag for several)",
    )


def parse_option_pairs(pairs: Sequence[str], flag: str = "--option") -> dict[str, str]:
    """["layer=3", "image_pivots=2"] -> {"layer": "3", "image_pivots": "2"}."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise ValueError(f"{flag} takes NAME=VALUE (e.g. {flag} layer=3), got {pair!r}")
        if name in out:
            raise ValueError(f"{flag}: option {name} given twice")
        out[name] = value
    return out


def prune_config(
    keep: int | None,
    ratio: float | None,
    method: str,
    options: Mapping[str, Any],
    *,
    budget: str = "row",
    prompt_scope: str = "question",
) -> PruneConfig:
    """A PruneConfig whose options may be text: each is parsed with its Option's type and
    range (a ValueError naming the method and its options otherwise)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    values = METHODS[method].resolve_options(options, parse=True)
    return PruneConfig(
        keep, ratio, method, budget=budget, prompt_scope=prompt_scope, options=values
    )


def given_options(args: argparse.Namespace) -> dict[str, str]:
    """The options a command line gave: the per-option flags, then --option pairs."""
    given = {
        name: getattr(args, f"option_{name}")
        for name in OPTION_NAMES
        if getattr(args, f"option_{name}", None) is not None
    }
    for name, value in parse_option_pairs(args.option).items():
        if name in given:
            raise ValueError(f"option {name} given twice: as --option and as its own flag")
        given[name] = value
    return given


def prune_from_args(
    args: argparse.Namespace, keep: int | None = None, ratio: float | None = None
) -> PruneConfig | None:
    """The PruneConfig of a command line made by `add_prune_arguments` (None when neither
    --keep nor --ratio was given; `keep`/`ratio` override them, e.g. one of several keeps).
    Method flags without --keep/--ratio are an error: they would change nothing."""
    if keep is None and ratio is None:
        keep, ratio = args.keep, args.ratio
    given = given_options(args)
    if keep is None and ratio is None:
        if given:
            flags = ", ".join(option_owners()[n][0][1].flag for n in given if n in OPTION_NAMES)
            raise ValueError(
                f"{flags or 'the options given'} configure pruning, which needs --keep or --ratio"
            )
        return None
    return prune_config(
        keep,
        ratio,
        args.method,
        given,
        budget=args.budget,
        prompt_scope=args.prompt_scope,
    )
