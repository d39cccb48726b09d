"""Running the converters: the CLI in a subprocess (timed, peak RSS) or its `main` in process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from tests.support.paths import REPO_ROOT


def subprocess_env() -> dict:
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
            env=subprocess_env(),
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


class ConvertRunner:
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
