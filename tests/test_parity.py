"""PyTorch parity: every component and the full LLaVA forward of zspa_jax against
transformers, on tiny random models converted by the converter and on real SmolLM2 weights.

All comparisons are f32 (matmul precision "highest", set in conftest) with
max |diff| <= 1e-4 (aim 1e-5), except the bf16 conversion (KL bound, see below) and the
real-weights tests (relative to the logit scale). Run `pytest -s tests/test_parity.py` to
see every number; the session summary prints them as one table.

Three tiny configs cover the options with few JAX compiles (one sequence length each):
  A: GQA (4 q / 2 kv heads), vision_feature_layer -2, "default" (drop CLS), quick_gelu
  B: MHA (4 / 4), vision_feature_layer [-3, -1] (concatenated), "full" (keep CLS), gelu
  C: MQA (4 / 1), vision_feature_layer -1 (the last layer), "default", tied lm_head
Each config is also saved in a different one of the three LLaVA key layouts before the
CLI converts it (A: v5 save_pretrained, B: in-memory `model.*`, C: hub legacy
`vision_tower.vision_model.*`), so every layout goes through the real converter without
extra conversions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tests.support.key_layouts import LAYOUTS, detect_layout, safetensors_keys
from tests.support.smollm2 import REAL_TEXT

pytestmark = (
    pytest.mark.slow
)  # 3 tiny configs, bf16, and the SmolLM2 build with its converter CLI subprocess

TOL = 1e-4
SEQ_LEN = 40  # one length for every tiny-config batch
LONG_LEN = 600  # > 512: RoPE bugs hide near position 0
PAD = 9  # left padding of row 1 in the padded batch

CONFIGS = {
    "A": dict(
        label="A:GQA,L-2,default,qgelu",
        layout="v5_saved",
        opts=dict(
            num_key_value_heads=2,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            vision_hidden_act="quick_gelu",
            seed=0,
        ),
    ),
    "B": dict(
        label="B:MHA,L[-3,-1],full,gelu",
        layout="in_memory",
        opts=dict(
            num_key_value_heads=4,
            vision_feature_layer=(-3, -1),
            vision_feature_select_strategy="full",
            vision_hidden_act="gelu",
            seed=1,
        ),
    ),
    "C": dict(
        label="C:MQA,L-1,default,tied",
        layout="hub_legacy",
        opts=dict(
            num_key_value_heads=1,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            vision_hidden_act="quick_gelu",
            tie_word_embeddings=True,
            vision_layers=2,
            seed=2,
        ),
    ),
}


LAYOUT_CONFIG = {CONFIGS[k]["layout"]: k for k in CONFIGS}
assert sorted(LAYOUT_CONFIG) == sorted(LAYOUTS)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def jit_call(module: nnx.Module, method: str, *args):
    """Call `module.method(*args)` under plain jax.jit over the split state."""
    graphdef, state = nnx.split(module)

    def fn(state, *a):
        return getattr(nnx.merge(graphdef, state), method)(*a)

    return jax.jit(fn)(state, *args)


def max_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


def compare(record, component: str, config: str, ours, ref, tol: float = TOL) -> float:
    """max |ours - ref|, recorded in the session table with max |ref| for scale."""
    ref = np.asarray(ref)
    return record(component, config, max_diff(ours, ref), tol, scale=float(np.max(np.abs(ref))))


def t2n(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().numpy()


def hf_logits(hf, input_ids, pixel_values=None, attention_mask=None) -> np.ndarray:
    kwargs = dict(input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long))
    if pixel_values is not None:
        kwargs["pixel_values"] = torch.as_tensor(np.asarray(pixel_values), dtype=torch.float32)
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    with torch.no_grad():
        return t2n(hf(**kwargs).logits)


def image_row(rng, length: int, before: int, tiny, image_token: int | None = None) -> np.ndarray:
    """[bos] + `before` text ids + one image's placeholders + text up to `length`."""
    image_token = tiny.image_token_index if image_token is None else image_token
    after = length - 1 - before - tiny.tokens_per_image
    assert after >= 0
    text = lambda n: rng.integers(4, tiny.image_token_index, n)  # noqa: E731  (ordinary BPE ids)
    return np.concatenate(
        [
            [tiny.bos_token_id],
            text(before),
            np.full(tiny.tokens_per_image, image_token),
            text(after),
        ]
    )


