"""What can be checked of the TensorRT path without TensorRT or a GPU.

(a) the CumMax plugin's ahead-of-time kernel: Triton compiles the exact function
    the plugin calls for every shipped profile's GPU, ptxas assembles the PTX, and
    the PTX's .entry parameters are exactly the arguments TensorRT launches with;
(b) the kernel's logic in Triton's interpreter lives in tests/test_kernels.py;
(c) the TensorRT-facing modules type-check against tensorrt-stubs.
"""

from __future__ import annotations

import importlib.util
import keyword
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from samout_edge.errors import SamoutError
from samout_edge.profiles import list_profiles
from samout_edge.tensorrt import driver, plugin

ROOT = Path(__file__).resolve().parents[1]
CUDA_PTXAS = Path("/usr/local/cuda/bin/ptxas")
# The newest PTX ISA each profile's driver loads (Triton's ptx_version spelling): JetPack 6.x
# ships CUDA 12.6 (PTX 8.5), JetPack 7 CUDA 13.0 (PTX 9.0); desktops are assumed on 13.0.
DRIVER_PTX = {"6": 85, "7": 90}
PROFILE_CCS = sorted({p.compute_capability for p in list_profiles()})

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="Triton is not installed (CI installs it as a dev package)")


def _ptx_target(ptx: str) -> str:
    return re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)


def _assemble(ptxas: Path, ptx: str, tmp_path: Path) -> subprocess.CompletedProcess:
    source = tmp_path / "cummax.ptx"
    source.write_text(ptx)
    return subprocess.run([str(ptxas), f"-arch={_ptx_target(ptx)}", str(source), "-o", str(tmp_path / "cummax.cubin")],
                          capture_output=True, text=True, timeout=120)


def _tritons_ptxas(arch: int) -> Path:
    from triton.backends.nvidia.compiler import get_ptxas  # Triton's own choice per architecture

    return Path(get_ptxas(arch).path)


def test_shipped_profiles_cover_orin_thor_and_desktops():
    assert {"8.7", "11.0", "9.0", "8.9"} <= set(PROFILE_CCS)


@needs_triton
@pytest.mark.parametrize("scan", ["max", "linear"])
@pytest.mark.parametrize("cc", PROFILE_CCS)
def test_aot_kernel_for_every_profile_gpu(cc, scan, tmp_path, monkeypatch):
    """The plugin's exact compile path for an explicit GPUTarget, per scan with a plugin, assembled by
    Triton's bundled ptxas."""
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    from samout_edge.kernels.triton_scan import SCAN_LAUNCH_ARGS, arch_of, compile_aot, kernel_for
    from samout_edge.scans import SCANS

    arity, launch_args = SCANS[scan].arity, SCAN_LAUNCH_ARGS[scan]
    for dtype, axis, static_len in (("fp16", 2, None), ("fp16", 1, 8), ("fp32", 2, None), ("bf16", 2, None)):
        kernel = compile_aot(dtype, axis, 4, cc, static_len=static_len, scan=scan)
        assert kernel.arch == arch_of(cc) and _ptx_target(kernel.ptx).startswith(f"sm_{kernel.arch}")
        # what TensorRT passes: the scan's input pointers, the plugin's SymInt32 extra args, 1 output pointer
        assert [p.kind for p in kernel.params] == plugin.launch_kinds(arity) == [k for _, k in launch_args]
        assert len(kernel.params) == arity + 1 + len(plugin.EXTRA_ARGS)
        runtime = [p.name for p in kernel_for(scan).params if not p.is_constexpr]
        assert runtime == [n for n, _ in launch_args] and runtime[arity:-1] == list(plugin.EXTRA_ARGS)
        # Triton 3.3+ appends hidden scratch pointers; compile_aot removed them, unused
        assert all(p.kind == "ptr" for p in kernel.stripped)
        assert kernel.num_warps * 32 <= 1024 and 0 <= kernel.shared < 48 * 1024
        assert kernel.block_l * kernel.block_q <= 4096
        result = _assemble(_tritons_ptxas(kernel.arch), kernel.ptx, tmp_path)
        assert result.returncode == 0, result.stderr


