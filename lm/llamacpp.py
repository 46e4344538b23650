"""llama.cpp, built from a registry package, and the checks it runs on our GGUF exports (lm/gguf_export.py).

llama.cpp's tools are not Debian packages and not wheels, but the ``llama-cpp-python`` sdist on PyPI vendors
llama.cpp's full source. :func:`build` downloads that sdist once (pinned version and sha256, through pip, so pip's
index settings apply; ``LM_LLAMA_CPP_SDIST`` may name a local copy), builds ``libllama`` and the tools
``llama-tokenize``, ``llama-perplexity`` and ``llama-completion`` with CMake into a git-ignored cache
(``.cache/llama.cpp/<version>/`` in the checkout, or ``LM_LLAMA_CPP_DIR``) and reuses it afterwards. The same
sdist's ``llama_cpp`` package (ctypes bindings over that libllama) gives Python llama.cpp's logits. One line of
llama.cpp's logger is patched so the tools' last lines are not lost at exit (:data:`LOG_FLUSH_PATCH`).

What runs through llama.cpp (docs/gguf.md):

- :func:`tokenize`: ``llama-tokenize`` on a text, no BOS, no escapes, no special-token parsing;
- :func:`perplexity`: ``llama-perplexity`` on a text file, llama.cpp's protocol (non-overlapping windows of
  n_ctx tokens, the second half of each scored, no BOS), f32 KV cache;
- :func:`complete`: ``llama-completion`` greedy (top-k 1), the generated text and its tokens per second;
- :class:`Session`: libllama through the bindings, for logits of a window and greedy generation past the
  context window (the window restarts from its last half, as ``lm sample --overflow refill``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VERSION = "0.3.36"
"""The llama-cpp-python release whose vendored llama.cpp we build (its llama.cpp: ggml 0.25.3)."""
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LOG_FLUSH_PATCH = (
    "common/log.cpp",
    "        log = new common_log;\n",
    "        log = new common_log;\n"
    "        std::atexit([] { log->pause(); });  // lm: drain the log queue at exit (llama.cpp #22142)\n",
)
"""The one change we make to llama.cpp's source, in its logger, not its mathematics. The tools print (the generated
text, "Final estimate: PPL") through a logging thread that the process never waits for at exit, on purpose upstream
(llama.cpp #22142: the logger is leaked because its destructor hangs on Windows), so a tool that finishes quickly
loses its last lines: 3 of 60 llama-completion runs on this 2-core machine, and every try of two tests on a CI
machine. Upstream flushes case by case (llama.cpp #18276, #25504); the patch registers that flush at exit for
every tool. It is applied to the extracted source before the build, and refused if the line is not found."""
BUILD = f"{VERSION}-logflush"
"""The build's folder under the cache root: the sdist's version and the patch, so an unpatched build is not reused."""
TOOLS = ("llama-tokenize", "llama-perplexity", "llama-completion")
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",  # the bindings load libllama.so; the tools link the same one
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",  # no downloads: models are local files
    "-DLLAMA_BUILD_IS_DEV=OFF",
)


class LlamaCppError(RuntimeError):
    """llama.cpp could not be built or a tool failed (the message has its output's tail)."""


def cache_root() -> Path:
    """Where builds live: ``LM_LLAMA_CPP_DIR``, else ``.cache/llama.cpp`` of the checkout that holds ``lm``."""
    if env := os.environ.get("LM_LLAMA_CPP_DIR"):
        return Path(env)
    return Path(__file__).resolve().parent.parent / ".cache" / "llama.cpp"


@dataclass(frozen=True)
class LlamaCpp:
    """A finished build: its tools and libraries (``bin``) and the bindings' package folder (``python``)."""

    root: Path

    @property
    def bin(self) -> Path:
        return self.root / "build" / "bin"

    @property
    def python(self) -> Path:
        return self.root / "python"

    def tool(self, name: str) -> Path:
        return self.bin / name


STAMP = "built.json"


def build(root: Path | None = None, *, jobs: int | None = None, log=print) -> LlamaCpp:
    """The llama.cpp build under ``root`` (default :func:`cache_root`), built first if missing or incomplete.

    Concurrent callers wait on a lock and then reuse the build; a failed build leaves no stamp and is resumed
    (CMake rebuilds only what is missing) by the next call."""
    import fcntl

    root = Path(root or cache_root()) / BUILD
    done = LlamaCpp(root)
    if _complete(done):
        return done
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building: wait, then reuse its build
        if _complete(done):
            return done
        t0 = time.perf_counter()
        src = _sources(root, log)
        jobs = jobs or os.cpu_count() or 1
        log(f"llama.cpp {VERSION}: building {', '.join(TOOLS)} with {jobs} jobs (a few minutes, once) in {root}")
        _run(["cmake", "-S", str(src), "-B", str(root / "build"), *CMAKE_OPTIONS], root / "cmake.log")
        _run(["cmake", "--build", str(root / "build"), "-j", str(jobs), "--target", *TOOLS], root / "build.log")
        seconds = time.perf_counter() - t0
        (root / STAMP).write_text(json.dumps({"version": VERSION, "seconds": round(seconds, 1), "jobs": jobs}) + "\n")
        log(f"llama.cpp {VERSION}: built in {seconds:.0f} s")
    return done


def _complete(b: LlamaCpp) -> bool:
    return (b.root / STAMP).is_file() and all(b.tool(t).is_file() for t in TOOLS) and (b.python / "llama_cpp").is_dir()


def _sources(root: Path, log) -> Path:
    """The vendored llama.cpp source (and the bindings' package) extracted from the pinned sdist."""
    src = root / "src"
    if (src / "CMakeLists.txt").is_file() and (root / "python" / "llama_cpp").is_dir():
        return src
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        sdist = _sdist(Path(tmp), log)
        top = f"llama_cpp_python-{VERSION}/"
        with tarfile.open(sdist) as tar:
            wanted = (top + "vendor/llama.cpp/", top + "llama_cpp/")
            members = [m for m in tar.getmembers() if m.name.startswith(wanted)]
            tar.extractall(tmp, members=members, filter="data")
        _patch(Path(tmp) / top / "vendor" / "llama.cpp", *LOG_FLUSH_PATCH)
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(root / "python", ignore_errors=True)
        (root / "python").mkdir()
        os.replace(Path(tmp) / top / "vendor" / "llama.cpp", src)
        os.replace(Path(tmp) / top / "llama_cpp", root / "python" / "llama_cpp")
    return src


def _patch(src: Path, file: str, old: str, new: str) -> None:
    """Replace the one occurrence of ``old`` in ``src/file`` by ``new``; refuse a source where it is not once."""
    path = src / file
    text = path.read_text(encoding="utf-8")
    if text.count(old) != 1:
        raise LlamaCppError(f"{path}: expected the line {old.strip()!r} once, found it {text.count(old)} times; "
                            f"the llama.cpp source is not llama-cpp-python {VERSION}'s")  # fmt: skip
    path.write_text(text.replace(old, new), encoding="utf-8")


def _sdist(tmp: Path, log) -> Path:
    """The llama-cpp-python sdist, checked against its sha256: ``LM_LLAMA_CPP_SDIST`` or downloaded with pip."""
    if local := os.environ.get("LM_LLAMA_CPP_SDIST"):
        path = Path(local)
    else:
        log(f"llama.cpp: downloading the llama-cpp-python {VERSION} sdist (76 MB) with pip")
        cmd = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={VERSION}", "--no-deps", "--no-binary",
               ":all:", "--quiet", "-d", str(tmp)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(tmp.glob("llama_cpp_python-*.tar.gz"))
        if not found:
            raise LlamaCppError(f"pip could not download llama-cpp-python=={VERSION}:\n{proc.stderr[-2000:]}")
        path = found[0]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise LlamaCppError(f"{path}: sha256 {digest}, expected {SDIST_SHA256} (llama-cpp-python {VERSION})")
    return path


def _run(cmd: list[str], log_file: Path) -> None:
    with open(log_file, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = log_file.read_text(errors="replace")[-3000:]
        raise LlamaCppError(f"{' '.join(cmd[:3])} ... failed (exit {proc.returncode}); {log_file} ends:\n{tail}")


def _tool(
    lc: LlamaCpp, name: str, args: list[str], *, threads: int | None = None, last: str | None = None
) -> tuple[str, str]:
    """(stdout, stderr) of a llama.cpp tool. ``last``: a pattern its final log line matches; output without it is
    an error (with :data:`LOG_FLUSH_PATCH` nothing is lost at exit, so a missing line means the tool stopped)."""
    cmd = [str(lc.tool(name)), *args, *(["-t", str(threads)] if threads else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace")
    if proc.returncode:
        raise LlamaCppError(f"{name} failed (exit {proc.returncode}):\n{(proc.stderr or proc.stdout)[-3000:]}")
    if last is not None and not re.search(last, proc.stdout + proc.stderr):
        raise LlamaCppError(f"{name} ended without printing its last line ({last}):\n{proc.stderr[-3000:]}")
    return proc.stdout, proc.stderr


def tokenize(lc: LlamaCpp, gguf: Path, text: str) -> list[int]:
    """llama.cpp's token ids of ``text`` (``llama-tokenize``: no BOS, no escapes, special tokens not parsed)."""
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as f:
        f.write(text)
    try:
        stdout, _ = _tool(lc, "llama-tokenize", ["-m", str(gguf), "-f", f.name, "--ids", "--no-bos", "--no-escape",
                                            "--no-parse-special", "--log-disable"])  # fmt: skip
    finally:
        os.unlink(f.name)
    return json.loads(stdout.strip().splitlines()[-1])


@dataclass
class Perplexity:
    """``llama-perplexity``'s result: the final estimate and its uncertainty, as printed, and the chunks scored."""

    ppl: float
    ppl_sd: float
    chunks: int
    n_ctx: int


FINAL = r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)"


def perplexity(lc: LlamaCpp, gguf: Path, text_file: Path, n_ctx: int, *, threads: int | None = None) -> Perplexity:
    """llama.cpp's own perplexity of the text in ``text_file`` (its protocol: module docstring)."""
    args = ["-m", str(gguf), "-f", str(text_file), "-c", str(n_ctx), "-b", str(n_ctx), "--no-escape",
            "-ctk", "f32", "-ctv", "f32", "-fa", "off", "--no-warmup"]  # fmt: skip
    stdout, stderr = _tool(lc, "llama-perplexity", args, threads=threads, last=FINAL)
    final = re.search(FINAL, stdout + stderr)
    chunks = re.search(r"calculating perplexity over (\d+) chunks", stderr)
    if not chunks:
        raise LlamaCppError(f"llama-perplexity did not say how many chunks it scored:\n{stderr[-3000:]}")
    return Perplexity(float(final.group(1)), float(final.group(2)), int(chunks.group(1)), n_ctx)


EVAL_TIMING = r"eval time =\s*[0-9.]+ ms /\s*(\d+) runs\s*\(\s*[0-9.]+ ms per token,\s*([0-9.]+|inf) tokens per second"
"""llama.cpp's generation timer line (common_perf_print): runs, then tokens per second."""


@dataclass
class Completion:
    """``llama-completion``'s greedy continuation and its generation speed (its eval timer)."""

    text: str
    tokens: int
    tokens_per_s: float
    stopped: bool
    """It generated the end-of-text token (lm.gguf_export's EOS) before ``n`` tokens."""


END_OF_TEXT = " [end of text]\n"
"""What llama-completion prints after the text when generation meets an end-of-generation token."""


def complete(lc: LlamaCpp, gguf: Path, prompt: str, n: int, n_ctx: int, *, threads: int | None = None) -> Completion:
    """Greedy continuation of ``prompt`` by ``llama-completion`` (top-k 1, at most ``n`` tokens, inside n_ctx)."""
    args = ["-m", str(gguf), "-p", prompt, "-n", str(n), "-c", str(n_ctx), "--top-k", "1", "--no-escape",
            "--no-display-prompt", "-no-cnv", "--no-warmup", "-ctk", "f32", "-ctv", "f32", "-fa", "off",
            "--simple-io"]  # fmt: skip
    stdout, stderr = _tool(lc, "llama-completion", args, threads=threads, last=EVAL_TIMING)
    timing = re.search(EVAL_TIMING, stderr)
    text = stdout.removesuffix("\n\n")  # llama-completion ends its output with a blank line
    stopped = text.endswith(END_OF_TEXT)
    return Completion(text.removesuffix(END_OF_TEXT), int(timing.group(1)), float(timing.group(2)), stopped)


class Session:
    """One GGUF model loaded in libllama through llama-cpp-python's bindings (f32 KV cache, ``n_ctx`` positions)."""

    def __init__(self, lc: LlamaCpp, gguf: Path, n_ctx: int, *, threads: int | None = None):
        os.environ["LLAMA_CPP_LIB_PATH"] = str(lc.bin)
        if str(lc.python) not in sys.path:
            sys.path.insert(0, str(lc.python))
        from llama_cpp import GGML_TYPE_F32, Llama

        self.n_ctx = n_ctx
        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                         type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, n_threads=threads, n_threads_batch=threads,
                         verbose=False)  # fmt: skip

    def logits(self, ids: list[int]) -> np.ndarray:
        """(len(ids), V) float32 logits of one fresh sequence (at most n_ctx tokens)."""
        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        """``n`` greedy tokens after ``ids``, with llama.cpp's KV cache; when the window would pass n_ctx it restarts
        from its last n_ctx // 2 tokens (``lm sample --overflow refill``'s window)."""
        seq, keep = list(ids[-self.n_ctx :]), max(1, self.n_ctx // 2)
        self.llm.reset()
        self.llm.eval(seq)
        out = []
        for _ in range(n):
            nxt = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(nxt)
            seq.append(nxt)
            if self.llm.n_tokens + 1 > self.n_ctx:  # the next token has no position left: refill the window
                self.llm.reset()
                self.llm.eval(seq[-keep:])
            else:
                self.llm.eval([nxt])
        return out

    def close(self) -> None:
        self.llm.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