def kl_per_token(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(logits)) per position, in f64."""
    p = np.asarray(ref_logits, np.float64)
    q = np.asarray(logits, np.float64)
    logp = p - np.logaddexp.reduce(p, axis=-1, keepdims=True)
    logq = q - np.logaddexp.reduce(q, axis=-1, keepdims=True)
    return np.sum(np.exp(logp) * (logp - logq), axis=-1)


class Case:
    """One tiny config: the HF reference, its CLI conversion loaded by zspa_jax, and inputs."""

    def __init__(self, key, tiny, src, vlm):
        self.key = key
        self.label = CONFIGS[key]["label"]
        self.layout = CONFIGS[key]["layout"]
        self.tiny = tiny
        self.hf = tiny.hf
        self.src = src  # the HF dir (in this config's key layout) that the CLI converted
        self.vlm = vlm
        rng = np.random.default_rng(100 + ord(key))
        size = tiny.image_size
        self.pixel_values = rng.standard_normal((2, 3, size, size)).astype(np.float32)
        self.input_ids = np.stack(
            [image_row(rng, SEQ_LEN, 5, tiny), image_row(rng, SEQ_LEN, 10, tiny)]
        )
        text = rng.integers(4, tiny.image_token_index, (2, SEQ_LEN))
        text[:, 0] = tiny.bos_token_id
        self.text_ids = text
        # Left-padded batch: row 0 fills the length, row 1 is PAD tokens shorter.
        row1 = image_row(rng, SEQ_LEN - PAD, 4, tiny)
        self.padded_ids = np.stack(
            [
                image_row(rng, SEQ_LEN, 3, tiny),
                np.concatenate([np.full(PAD, tiny.pad_token_id), row1]),
            ]
        )
        self.padded_mask = np.ones_like(self.padded_ids)
        self.padded_mask[1, :PAD] = 0
        self._hf_full = None

    @property
    def hf_full_logits(self) -> np.ndarray:
        if self._hf_full is None:
            self._hf_full = hf_logits(self.hf, self.input_ids, self.pixel_values)
        return self._hf_full


@pytest.fixture(scope="module")
def get_case(request, tiny_hf_llava, layout_dir, converted):
    """`get_case(key) -> Case`, built once per module: the config's HF model is rewritten
    into its key layout (CONFIGS[key]["layout"]), converted by the CLI's `main` and loaded."""
    import zspa_jax

    cases: dict[str, Case] = {}
    source = lambda k: layout_dir(
        tiny_hf_llava(f"cfg{k}", **CONFIGS[k]["opts"]), CONFIGS[k]["layout"]
    )  # noqa: E731

    def get(key: str) -> Case:
        if key not in cases:
            src = source(key)
            out = converted(src)
            cases[key] = Case(
                key, tiny_hf_llava(f"cfg{key}", **CONFIGS[key]["opts"]), src, zspa_jax.load(out)
            )
        return cases[key]

    return get


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, get_case) -> Case:
    # Module scope makes pytest run every config-A test, then B, then C, so B and C keep
    # converting in the background while A's tests run.
    return get_case(request.param)


@pytest.fixture
def case_a(get_case) -> Case:
    return get_case("A")


# --------------------------------------------------------------------------------------
# tiny configs: every component, full logits, padded batches
# --------------------------------------------------------------------------------------