@needs_triton
@pytest.mark.skipif(not CUDA_PTXAS.is_file(), reason="no CUDA toolkit ptxas at /usr/local/cuda/bin/ptxas")
@pytest.mark.parametrize("profile", list_profiles(), ids=lambda p: p.name)
def test_aot_kernel_within_the_device_drivers_ptx(profile, tmp_path, monkeypatch):
    """Capped at the PTX ISA the device's driver loads, the PTX of every scan also assembles with the CUDA
    toolkit's ptxas (13.0 here, the level of JetPack 7's driver): uncapped, Triton 3.9 emits PTX 9.4 for
    sm_90/sm_110."""
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    from samout_edge.kernels.triton_scan import compile_aot

    cap = DRIVER_PTX.get((profile.jetpack or "7")[0], 90)
    for scan in ("max", "linear"):
        kernel = compile_aot("fp16", 2, 4, profile.compute_capability, ptx_version=cap, scan=scan)
        major, minor = map(int, re.search(r"^\.version (\d+)\.(\d+)", kernel.ptx, re.M).groups())
        assert major * 10 + minor <= cap
        result = _assemble(CUDA_PTXAS, kernel.ptx, tmp_path)
        assert result.returncode == 0, (scan, result.stderr)


def test_a_plugin_for_every_scan_with_a_kernel():
    """Pure plugin logic: one plugin id per kernel scan, found back from the id; the JIT path's arguments in
    the kernel's order (inputs, P, L, Q, output)."""
    from samout_edge.kernels import KERNEL_SCANS

    assert plugin.PLUGIN_IDS == {"max": "samout_edge::CumMax", "linear": "samout_edge::LinearScan"}
    assert plugin.PLUGIN_IDS["max"] == plugin.PLUGIN_ID and set(KERNEL_SCANS) == set(plugin.PLUGIN_IDS)
    assert [plugin.scan_of(p) for p in plugin.PLUGIN_IDS.values()] == list(plugin.PLUGIN_IDS)
    with pytest.raises(SamoutError, match="no samout-edge plugin"):
        plugin.scan_of("samout_edge::Nope")
    with pytest.raises(SamoutError, match="no samout-edge plugin for the 'nope' scan"):
        plugin.register_scan_plugin("nope", "10.13")
    with pytest.raises(SamoutError, match="LinearScan nodes run their local-function body"):
        plugin.register_scan_plugin("linear", "10.6")
    args = plugin.jit_args([0x10, 0x20], 0x30, 2, 3, 4)
    assert [a.value for a in args] == [0x10, 0x20, 2, 3, 4, 0x30]
    assert [type(a).__name__ for a in args] == ["c_ulong", "c_ulong", "c_int", "c_int", "c_int", "c_ulong"]
    if importlib.util.find_spec("triton") is not None:
        from samout_edge.kernels.triton_scan import KERNELS, SCAN_LAUNCH_ARGS

        assert set(KERNELS) == set(KERNEL_SCANS) == set(SCAN_LAUNCH_ARGS)


@needs_triton
def test_tritons_raw_ptx_has_the_hidden_parameters(monkeypatch):
    """The finding behind strip_hidden_params: Triton's own PTX declares more than TensorRT passes."""
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget

    from samout_edge.kernels.triton_scan import cummax_kernel, ptx_params

    source = triton.compiler.ASTSource(fn=cummax_kernel, signature={"x_ptr": "*fp16", "P": "i32", "L": "i32", "Q": "i32",
                                                                    "y_ptr": "*fp16"},
                                       constexprs={"BLOCK_L": 256, "BLOCK_Q": 16})
    raw = ptx_params(triton.compile(source, target=GPUTarget("cuda", 87, 32)).asm["ptx"])
    assert [p.kind for p in raw[:5]] == plugin.launch_kinds()
    assert [p.kind for p in raw[5:]] == ["ptr"] * (len(raw) - 5)  # 2 (global and profile scratch) in Triton 3.9


def test_strip_hidden_params_refuses_a_kernel_that_reads_them():
    from samout_edge.kernels.triton_scan import ptx_params, strip_hidden_params

    ptx = """.version 8.5
.target sm_87
.visible .entry k(
\t.param .u64 .ptr .global .align 1 k_param_0,
\t.param .u32 k_param_1,
\t.param .u64 .ptr .global .align 1 k_param_2
)
{
\tld.param.u32 %r1, [k_param_1];
\tret;
}
"""
    stripped, removed = strip_hidden_params(ptx, 2)
    assert [p.name for p in removed] == ["k_param_2"] and [p.kind for p in ptx_params(stripped)] == ["ptr", "i32"]
    assert strip_hidden_params(ptx, 3) == (ptx, [])
    with pytest.raises(ValueError, match="uses its hidden parameters"):
        strip_hidden_params(ptx.replace("[k_param_1]", "[k_param_2]"), 2)


