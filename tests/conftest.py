"""Fixtures and hooks only; what they build lives in tests/support/.

Everything runs offline. Expensive artefacts are built once per session; the SmolLM2-LLaVA
(542 MB of f32 weights) is cached on disk (tests/support/smollm2.py) so later sessions skip
the ~40 s GGUF dequantisation.
"""

from __future__ import annotations

import os

# Before anything imports transformers / huggingface_hub: a hub id would otherwise
# spend ~23 s retrying the network before failing.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gc  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tests.support import parity_report, process_limits  # noqa: E402
from tests.support.converter import (  # noqa: E402
    ConvertRunner,
    describe_failure,
    run_converter_in_process,
)
from tests.support.key_layouts import rewrite_layout  # noqa: E402
from tests.support.smollm2 import SmolLM2Llava, cached_smollm2_llava  # noqa: E402
from tests.support.tiny_llava import TinyLlava, build_tiny_llava, options_key  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
torch.manual_seed(0)
torch.set_num_threads(2)


# --------------------------------------------------------------------------------------
# Hooks: the parity table, gathered from pytest-xdist workers
# --------------------------------------------------------------------------------------


def pytest_sessionfinish(session, exitstatus):
    """Under pytest-xdist each worker hands its rows to the controller, which prints them."""
    controller = getattr(session.config.option, "numprocesses", None) and not hasattr(
        session.config, "workerinput"
    )
    if not controller:  # the processes that ran tests: their memory
        parity_report.record_note(process_limits.summary())
    output = getattr(session.config, "workeroutput", None)
    if output is not None:
        output["zspa_parity"] = parity_report.worker_payload()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """pytest-xdist controller: collect a finished worker's parity rows and notes."""
    parity_report.add_worker_payload(getattr(node, "workeroutput", {}).get("zspa_parity", ""))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    parity_report.write_summary(terminalreporter)


@pytest.fixture(scope="session")
def parity_record():
    return parity_report.record_parity


@pytest.fixture(scope="session")
def parity_note():
    return parity_report.record_note


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs(request):
    """Keep jit's compiled programs from module to module (later modules run many of the
    same programs), but drop them all once this process nears a limit: each compiled CPU
    executable holds ~20 memory mappings, and past the kernel's vm.max_map_count (65530 by
    default) LLVM's next mmap fails inside XLA's compiler, which ends the process with a
    segfault; or once its resident memory nears what a CI runner allows a worker."""
    yield
    if process_limits.near_limit():
        jax.clear_caches()
        gc.collect()
        process_limits.CLEARED.append(request.module.__name__)


# --------------------------------------------------------------------------------------
# Tiny models and checkpoints
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_hf_llava(tmp_path_factory):
    """Factory: `tiny_hf_llava(name=None, **overrides) -> TinyLlava`, built once per option
    set (tests/support/tiny_llava.py)."""
    cache: dict[tuple, TinyLlava] = {}

    def make(name: str | None = None, **overrides) -> TinyLlava:
        key = options_key(overrides)
        if key not in cache:
            label = name or f"tiny{len(cache)}"
            cache[key] = build_tiny_llava(tmp_path_factory.mktemp(f"hf_{label}"), label, overrides)
        return cache[key]

    return make


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


@pytest.fixture(scope="session")
def _convert_runner(tmp_path_factory):
    runner = ConvertRunner(tmp_path_factory)
    yield runner
    runner.close()


@pytest.fixture(scope="session")
def converted(_convert_runner):
    """`converted(src, *extra_args) -> Path`: `python -m convert.llava SRC OUT *extra_args`
    run in this process (the CLI's own `main`, same code and files; only the interpreter
    start-up is saved) into a session temp dir, once per (src, args); a failure fails the
    test with the converter's output.

    `converted.process(src, *extra_args)` runs the real CLI in a subprocess of its own (into
    a separate directory) and returns the CompletedProcess with `.seconds`, `.cpu_seconds`,
    `.max_rss_mb` and `.out`: for the converter-CLI tests.
    """
    runner = _convert_runner

    class Converted:
        def __call__(self, src, *extra_args: str) -> Path:
            out = runner.default_out(src, *extra_args)
            key = (str(src), str(out), tuple(extra_args))
            proc = runner.in_process.get(key)
            if proc is None:
                proc = run_converter_in_process("llava", src, out, *extra_args)
                if proc.returncode == 0:
                    runner.in_process[key] = proc
            if proc.returncode != 0:
                pytest.fail(describe_failure(proc))
            return out

        def discard(self, src, *extra_args: str) -> None:
            """Delete every output of (src, args) and forget it (a later call converts again)."""
            for out in (
                runner.default_out(src, *extra_args),
                runner.default_out(src, *extra_args, "cli"),
            ):
                runner.jobs.pop((str(src), str(out), tuple(extra_args)), None)
                runner.in_process.pop((str(src), str(out), tuple(extra_args)), None)
                shutil.rmtree(out, ignore_errors=True)

        def process(self, src, *extra_args: str) -> subprocess.CompletedProcess:
            out = runner.default_out(src, *extra_args, "cli")
            proc = runner.start(src, out, *extra_args).result()
            if proc.returncode != 0:
                pytest.fail(describe_failure(proc))
            return proc

    return Converted()


@pytest.fixture(scope="session")
def smollm2_hf() -> SmolLM2Llava:
    """HF LLaVA whose language model is the real SmolLM2-135M-Instruct (f32), cached on disk."""
    return cached_smollm2_llava()