def test_loaded_config_matches_hf(case):
    cfg, hfc = case.vlm.config, case.hf.config
    assert cfg.image_token_index == hfc.image_token_index
    layer = hfc.vision_feature_layer
    assert cfg.feature_layers == (tuple(layer) if isinstance(layer, list) else (layer,))
    assert cfg.vision_feature_select_strategy == hfc.vision_feature_select_strategy
    assert cfg.image_seq_length == case.tiny.tokens_per_image
    assert cfg.vision.hidden_act == hfc.vision_config.hidden_act
    assert cfg.text.num_key_value_heads == hfc.text_config.num_key_value_heads
    assert cfg.text.tie_word_embeddings == hfc.text_config.tie_word_embeddings


def test_vision_hidden_states(case, parity_record):
    ours = jit_call(case.vlm.model.vision_tower, "hidden_states", jnp.asarray(case.pixel_values))
    with torch.no_grad():
        ref = case.hf.model.vision_tower(
            torch.from_numpy(case.pixel_values), output_hidden_states=True
        ).hidden_states
    assert len(ours) == len(ref) == case.tiny.options["vision_layers"] + 1
    worst = 0.0
    for i, (a, b) in enumerate(zip(ours, ref)):
        d = compare(parity_record, f"clip hidden_states[{i}]", case.label, a, t2n(b))
        worst = max(worst, d)
    assert worst <= TOL


def test_selected_vision_features(case, parity_record):
    ours = jit_call(case.vlm.model, "selected_vision_features", jnp.asarray(case.pixel_values))
    with torch.no_grad():
        hs = case.hf.model.vision_tower(
            torch.from_numpy(case.pixel_values), output_hidden_states=True
        ).hidden_states
    layers = case.hf.config.vision_feature_layer
    layers = layers if isinstance(layers, list) else [layers]
    start = 1 if case.hf.config.vision_feature_select_strategy == "default" else 0
    ref = torch.cat([hs[i][:, start:] for i in layers], dim=-1)
    assert ours.shape == tuple(ref.shape)
    assert compare(parity_record, "selected_vision_features", case.label, ours, t2n(ref)) <= TOL


def test_projector(case, parity_record):
    din = case.hf.model.multi_modal_projector.linear_1.in_features
    x = (
        np.random.default_rng(7)
        .standard_normal((2, case.tiny.tokens_per_image, din))
        .astype(np.float32)
    )
    ours = jit_call(case.vlm.model.multi_modal_projector, "__call__", jnp.asarray(x))
    with torch.no_grad():
        ref = case.hf.model.multi_modal_projector(torch.from_numpy(x))
    assert compare(parity_record, "projector", case.label, ours, t2n(ref)) <= TOL


def test_image_features(case, parity_record):
    ours = jit_call(case.vlm.model, "image_features", jnp.asarray(case.pixel_values))
    with torch.no_grad():
        ref = torch.stack(
            list(
                case.hf.get_image_features(
                    pixel_values=torch.from_numpy(case.pixel_values)
                ).pooler_output
            )
        )
    assert ours.shape == (2, case.tiny.tokens_per_image, case.tiny.options["hidden_size"])
    assert compare(parity_record, "image_features", case.label, ours, t2n(ref)) <= TOL


def test_decoder_logits_text_only(case, parity_record):
    ours = jit_call(
        case.vlm.model.language_model, "__call__", jnp.asarray(case.text_ids, jnp.int32)
    )
    ref = hf_logits(case.hf, case.text_ids)
    assert ours.dtype == jnp.float32
    assert compare(parity_record, "decoder logits (text only)", case.label, ours, ref) <= TOL


def test_full_logits(case, parity_record):
    import zspa_jax

    ours = zspa_jax.forward(case.vlm, case.input_ids, case.pixel_values)
    assert isinstance(ours, np.ndarray) and ours.dtype == np.float32
    assert ours.shape == (2, SEQ_LEN, case.tiny.vocab_size)
    assert compare(parity_record, "llava logits", case.label, ours, case.hf_full_logits) <= TOL