def test_driver_ptx_limits():
    assert [driver.max_ptx_version(v) for v in (12040, 12060, 12080, 13000, 13010)] == [84, 85, 87, 90, 91]
    with pytest.raises(SamoutError, match="too old"):
        driver.max_ptx_version(10020)
    if importlib.util.find_spec("triton") is not None:
        from triton.backends.nvidia.compiler import ptx_get_version

        for v in (12040, 12060, 12090, 13000, 13020):
            assert driver.max_ptx_version(v) == ptx_get_version(f"{v // 1000}.{v % 1000 // 10}")


def test_gpu_identity_without_a_driver_says_so():
    try:
        identity = driver.gpu_identity()
    except SamoutError as e:
        assert "CUDA" in str(e) or "driver" in str(e)
        return
    assert re.fullmatch(r"\d+\.\d+", identity.compute_capability) and identity.gpu


# --------------------------------------------------------------------------- (c) types


def _fix_def(line: str) -> str:
    """tensorrt-stubs 10.13 has parameters named `in` and required parameters after
    defaulted ones, which no Python parser accepts; rename and default them."""
    match = re.match(r"^(\s*def \w+\()(.*)(\)\s*(?:->.*)?:\s*(?:\.\.\.)?\s*)$", line)
    if not match:
        return line
    parts, depth, current = [], 0, ""
    for ch in match.group(2):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    out, defaulted = [], False
    for part in parts:
        bare = part.strip().partition(":")[0].partition("=")[0].strip().lstrip("*")
        if keyword.iskeyword(bare):
            part = part.replace(bare, bare + "_", 1)
        if "=" in part and not part.strip().startswith("*"):
            defaulted = True
        elif defaulted and part.strip() and not part.strip().startswith("*") and part.strip() != "/":
            part += " = ..."
        out.append(part)
    return match.group(1) + ",".join(out) + match.group(3)


def _stub_dir(tmp_path: Path) -> Path:
    import tensorrt_stubs  # noqa: F401 - the package that installed the .pyi files

    site = Path(importlib.util.find_spec("tensorrt_stubs").origin).parents[1]
    out = tmp_path / "stubs"
    for package in ("tensorrt", "tensorrt_bindings"):
        for stub in (site / package).glob("*.pyi"):
            target = out / package / stub.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("\n".join(_fix_def(line) for line in stub.read_text().splitlines()) + "\n")
    return out


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None or importlib.util.find_spec("tensorrt_stubs") is None,
                    reason="needs mypy and tensorrt-stubs (pip install mypy; pip install --no-deps tensorrt-stubs)")
def test_tensorrt_modules_type_check_against_the_stubs(tmp_path):
    stubs = _stub_dir(tmp_path)
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\nignore_missing_imports = True\nfollow_imports = silent\ncheck_untyped_defs = True\n"
                      "[mypy-tensorrt,tensorrt.*,tensorrt_bindings,tensorrt_bindings.*]\nignore_errors = True\n")
    # a probe proves the stubs are in use: a misspelt builder-config method must be an error
    probe = tmp_path / "probe.py"
    probe.write_text("import tensorrt as trt\n\ntrt.Builder(trt.Logger()).create_builder_config().set_timing_cach()\n")
    modules = [ROOT / "src/samout_edge" / m for m in ("tensorrt/build.py", "tensorrt/plugin.py", "runtime/tensorrt_runner.py",
                                                      "tensorrt/driver.py", "tensorrt/versions.py")]
    env = {**os.environ, "MYPYPATH": str(stubs)}
    proc = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(config), "--cache-dir", str(tmp_path / "cache"),
                           "--no-error-summary", *map(str, modules), str(probe)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    errors = [line for line in proc.stdout.splitlines() if ": error:" in line]
    assert [e for e in errors if "probe.py" not in e] == [], proc.stdout[-4000:] + proc.stderr[-2000:]
    assert any("probe.py" in e and "set_timing_cach" in e for e in errors), proc.stdout[-2000:]


def test_gpu_check_script_parses():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash here")
    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run([bash, "-n", str(script)], capture_output=True).returncode == 0
    spec = importlib.util.spec_from_file_location("gpu_seed", ROOT / "benchmarks" / "gpu_seed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # importable without a GPU
    assert callable(module.main)
