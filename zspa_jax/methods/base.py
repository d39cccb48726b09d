"""The method record: what a pruning method needs and does, read by everything above it.

A method is one `Method` value in its own module, listed once in `zspa_jax.methods`.
`PruneConfig` validation, the families' support checks, `select_tokens`, the pipeline,
generation and `zspa_jax.estimate` read its capabilities and call its functions; none of
them compares method names. Three stages, by where the method reads the model:

  "embedding"  a function of the projected visual tokens (and the prompt);
  "tower"      reads the vision tower at the feature layer: `MethodInputs.visual` holds the
               N placeholders' tower features, `cls_attention` their [CLS] attention and
               `tower` the whole layer; merged tokens are in tower space (the pipeline
               projects them);
  both:        `select(inputs: MethodInputs, *, keep, batching, **options) -> Selection`;
  "llm"        runs inside the decoder: layers before its `layer` option see every token,
               the method chooses from what that layer sees, later layers and their KV cache
               hold only the kept tokens: `select(inputs: LayerInputs, *, keep, **options)
               -> int32 [B, K]`.

A method's hyperparameters are its `options` (`Option` records): `PruneConfig`,
`select_tokens`, the lmms-eval model arguments, the command lines and `zspa_jax.estimate`
all read them from here, so a new hyperparameter is one `Option` in its method's module.
`select` and `flops` receive the method's own option values as keyword arguments (except
the ones the pipeline consumes, `Option.select` False: the layer an "llm" method runs at).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from models.protocol import ClsTower

STAGES = ("embedding", "tower", "llm")
OPTION_TYPES = (int, float)


@dataclasses.dataclass(frozen=True)
class Option:
    """One hyperparameter of a method.

    name: a Python identifier (the keyword `select`/`flops` receive, the lmms-eval model
      argument, the command-line flag `--name-with-dashes`).
    type: int or float (a float option takes ints too).
    default: what the method uses when the option is not given.
    help: one line for the command lines' help and the README.
    official: the paper's or official code's default and where it is set.
    minimum / maximum: inclusive bounds (None: unbounded on that side).
    words: strings accepted besides numbers (ZSPAPrune's core_ratio "auto").
    model_bound: a bound only a model knows, in words ("< decoder layers"): checked where
      the model is known (`zspa_jax.batch`), shown in help texts.
    select: passed to the method's `select` (False: the pipeline consumes it, e.g. the layer
      an "llm" method runs at).
    """

    name: str
    type: type
    default: Any
    help: str
    official: str
    minimum: float | None = None
    maximum: float | None = None
    words: tuple[str, ...] = ()
    model_bound: str = ""
    select: bool = True

    def __post_init__(self):
        if not self.name.isidentifier():
            raise ValueError(f"Option.name must be an identifier, got {self.name!r}")
        if self.type not in OPTION_TYPES:
            raise ValueError(f"Option {self.name!r}: type must be int or float, got {self.type!r}")
        self.check(self.default)  # a default outside its own range is a bug in the record

    @property
    def flag(self) -> str:
        """The command-line flag: --core-ratio for core_ratio."""
        return "--" + self.name.replace("_", "-")

    def describe(self) -> str:
        """The accepted values in words: "a number in [0, 1] or 'auto'", "an integer >= 1"."""
        kind = "an integer" if self.type is int else "a number"
        lo, hi = self.minimum, self.maximum
        if lo is not None and hi is not None:
            text = f"{kind} in [{lo:g}, {hi:g}]"
        elif lo is not None:
            text = f"{kind} >= {lo:g}"
        elif hi is not None:
            text = f"{kind} <= {hi:g}"
        else:
            text = kind
        if self.model_bound:
            text += f" and {self.model_bound}"
        return text + "".join(f" or {w!r}" for w in self.words)

    def check(self, value: Any) -> Any:
        """`value` as the method reads it (a float option's int becomes a float); a
        ValueError saying what is accepted otherwise. Strings are refused unless they are
        one of `words` (`parse` reads text)."""
        if isinstance(value, str) and value in self.words:
            return value
        if self.type is int:
            ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        else:
            ok = (
                isinstance(value, (int, float, np.integer, np.floating))
                and not isinstance(value, bool)
                and math.isfinite(float(value))
            )
        if ok:
            value = self.type(value)
            ok = (self.minimum is None or value >= self.minimum) and (
                self.maximum is None or value <= self.maximum
            )
        if not ok:
            raise ValueError(f"option {self.name} must be {self.describe()}, got {value!r}")
        return value

    def parse(self, value: Any) -> Any:
        """`check` of a value that may be text (a command line, lmms-eval's model_args)."""
        if isinstance(value, str) and value not in self.words:
            text = value.strip()
            try:
                value = int(text) if self.type is int else float(text)
            except ValueError:
                raise ValueError(
                    f"option {self.name} must be {self.describe()}, got {value!r}"
                ) from None
        return self.check(value)


class OptionValues(Mapping):
    """A method's option values by name, read-only and hashable (`PruneConfig` is a static
    jit argument); iterates in the record's order."""

    __slots__ = ("_items",)

    def __init__(self, items: tuple[tuple[str, Any], ...] = ()):
        self._items = tuple(items)

    def __getitem__(self, name: str) -> Any:
        for key, value in self._items:
            if key == name:
                return value
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return (key for key, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, OptionValues):
            return self._items == other._items
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __repr__(self) -> str:
        return repr(dict(self._items))


class MethodInputs(NamedTuple):
    """What an embedding-stage method may read (f32; masked entries may hold anything)."""

    visual: jax.Array  # [B, N, D] projected visual tokens
    valid: jax.Array | None  # bool [B, N]: real tokens (None: all real)
    prompt: jax.Array | None  # [B, T, D] raw input-embedding rows of the prompt
    prompt_mask: jax.Array | None  # bool [B, T]: which prompt rows count (None: all)
    rng: jax.Array | None  # PRNG key (methods with needs_rng)
    cls_attention: jax.Array | None  # [B, N] tower [CLS] attention (select_tokens' vispruner)
    grid: jax.Array | None  # int32 [B, 2]: (rows, cols) of each row's token grid (needs_grid)
    tower: ClsTower | None = None  # the tower's feature layer (tower stage, needs_tower)


class LayerInputs(NamedTuple):
    """What an LLM-stage method sees at its layer K (whole left-padded prompt, length L)."""

    hidden: jax.Array  # [B, L, D] hidden states entering layer K (output of layer K-1)
    attention_row: jax.Array  # f32 [B, L]: layer K-1's last-query attention, head mean
    keys: jax.Array  # [B, L, Hkv, Dh]: layer K-1's keys after RoPE
    norm_weight: jax.Array  # [D]: the decoder's final RMSNorm scale
    # int32 [B, N]: each row's placeholder positions, ascending (its images in order)
    visual_index: jax.Array
    visual_valid: jax.Array | None  # bool [B, N]: real placeholders (None: all)
    text_mask: jax.Array  # bool [B, L]: real text tokens after the last image (the question)
    num_visual: int  # N (static)


class Selection(NamedTuple):
    kept: jax.Array  # int32 [B, K]: kept indices into the N tokens, or the slots merged tokens take
    tokens: jax.Array | None = None  # [B, K, D] replacement tokens when the method merges
    # int32 [B, K] (merging methods): 0 for a token that is an input token at its own slot,
    # 1, 2, ... for each class of new token (VisionZip: 1 = [CLS], 2 = contextual); None: all 0
    kind: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Method:
    """One pruning method. `flops(n, d, keep, text_tokens, *, key_dim, auto_zero_share,
    **options) -> int` counts its own selection work (2 per multiply-add), for estimate;
    `options` are its hyperparameters (module docstring)."""

    name: str
    stage: str
    select: Callable[..., Any]
    flops: Callable[..., int]
    summary: str
    citation: str = ""
    needs_prompt: bool = False
    needs_rng: bool = False
    needs_grid: bool = False  # reads the 2-D token grid (families with grid_tokens)
    accepts_mask: bool = True  # rows may carry fewer real tokens than N (a valid mask)
    merges: bool = False  # returns new tokens (plus the slots they take), not a subset
    keeps_positions: bool = False  # kept tokens always keep their original positions
    # Host-side check of the batch's token grids (int [B, 2], rows x cols) for `keep`,
    # before anything compiles (needs_grid methods): check_layout(grid, keep) raises ValueError.
    check_layout: Callable[..., None] | None = None
    options: tuple[Option, ...] = ()

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(
                f"Method {self.name!r}: stage must be one of {STAGES}, got {self.stage!r}"
            )
        names = [o.name for o in self.options]
        if len(set(names)) != len(names):
            raise ValueError(f"Method {self.name!r}: option names repeat: {names}")
        if self.stage == "llm" and self.option("layer") is None:
            raise ValueError(f"Method {self.name!r}: an 'llm' method needs a layer option")

    def option(self, name: str) -> Option | None:
        """The option called `name`, or None."""
        return next((o for o in self.options if o.name == name), None)

    def known_options(self) -> str:
        """The option names in words, for error messages."""
        if not self.options:
            return "it has none"
        return "its options: " + ", ".join(o.name for o in self.options)

    def resolve_options(self, given: Mapping[str, Any] | None = None, *, parse: bool = False):
        """Every option's value, `given` ones checked (`parse`: text accepted, as from a
        command line) and defaults filled in -> `OptionValues` in the record's order.

        An unknown name or a value outside an option's range is a ValueError naming the
        method and its options.
        """
        given = {} if given is None else given
        if not isinstance(given, Mapping):
            raise TypeError(
                f"options must be a mapping of option names to values, got {type(given).__name__}"
            )
        unknown = [name for name in given if self.option(name) is None]
        if unknown:
            raise ValueError(
                f"method {self.name!r} has no option {unknown[0]!r} ({self.known_options()})"
            )
        values = []
        for o in self.options:
            value = o.default
            if o.name in given:
                try:
                    value = (o.parse if parse else o.check)(given[o.name])
                except ValueError as e:
                    raise ValueError(
                        f"method {self.name!r}: {e} ({self.known_options()})"
                    ) from None
            values.append((o.name, value))
        return OptionValues(tuple(values))

    def select_options(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The keyword arguments `select` receives: the options it reads."""
        return {o.name: values[o.name] for o in self.options if o.select}

    @property
    def needs_cls_attention(self) -> bool:
        return self.stage == "tower"

    @property
    def needs_tower(self) -> bool:
        """Reads the whole tower layer (not just [CLS] attention): only through the pipeline."""
        return self.stage == "tower" and self.merges

    @property
    def llm_layer(self) -> bool:
        """Runs inside the decoder at its `layer` option."""
        return self.stage == "llm"


def layer_option(official: str, default: int = 2) -> Option:
    """The decoder layer K an "llm"-stage method prunes at (the pipeline reads it)."""
    return Option(
        name="layer",
        type=int,
        default=default,
        minimum=1,
        model_bound="< decoder layers",
        select=False,
        help="K: the LLM layer whose input loses the dropped tokens (layers before K see every "
        "token and the method reads layer K-1)",
        official=official,
    )


def check_layer(num_layers: int, layer: int, method: str) -> None:
    """The layer option's model bound: an LLM-stage method's K must leave layers before it
    (to choose) and after it (to prune) in a decoder of `num_layers` layers."""
    if not 1 <= layer < num_layers:
        raise ValueError(
            f"method {method!r}: layer K={layer} is outside the decoder: K must be in [1, {num_layers - 1}] for this "
            f"{num_layers}-layer decoder (layers before K choose the tokens, layers K.. run without them)"
        )


def no_flops(*args, **kwargs) -> int:
    """Methods whose selection costs nothing worth counting (a constant or one top-k)."""
    return 0