# MHA; a GQA left-padded batch (config A's heads) is tests/test_families.py's llava case.
@pytest.mark.parametrize("key", ["B"])
def test_left_padded_batch(key, get_case, parity_record):
    """Row 1 is left-padded by PAD tokens. Each row of the batch equals HF run on that row
    alone (unpadded), and row 1 also equals ours run alone. (Row 0 has no padding, so its
    "alone" run would only cost a compile; the HF comparison covers it.)"""
    import zspa_jax

    case = get_case(key)
    batch = zspa_jax.forward(
        case.vlm, case.padded_ids, case.pixel_values, attention_mask=case.padded_mask
    )
    assert np.all(np.isfinite(batch))
    worst_hf = 0.0
    for row in range(2):
        valid = case.padded_mask[row].astype(bool)
        ref = hf_logits(
            case.hf, case.padded_ids[row : row + 1, valid], case.pixel_values[row : row + 1]
        )
        worst_hf = max(worst_hf, max_diff(batch[row, valid], ref[0]))
    valid = case.padded_mask[1].astype(bool)
    alone = zspa_jax.forward(case.vlm, case.padded_ids[1:, valid], case.pixel_values[1:])
    worst_self = max_diff(batch[1, valid], alone[0])
    worst_hf = max(worst_hf, max_diff(alone[0], ref[0]))
    scale = float(np.max(np.abs(batch[case.padded_mask.astype(bool)])))
    parity_record("padded batch vs ours row alone", case.label, worst_self, TOL, scale=scale)
    parity_record("padded batch vs HF row alone", case.label, worst_hf, TOL, scale=scale)
    assert worst_self <= TOL and worst_hf <= TOL


# --------------------------------------------------------------------------------------
# config A only: long prompt, key layouts, bf16
# --------------------------------------------------------------------------------------


def test_long_prompt_rope(case_a, parity_record):
    """A 600-token prompt with the image at positions 521..536: RoPE at large positions."""
    rng = np.random.default_rng(5)
    ids = image_row(rng, LONG_LEN, 520, case_a.tiny)[None]
    pv = case_a.pixel_values[:1]
    import zspa_jax

    ours = zspa_jax.forward(case_a.vlm, ids, pv)
    ref = hf_logits(case_a.hf, ids, pv)
    assert (
        compare(parity_record, f"llava logits, {LONG_LEN} tokens", case_a.label, ours, ref) <= TOL
    )
    # The second half alone carries the signal a RoPE bug would corrupt.
    assert max_diff(ours[:, 512:], ref[:, 512:]) <= TOL


