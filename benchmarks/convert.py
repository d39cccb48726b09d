"""Converter memory benchmark: a >= 3 GB synthetic LLaVA checkpoint through `python -m convert.llava`.

    python benchmarks/convert.py                 # -> benchmarks/results/convert.{md,json}
    python benchmarks/convert.py --layers 2      # smaller source (quick check; prints only unless --out)

Source: random weights with LLaVA-1.5-7B's names (the hub's legacy layout,
`vision_tower.vision_model.*`, `language_model.model.*`, `language_model.lm_head.*`) and
widths (CLIP ViT-L/14-336 tower, projector 1024 -> 4096 -> 4096, LLaMA-2-7B decoder:
hidden 4096, MLP 11008, 32 heads, vocab 32064) but only `--layers` decoder layers (default
6), stored in float16 like the hub checkpoint: 3.6 GB in 1 GB shards with
`model.safetensors.index.json`. Tensors are generated with numpy in chunks and written one
shard at a time with `safetensors.numpy.save_file` (never the whole model in memory);
config.json comes from transformers' LlavaConfig.save_pretrained. The source is cached under
`tempfile.gettempdir()/zspa_jax_bench_cache/` (built atomically) and reused.

Measured: the converter CLI in a subprocess (`--dtype bfloat16`, so the output is as large as
the input), its wall time and peak RSS (ru_maxrss of that child from os.wait4), plus an RSS
timeline sampled from /proc/PID/status (anonymous vs file-backed pages); the baseline is the
peak RSS of `python -c "import convert.llava"`. Target: converter peak RSS <= 1 GB (1024 MiB)
above that baseline. The converted output is deleted afterwards.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from zspa_jax.estimate import llava_1_5_7b_config  # noqa: E402

CACHE_ROOT = Path(tempfile.gettempdir()) / "zspa_jax_bench_cache"
RESULTS = HERE / "results"
MARKER = "synthetic_checkpoint.json"
SHARD_BYTES = 1 << 30
TARGET_MIB = 1024
VERSION = "v1"

_LLAVA = llava_1_5_7b_config()
_V, _T = _LLAVA.vision, _LLAVA.text
VISION = dict(
    hidden=_V.hidden_size,
    mlp=_V.intermediate_size,
    layers=_V.num_hidden_layers,
    heads=_V.num_attention_heads,
    image=_V.image_size,
    patch=_V.patch_size,
    channels=_V.num_channels,
)
TEXT = dict(
    hidden=_T.hidden_size,
    mlp=_T.intermediate_size,
    heads=_T.num_attention_heads,
    vocab=_T.vocab_size,
)


def tensor_specs(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """(hub-layout name, torch shape) of every tensor of the synthetic LLaVA, in file order."""
    v, t = VISION, TEXT
    d, m = v["hidden"], v["mlp"]
    patches = (v["image"] // v["patch"]) ** 2
    specs: list[tuple[str, tuple[int, ...]]] = []
    vt = "vision_tower.vision_model."
    specs += [
        (vt + "embeddings.class_embedding", (d,)),
        (vt + "embeddings.patch_embedding.weight", (d, v["channels"], v["patch"], v["patch"])),
        (vt + "embeddings.position_embedding.weight", (patches + 1, d)),
        (vt + "pre_layrnorm.weight", (d,)),
        (vt + "pre_layrnorm.bias", (d,)),
    ]
    for i in range(v["layers"]):
        p = f"{vt}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            specs += [
                (p + f"self_attn.{proj}.weight", (d, d)),
                (p + f"self_attn.{proj}.bias", (d,)),
            ]
        specs += [
            (p + "layer_norm1.weight", (d,)),
            (p + "layer_norm1.bias", (d,)),
            (p + "mlp.fc1.weight", (m, d)),
            (p + "mlp.fc1.bias", (m,)),
            (p + "mlp.fc2.weight", (d, m)),
            (p + "mlp.fc2.bias", (d,)),
            (p + "layer_norm2.weight", (d,)),
            (p + "layer_norm2.bias", (d,)),
        ]
    specs += [(vt + "post_layernorm.weight", (d,)), (vt + "post_layernorm.bias", (d,))]
    h = t["hidden"]
    specs += [
        ("multi_modal_projector.linear_1.weight", (h, d)),
        ("multi_modal_projector.linear_1.bias", (h,)),
        ("multi_modal_projector.linear_2.weight", (h, h)),
        ("multi_modal_projector.linear_2.bias", (h,)),
        ("language_model.model.embed_tokens.weight", (t["vocab"], h)),
    ]
    for i in range(layers):
        p = f"language_model.model.layers.{i}."
        specs += [
            (p + f"self_attn.{proj}.weight", (h, h))
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj")
        ]
        specs += [
            (p + "mlp.gate_proj.weight", (t["mlp"], h)),
            (p + "mlp.up_proj.weight", (t["mlp"], h)),
            (p + "mlp.down_proj.weight", (h, t["mlp"])),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    specs += [
        ("language_model.model.norm.weight", (h,)),
        ("language_model.lm_head.weight", (t["vocab"], h)),
    ]
    return specs


def hf_config(layers: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    v, t = VISION, TEXT
    return LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=v["hidden"],
            intermediate_size=v["mlp"],
            num_hidden_layers=v["layers"],
            num_attention_heads=v["heads"],
            image_size=v["image"],
            patch_size=v["patch"],
            projection_dim=768,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        ),
        text_config=LlamaConfig(
            vocab_size=t["vocab"],
            hidden_size=t["hidden"],
            intermediate_size=t["mlp"],
            num_hidden_layers=layers,
            num_attention_heads=t["heads"],
            num_key_value_heads=t["heads"],
            rms_norm_eps=1e-5,
            max_position_embeddings=4096,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=32001,
        ),
        image_token_index=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(v["image"] // v["patch"]) ** 2,
        tie_word_embeddings=False,
        dtype="float16",
    )


def random_tensor(
    rng: np.random.Generator, name: str, shape: tuple[int, ...], chunk: int = 1 << 24
) -> np.ndarray:
    """float16 values, filled in chunks of `chunk` elements (float32 scratch stays small)."""
    out = np.empty(shape, np.float16)
    flat = out.reshape(-1)
    if name.endswith(
        (
            "norm.weight",
            "layernorm.weight",
            "layer_norm1.weight",
            "layer_norm2.weight",
            "layrnorm.weight",
        )
    ):
        flat[:] = 1.0
        return out
    scale = 0.02
    for start in range(0, flat.size, chunk):
        stop = min(start + chunk, flat.size)
        flat[start:stop] = rng.standard_normal(stop - start, dtype=np.float32) * scale
    return out


def build_source(directory: Path, layers: int, log=print) -> dict:
    """Write the sharded f16 checkpoint + config.json into `directory`; returns a summary."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    specs = tensor_specs(layers)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = int(np.prod(shape)) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    rng = np.random.default_rng(0)
    weight_map = {}
    total = 0
    t0 = time.perf_counter()
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: random_tensor(rng, name, shape) for name, shape in shard}
        save_file(tensors, str(directory / fname), metadata={"format": "pt"})
        shard_bytes = sum(t.nbytes for t in tensors.values())
        total += shard_bytes
        weight_map.update({name: fname for name, _ in shard})
        del tensors
        log(
            f"  shard {i + 1}/{len(shards)}: {shard_bytes / 2**30:.2f} GiB ({time.perf_counter() - t0:.0f} s)"
        )
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )
    hf_config(layers).save_pretrained(str(directory))
    return {
        "layers": layers,
        "tensors": len(specs),
        "parameters": int(sum(np.prod(s) for _, s in specs)),
        "bytes": total,
        "shards": len(shards),
        "dtype": "float16",
        "build_seconds": time.perf_counter() - t0,
    }


