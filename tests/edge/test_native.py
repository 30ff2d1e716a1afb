"""The native build: our patched llama.cpp is what the process loads, once, and edge stays torch-free."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from factedge.edge import native

ROOT = Path(__file__).resolve().parents[2]


def _maps_after_loading() -> list[str]:
    code = (
        "import factedge.edge.runtime, sys\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
        # the ggml functions llama-cpp-python does not bind: they must come from the same copies
        "from factedge.edge.threadpool import ThreadPool\n"
        "ThreadPool(2).close()\n"
        "from factedge.convert.quantize import _ggml\n"
        "_ggml()\n"
        "print('\\n'.join(l.split()[-1] for l in open('/proc/self/maps') if 'ggml' in l or 'llama' in l or 'mtmd' in l))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return out.split()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_exactly_one_ggml_and_it_is_ours():
    """One mapped file per library, also after the thread pool and the mmproj quantizer reached into
    ggml: an installed wheel holds `libggml-cpu.so`, `.so.0`, `.so.0.25.3` as separate copies, and
    opening the wrong name mapped a second ggml (a thread pool from it computed garbage)."""
    lines = _maps_after_loading()
    assert lines[0] == "NO-TORCH"  # the edge runtime never imports torch
    mapped = {p for p in lines[1:] if p.startswith("/")}
    libs = {Path(p).resolve() for p in mapped}
    lib_dir = native.lib_dir().resolve()
    assert all(p.parent == lib_dir for p in libs), sorted(libs)
    stems = [Path(p).name.split(".so")[0] for p in mapped]
    for stem in ("libllama", "libmtmd", "libggml", "libggml-base", "libggml-cpu"):
        assert stems.count(stem) == 1, (stem, sorted(mapped))


def test_build_info_lists_every_patch_in_order():
    info = native.build_info()
    patches = sorted(p.name for p in (ROOT / "cpp_patches").glob("*.patch"))
    assert info["patches"] == patches and len(patches) >= 3
    assert info["llama_cpp_python"] == "0.3.36"
    assert len(info["sdist_sha256"]) == 64


def test_tools_run_when_built_and_are_absent_otherwise():
    names = ("llama-quantize", "llama-mtmd-cli")
    if not native.build_info().get("tools", True):  # FACTEDGE_TOOLS=OFF: no stale binaries either
        assert not [n for n in names if (native.native_dir() / "bin" / n).exists()]
        return
    for name in names:
        proc = subprocess.run([str(native.tool(name)), "--help"], capture_output=True, text=True)
        assert "usage" in (proc.stdout + proc.stderr).lower(), name


def test_each_patch_has_a_header_saying_what_and_why():
    for patch in sorted((ROOT / "cpp_patches").glob("*.patch")):
        text = patch.read_text()
        subject = next(line for line in text.splitlines() if line.startswith("Subject:"))
        body = text.split(subject, 1)[1].split("\n---\n", 1)[0]
        assert len(subject) > 20 and len(body.split()) >= 30, patch.name  # what it fixes and why
        assert "test" in body, patch.name  # names the test that fails without it
        assert text.count("\ndiff --git") <= 4, patch.name  # small, reviewable


def test_edge_import_is_torch_free():
    code = "import factedge.edge, factedge.edge.vision_model, factedge.edge.cli, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_native_dir_override_is_honoured(tmp_path, monkeypatch):
    real = native.native_dir()
    for part in ("lib", "bin", "share"):
        (tmp_path / part).symlink_to(real / part)
    monkeypatch.setenv(native.ENV_NATIVE_DIR, str(tmp_path))
    native.native_dir.cache_clear()
    try:
        assert native.native_dir() == tmp_path.resolve()
        assert native.share_file("build_info.json") == tmp_path.resolve() / "share" / "build_info.json"
    finally:
        monkeypatch.undo()
        native.native_dir.cache_clear()


def test_a_no_change_rebuild_is_a_no_op():
    """Building twice: the second build compiles, links and reconfigures nothing."""
    import re
    import shutil

    build = ROOT / "build" / "native"
    cmake = shutil.which("cmake")
    if not (build / "build.ninja").is_file() or cmake is None:
        pytest.skip("no ninja build folder at build/native (installed from a wheel)")
    for _ in range(2):
        proc = subprocess.run([cmake, "--build", str(build)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-1000:]
    work = [line for line in proc.stdout.splitlines() if re.search(r"Building|Linking|Re-running CMake|extracting", line)]
    assert work == [], work