@pytest.mark.parametrize("layout", LAYOUTS)
def test_key_layouts(layout, get_case, parity_record):
    """The three LLaVA key layouts: transformers loads each to identical logits (so the
    fixtures are real layouts, with no key missing or ignored), and the checkpoint the CLI
    made from that layout matches."""
    from transformers import LlavaForConditionalGeneration

    import zspa_jax

    case = get_case(LAYOUT_CONFIG[layout])
    assert detect_layout(safetensors_keys(case.src)) == layout
    hf, info = LlavaForConditionalGeneration.from_pretrained(
        case.src, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert (
        not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ), info
    hf_layout = hf_logits(hf.eval(), case.input_ids, case.pixel_values)
    assert np.array_equal(hf_layout, case.hf_full_logits), (
        "transformers reads this layout differently"
    )

    ours = zspa_jax.forward(case.vlm, case.input_ids, case.pixel_values)
    assert (
        compare(parity_record, f"llava logits, layout {layout}", case.label, ours, hf_layout) <= TOL
    )


# bf16 acceptance, measured first (config A, the 80 positions of the main batch, HF f32
# logits std ~1.2, |logit| <= ~5.4): mean KL 1.85e-4, max KL 8.3e-4, max |logit diff| 0.14,
# top-1 agreement 78/80 (the two flips are near-ties of a random model's flat logits).
# That is the size bf16 rounding predicts: 8 mantissa bits give ~2^-9 = 2e-3 relative error
# per weight and activation, i.e. logit errors of O(1e-2..1e-1) and KL ~ var(error)/2 of
# O(1e-4). The bounds leave 5x (mean) and 12x (max) margin for other XLA versions or
# backends that accumulate bf16 differently, and stay well below gross errors measured on
# this model in f32: RoPE disabled mean KL 0.30, final-norm scale dropped 0.052, one
# q_proj kernel transposed 0.67. (Subtle bugs, e.g. tanh instead of erf GELU in the
# projector, KL 6e-8, are invisible to any KL bound; the f32 1e-4 tests above catch them.)
BF16_MEAN_KL = 1e-3
BF16_MAX_KL = 1e-2


def test_bf16_conversion_kl(case_a, converted, parity_record, parity_note):
    import zspa_jax

    out = converted(case_a.src, "--dtype", "bfloat16")
    vlm = zspa_jax.load(out)
    kernel = vlm.model.language_model.model.layers[0].self_attn.q_proj.kernel.value
    assert kernel.dtype == jnp.bfloat16
    ours = zspa_jax.forward(vlm, case_a.input_ids, case_a.pixel_values)
    assert ours.dtype == np.float32
    kl = kl_per_token(case_a.hf_full_logits, ours)
    top1 = float(np.mean(ours.argmax(-1) == case_a.hf_full_logits.argmax(-1)))
    parity_record(
        "bf16 llava: mean KL",
        case_a.label,
        float(kl.mean()),
        BF16_MEAN_KL,
        metric="KL(hf f32 || ours)",
    )
    parity_record(
        "bf16 llava: max KL",
        case_a.label,
        float(kl.max()),
        BF16_MAX_KL,
        metric="KL(hf f32 || ours)",
    )
    compare(
        parity_record,
        "bf16 llava: max|diff| logits",
        case_a.label,
        ours,
        case_a.hf_full_logits,
        tol=float("nan"),
    )
    parity_note(
        f"bf16 (config A): mean KL {kl.mean():.2e}, max KL {kl.max():.2e}, top-1 agreement {top1:.3f}"
    )
    assert kl.mean() < BF16_MEAN_KL and kl.max() < BF16_MAX_KL


# --------------------------------------------------------------------------------------
# real weights: SmolLM2-135M-Instruct
# --------------------------------------------------------------------------------------

REL_TOL = 1e-4  # max|diff| / max|logit|


@pytest.fixture(scope="module")
def smollm2(smollm2_hf, converted, parity_note):
    """The cached HF SmolLM2-LLaVA converted by the CLI (timed, peak RSS measured) and loaded."""
    import zspa_jax

    if smollm2_hf.build_seconds is not None:
        parity_note(
            f"SmolLM2-LLaVA HF fixture built from GGUF in {smollm2_hf.build_seconds:.1f} s (now cached)"
        )
    proc = converted.process(smollm2_hf.path)  # the real CLI, in a subprocess: its peak RSS
    out = proc.out
    rss = f"{proc.max_rss_mb:.0f} MiB" if proc.max_rss_mb else "n/a"
    cpu = f"{proc.cpu_seconds:.1f} s CPU (user+sys), " if proc.cpu_seconds else ""
    parity_note(
        f"convert SmolLM2-LLaVA (f32, 540 MB safetensors): {cpu}{proc.seconds:.1f} s wall "
        f"(may overlap other tests), peak RSS {rss}"
    )
    yield smollm2_hf, zspa_jax.load(out)
    converted.discard(smollm2_hf.path)  # 515 MB; pytest keeps the last 3 sessions' temp dirs


def _real_compare(name, ours, ref, parity_record, parity_note):
    d = max_diff(ours, ref)
    rel = d / float(np.max(np.abs(ref)))
    top1 = ours.argmax(-1) == ref.argmax(-1)
    n = top1.size
    parity_record(
        f"{name}: max|diff|", "SmolLM2-135M real", d, float("nan"), scale=float(np.max(np.abs(ref)))
    )
    parity_record(
        f"{name}: rel diff", "SmolLM2-135M real", rel, REL_TOL, metric="max|diff|/max|logit|"
    )
    parity_note(
        f"{name}: {n} positions, top-1 agreement {int(top1.sum())}/{n}, max|logit| {np.max(np.abs(ref)):.1f}"
    )
    assert rel <= REL_TOL
    assert top1.all(), f"top-1 differs at positions {np.nonzero(~top1.reshape(-1))[0].tolist()}"


def test_smollm2_decoder_real_text(smollm2, parity_record, parity_note):
    """(a) our LLaMA decoder on the real SmolLM2 weights vs transformers, >= 300 real-text positions."""
    hf_llava, vlm = smollm2
    ids = np.asarray(hf_llava.tokenizer(REAL_TEXT)["input_ids"])[None]
    assert ids.shape[1] >= 300, ids.shape
    ours = np.asarray(jit_call(vlm.model.language_model, "__call__", jnp.asarray(ids, jnp.int32)))
    # transformers' SmolLM2 LlamaForCausalLM = the LLaVA's language model + (tied) lm_head.
    with torch.no_grad():
        lm = hf_llava.hf.model.language_model
        hidden = lm(input_ids=torch.from_numpy(ids)).last_hidden_state
        ref = t2n(hf_llava.hf.lm_head(hidden))
    _real_compare(f"decoder, {ids.shape[1]} text tokens", ours, ref, parity_record, parity_note)


def test_smollm2_llava_end_to_end(smollm2, parity_record, parity_note):
    """(b) the SmolLM2-LLaVA converted by the CLI, with an image, end to end."""
    import zspa_jax

    hf_llava, vlm = smollm2
    tok = hf_llava.tokenizer
    question = REAL_TEXT[: REAL_TEXT.index("The great change")]
    prefix = tok("<|im_start|>user\n")["input_ids"]
    suffix = tok(f"\n{question}<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    ids = np.asarray(prefix + [hf_llava.image_token_index] * hf_llava.tokens_per_image + suffix)[
        None
    ]
    size = vlm.config.vision.image_size
    pv = np.random.default_rng(11).standard_normal((1, 3, size, size)).astype(np.float32)
    ours = zspa_jax.forward(vlm, ids, pv)
    ref = hf_logits(hf_llava.hf, ids, pv)
    _real_compare(f"llava+image, {ids.shape[1]} tokens", ours, ref, parity_record, parity_note)


def test_smollm2_llava_greedy_generation_matches_transformers(smollm2):
    """Real weights, through the saved processor and chat template: 32 greedy tokens, unpruned and pruned."""
    from PIL import Image

    import zspa_jax

    hf_llava, vlm = smollm2
    size = vlm.config.vision.image_size
    image = Image.fromarray(
        np.random.default_rng(5).integers(0, 255, (size, size, 3), dtype=np.uint8)
    )
    question = "Write one sentence about lighthouses."
    ours = zspa_jax.generate(vlm, question, image, max_new_tokens=32, eos_token_id=[])
    processor = vlm.processor
    # SmolLM2's chat template is text-only: the image token goes in front of the question.
    text = processor.apply_chat_template(
        [{"role": "user", "content": f"<image>\n{question}"}], add_generation_prompt=True
    )
    batch = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        # No min_new_tokens: it would suppress EOS logits. Stop only on the image id, which is never predicted.
        ref = hf_llava.hf.generate(
            **batch, max_new_tokens=32, do_sample=False, eos_token_id=hf_llava.image_token_index
        ).numpy()[:, batch["input_ids"].shape[1] :]
    np.testing.assert_array_equal(ours.sequences, ref)
    assert len(ours.texts[0].split()) > 3  # real weights answer with words