def source_checkpoint(layers: int, rebuild: bool = False, log=print) -> tuple[Path, dict]:
    final = CACHE_ROOT / f"synthetic-llava7b-{layers}L-f16-{VERSION}"
    if rebuild or not (final / MARKER).exists():
        CACHE_ROOT.mkdir(parents=True, exist_ok=True)
        log(f"writing the synthetic checkpoint to {final} ...")
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=CACHE_ROOT))
        try:
            summary = build_source(tmp, layers, log)
            (tmp / MARKER).write_text(json.dumps(summary, indent=2) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final, json.loads((final / MARKER).read_text())


# ----------------------------------------------------------------------------- measuring


def _status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, RssShmem of a live process, in kB (empty once it exited)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return out


# Runs the measured command from a fresh, small process: Linux's ru_maxrss of a child counts
# the image it was forked from (until exec), so forking the converter straight from a big
# parent (this script after writing the source) would report the parent's RSS instead.
_LAUNCHER = """
import json, os, sys
result_file, argv = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    os.execv(argv[0], argv)
with open(result_file + ".pid", "w") as f:
    f.write(str(pid))
_, status, usage = os.wait4(pid, 0)
with open(result_file, "w") as f:
    json.dump({"returncode": os.waitstatus_to_exitcode(status), "ru_maxrss": usage.ru_maxrss}, f)
"""


def run_measured(cmd: list[str], sample_s: float = 0.1) -> dict:
    """Run cmd; wall seconds, exact peak RSS (wait4 rusage of that process) and an RSS timeline."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    result_file = Path(tempfile.mkdtemp(prefix="zspa_measure_")) / "result.json"
    stdout = tempfile.TemporaryFile(mode="w+")
    stderr = tempfile.TemporaryFile(mode="w+")
    t0 = time.perf_counter()
    launcher = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, str(result_file), *cmd],
        cwd=ROOT,
        env=env,
        stdout=stdout,
        stderr=stderr,
        text=True,
    )
    timeline: list[tuple[float, dict]] = []
    done = threading.Event()

    def sample():
        pid = None
        while not done.is_set():
            if pid is None:
                try:
                    pid = int((result_file.parent / "result.json.pid").read_text())
                except (OSError, ValueError):
                    pass
            s = _status(pid) if pid else {}
            if s:
                timeline.append((time.perf_counter() - t0, s))
            done.wait(sample_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    launcher.wait()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    outputs = []
    for f in (stdout, stderr):
        f.seek(0)
        outputs.append(f.read())
        f.close()
    try:
        measured = json.loads(result_file.read_text())
    except (OSError, ValueError):
        measured = {"returncode": launcher.returncode, "ru_maxrss": 0}
    shutil.rmtree(result_file.parent, ignore_errors=True)
    peak_kb = measured["ru_maxrss"] / (1024 if sys.platform == "darwin" else 1)
    key = lambda k: max((s.get(k, 0) for _, s in timeline), default=0) / 1024  # noqa: E731
    return {
        "cmd": cmd,
        "returncode": measured["returncode"],
        "seconds": seconds,
        "peak_rss_mib": peak_kb / 1024,
        "sampled_max_rss_mib": key("VmRSS"),
        "sampled_max_anon_mib": key("RssAnon"),
        "sampled_max_file_mib": key("RssFile"),
        "timeline": [
            (round(t, 2), {k: round(v / 1024) for k, v in s.items()}) for t, s in timeline
        ],
        "stdout": outputs[0][-3000:],
        "stderr": outputs[1][-3000:],
    }


# In-process profile of the same conversion (run in its own subprocess): RSS split into
# anonymous and file-backed pages after each phase, and per parameter group: bytes pending,
# the anonymous peak while orbax writes it (sampled every 3 ms), what is left afterwards,
# and what gc.collect() and glibc's malloc_trim(0) give back.
_PROFILER = r"""
import ctypes, gc, json, sys, threading, time
from pathlib import Path
import numpy as np

def status():
    d = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("RssAnon", "RssFile"):
            d[k] = int(v.split()[0]) // 1024
    return d

phases = [("python started", status())]
import convert.llava as cl
from convert.hf_config import llava_config_from_hf
from convert.safetensors_io import SafetensorsCheckpoint
from models.checkpoint import ParamWriter, param_template
from models.layers import DTYPES
phases.append(("import convert.llava", status()))
src, out, dtype = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
hf = cl.load_hf_config(src)
phases.append(("load_hf_config (transformers in a child process)", status()))
cfg = llava_config_from_hf(hf, dtype=dtype)
template = param_template(cfg)
phases.append(("param_template (nnx.eval_shape)", status()))
checkpoint = SafetensorsCheckpoint(src)
plan = cl.plan_conversion(checkpoint, template)
phases.append(("plan_conversion", status()))
peak = [0]
stop = threading.Event()
def sampler():
    while not stop.is_set():
        peak[0] = max(peak[0], status()["RssAnon"])
        time.sleep(0.003)
threading.Thread(target=sampler, daemon=True).start()
out.mkdir(parents=True, exist_ok=True)
writer = ParamWriter(out)
groups = []
original_flush = writer._flush
def flush():
    pending = writer._pending_bytes / 2**20
    largest = max((a.nbytes for a in writer._pending.values()), default=0) / 2**20
    before = status()
    peak[0] = before["RssAnon"]
    original_flush()
    after = status()
    entry = {"tensors": None, "pending_mib": round(pending), "largest_tensor_mib": round(largest),
             "anon_before": before["RssAnon"], "file_before": before["RssFile"], "anon_peak_during_save": peak[0],
             "anon_after": after["RssAnon"]}
    gc.collect()
    entry["anon_after_gc"] = status()["RssAnon"]
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    entry["anon_after_malloc_trim"] = status()["RssAnon"]
    groups.append(entry)
writer._flush = flush
transforms = []
for step in plan:
    before = status()["RssAnon"]
    peak[0] = before
    writer.reserve(int(np.prod(step.shape)) * np.dtype(DTYPES[dtype]).itemsize)
    array = cl.load_tensor(checkpoint, step, DTYPES[dtype])
    if array.nbytes >= 64 * 2**20:
        time.sleep(0.01)
        transforms.append({"key": step.key, "transform": step.transform.value, "mib": round(array.nbytes / 2**20),
                           "anon_extra_peak": peak[0] - before, "anon_extra_after": status()["RssAnon"] - before})
    writer.add(step.path, array)
    del array
writer.close()
stop.set()
phases.append(("all groups written (malloc_trim after each)", status()))
print("PROFILE " + json.dumps({"phases": phases, "groups": groups, "transforms": transforms}))
"""


def profile_conversion(src: Path, dtype: str) -> dict:
    out = Path(tempfile.mkdtemp(prefix="convert_profile_", dir=CACHE_ROOT))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PROFILER, str(src), str(out / "converted"), dtype],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PROFILE ")), None)
    if line is None:
        return {"error": proc.stderr[-3000:]}
    return json.loads(line[len("PROFILE ") :])


def machine_info() -> dict:
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "load_average_start": list(os.getloadavg()),
    }


def diagnose(profile: dict, conv: dict, baseline: dict) -> str:
    """A plain-text account of where the converter's peak RSS goes, from the profile."""
    if not profile or "phases" not in profile or not profile.get("groups"):
        return ""
    ph = {name: v for name, v in profile["phases"]}
    names = [name for name, _ in profile["phases"]]
    total = lambda v: v["RssAnon"] + v["RssFile"]  # noqa: E731
    groups = profile["groups"]
    worst = max(groups, key=lambda g: g["anon_peak_during_save"])
    biggest = max(groups, key=lambda g: g["largest_tensor_mib"])
    save_extra = [g["anon_peak_during_save"] - g["anon_before"] for g in groups if g["pending_mib"]]
    ratio = [
        (g["anon_peak_during_save"] - g["anon_before"]) / g["pending_mib"]
        for g in groups
        if g["pending_mib"]
    ]
    retained = [g["anon_after_gc"] - g["anon_after_malloc_trim"] for g in groups]
    transforms = profile.get("transforms", [])
    lines = [
        f"Peak RSS of the converter {conv['peak_rss_mib']:.0f} MiB vs {baseline['peak_rss_mib']:.0f} MiB for "
        f"`import convert.llava` ({conv['peak_rss_mib'] - baseline['peak_rss_mib']:.0f} MiB above). In-process profile "
        "(RSS = anonymous + file-backed pages):",
        "",
        f"* interpreter + `import convert.llava` (jax, flax, orbax): {total(ph[names[1]])} MiB (the baseline).",
        f"* `load_hf_config` (transformers reads config.json in a child process, so torch never loads here): "
        f"{total(ph[names[2]]) - total(ph[names[1]]):+d} MiB.",
        f"* `param_template` (nnx.eval_shape of the model): {total(ph[names[3]]) - total(ph[names[2]]):+d} MiB.",
        f"* Groups hold up to {max(g['pending_mib'] for g in groups)} MiB (GROUP_BYTES, or one larger tensor alone); "
        f"writing one raises anonymous memory by {min(save_extra)}-{max(save_extra)} MiB "
        f"({min(ratio):.1f}-{max(ratio):.1f}x the group): tensorstore's write buffers (orbax's deep copy of host "
        "arrays is switched off in ParamWriter).",
        (
            "* Transform + cast of the largest tensors (one copy each): "
            + ", ".join(
                f"{t['key']} {t['mib']} MiB +{t['anon_extra_peak']} MiB" for t in transforms[:3]
            )
            + "."
            if transforms
            else "* (no tensor >= 64 MiB)"
        ),
        f"* After each group gc.collect() releases nothing and malloc_trim(0) returns {min(retained)}-{max(retained)} "
        "MiB (heap the write threads left in malloc arenas).",
        f"* Largest tensor: {biggest['largest_tensor_mib']} MiB (group {groups.index(biggest)}). Worst moment: the "
        f"flush of group {groups.index(worst)} ({worst['pending_mib']} MiB): anonymous {worst['anon_before']} -> "
        f"{worst['anon_peak_during_save']} MiB, plus {worst['file_before']} MiB file-backed.",
        "",
        "So the peak is the interpreter + about 2x the largest group or tensor: bounded by the largest tensor, "
        "not the checkpoint size.",
    ]
    return "\n".join(lines)


def markdown(report: dict) -> str:
    src, conv, base, m = report["source"], report["convert"], report["baseline"], report["machine"]
    delta = conv["peak_rss_mib"] - base["peak_rss_mib"]
    lines = [
        "# Converter memory benchmark",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}; {m['date']}; "
        f"load average at start {', '.join(f'{x:.2f}' for x in m['load_average_start'])}, at end "
        f"{', '.join(f'{x:.2f}' for x in report['load_average_end'])}.",
        "",
        f"Source: synthetic LLaVA-1.5-7B-shaped checkpoint (hub layout, CLIP-L tower, LLaMA-2-7B widths, "
        f"{src['layers']} decoder layers), {src['dtype']}, {src['bytes'] / 1e9:.2f} GB ({src['bytes'] / 2**30:.2f} GiB) "
        f"in {src['shards']} shards, {src['tensors']} tensors, {src['parameters'] / 1e9:.2f} B parameters.",
        f"Command: `python -m convert.llava SRC OUT --dtype {report['dtype']} --quiet` (peak RSS: wait4 rusage of the "
        "converter process, launched from a small helper process).",
        "",
        "| measure | value |",
        "|---|---|",
        f"| conversion wall time | {conv['seconds']:.1f} s ({src['bytes'] / conv['seconds'] / 1e6:.0f} MB/s) |",
        f"| converter peak RSS | {conv['peak_rss_mib']:.0f} MiB |",
        f'| baseline peak RSS (`python -c "import convert.llava"`) | {base["peak_rss_mib"]:.0f} MiB ({base["seconds"]:.1f} s) |',
        f"| converter peak RSS above baseline | {delta:.0f} MiB |",
        f"| sampled max anonymous / file-backed RSS | {conv['sampled_max_anon_mib']:.0f} / {conv['sampled_max_file_mib']:.0f} MiB |",
        f"| output size | {report['output_bytes'] / 1e9:.2f} GB |",
        "",
        f"Target: converter peak RSS <= {TARGET_MIB} MiB above the baseline: "
        f"**{'PASS' if report['target_pass'] else 'MISS'}** ({delta:.0f} MiB).",
        "",
    ]
    profile = report.get("profile") or {}
    if profile.get("phases"):
        lines += [
            "## Profile (in-process, same conversion)",
            "",
            "| phase | anonymous MiB | file-backed MiB |",
            "|---|---|---|",
        ]
        lines += [f"| {name} | {v['RssAnon']} | {v['RssFile']} |" for name, v in profile["phases"]]
        lines += [
            "",
            "| group | pending MiB | largest tensor MiB | anon before | anon peak during save | anon after | after gc | after malloc_trim | file-backed before |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {i} | {g['pending_mib']} | {g['largest_tensor_mib']} | {g['anon_before']} | {g['anon_peak_during_save']} "
            f"| {g['anon_after']} | {g['anon_after_gc']} | {g['anon_after_malloc_trim']} | {g['file_before']} |"
            for i, g in enumerate(profile["groups"])
        ]
        lines.append("")
    if report.get("diagnosis"):
        lines += ["## Diagnosis", "", report["diagnosis"], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--layers",
        type=int,
        default=6,
        help="decoder layers of the synthetic model (default 6: 3.6 GB)",
    )
    parser.add_argument(
        "--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="converter --dtype"
    )
    parser.add_argument(
        "--rebuild", action="store_true", help="rewrite the cached synthetic source"
    )
    parser.add_argument(
        "--delete-source", action="store_true", help="also delete the cached source afterwards"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="always profile (default: only when the target is missed)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results directory (default benchmarks/results for the full run)",
    )
    args = parser.parse_args(argv)

    machine = machine_info()
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores; load average {machine['load_average_start']}",
        flush=True,
    )
    src_dir, source = source_checkpoint(args.layers, args.rebuild)
    print(
        f"source: {src_dir} ({source['bytes'] / 1e9:.2f} GB, {source['shards']} shards)", flush=True
    )

    baseline = run_measured([sys.executable, "-c", "import convert.llava"])
    print(
        f"baseline (import convert.llava): peak RSS {baseline['peak_rss_mib']:.0f} MiB", flush=True
    )
    out_dir = Path(tempfile.mkdtemp(prefix="convert_out_", dir=CACHE_ROOT)) / "converted"
    try:
        conv = run_measured(
            [
                sys.executable,
                "-m",
                "convert.llava",
                str(src_dir),
                str(out_dir),
                "--dtype",
                args.dtype,
                "--quiet",
            ]
        )
        if conv["returncode"] != 0:
            print(conv["stdout"], conv["stderr"], sep="\n")
            raise SystemExit(f"converter failed with exit code {conv['returncode']}")
        output_bytes = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(out_dir.parent, ignore_errors=True)
    delta = conv["peak_rss_mib"] - baseline["peak_rss_mib"]
    report = {
        "machine": machine,
        "source": {**source, "path": str(src_dir)},
        "baseline": {k: v for k, v in baseline.items() if k != "timeline"},
        "convert": conv,
        "converter_stdout": conv["stdout"].strip().splitlines()[-1:]
        if conv["stdout"].strip()
        else [],
        "output_bytes": output_bytes,
        "peak_rss_above_baseline_mib": delta,
        "target_mib": TARGET_MIB,
        "target_pass": delta <= TARGET_MIB,
        "dtype": args.dtype,
    }
    print(
        f"convert: {conv['seconds']:.1f} s, peak RSS {conv['peak_rss_mib']:.0f} MiB "
        f"(anon max {conv['sampled_max_anon_mib']:.0f}, file-backed max {conv['sampled_max_file_mib']:.0f}); "
        f"{delta:.0f} MiB above baseline -> {'PASS' if report['target_pass'] else 'MISS'} (target <= {TARGET_MIB} MiB)",
        flush=True,
    )
    if args.profile or not report["target_pass"]:
        print(
            "profiling where the converter's memory goes (a second, instrumented conversion) ...",
            flush=True,
        )
        report["profile"] = profile_conversion(src_dir, args.dtype)
        report["diagnosis"] = diagnose(report["profile"], conv, baseline)
    if args.delete_source:
        shutil.rmtree(src_dir, ignore_errors=True)
    report["load_average_end"] = list(os.getloadavg())
    md = markdown(report)
    print("\n" + md)
    results = args.out if args.out is not None else (RESULTS if args.layers == 6 else None)
    if results is not None:
        results.mkdir(parents=True, exist_ok=True)
        (results / "convert.md").write_text(md)
        (results / "convert.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {results}/convert.md, convert.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
