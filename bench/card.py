"""The GPU a benchmark runs on: its name, driver and versions, and the dense bf16 peak that
throughput is reported against.

The peak is the vendor datasheet's dense (no 2:4 sparsity) bf16 tensor-core rate of the
card, found by its name; it is a datasheet figure, not a measurement, and every report says
which figure it used. A card not in the table gets FALLBACK_PEAK and says so.
"""

from __future__ import annotations

import platform
import shutil
import subprocess

import torch

# (name fragment, dense bf16 TFLOP/s, what the figure is), most specific first: the SXM parts
# are named plainly ("NVIDIA H100 80GB HBM3", "NVIDIA H200"), the others say PCIe or NVL.
DENSE_BF16_PEAKS = (
    ("H100 PCIe", 756.0, "H100 PCIe datasheet, dense bf16"),
    ("H100 NVL", 835.0, "H100 NVL datasheet, dense bf16"),
    ("H200 NVL", 835.0, "H200 NVL datasheet, dense bf16"),
    ("H100", 989.0, "H100 SXM datasheet, dense bf16"),
    ("H200", 989.0, "H200 SXM datasheet, dense bf16 (the H100 SXM's compute)"),
    ("H800", 989.0, "H800 SXM datasheet, dense bf16"),
    ("A100", 312.0, "A100 datasheet, dense bf16"),
)
FALLBACK_PEAK = (989.0, "card not in the table: H100 SXM's dense bf16 figure assumed")
NVIDIA_SMI_TIMEOUT_S = 20


def bf16_peak(name: str) -> tuple[float, str]:
    """(dense bf16 TFLOP/s, where the figure comes from) for a card name."""
    for fragment, tflops, basis in DENSE_BF16_PEAKS:
        if fragment.lower() in name.lower():
            return tflops, basis
    return FALLBACK_PEAK


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def nvidia_smi() -> dict:
    """Name, driver, memory and maximum SM clock as nvidia-smi reports them ({} without it)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {}
    fields = ("name", "driver_version", "memory.total", "clocks.max.sm")
    try:
        out = subprocess.run([exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"nvidia-smi: {type(e).__name__}"}
    lines = out.stdout.strip().splitlines()
    if out.returncode or not lines:
        return {"error": f"nvidia-smi exit {out.returncode}"}
    return dict(zip(fields, (v.strip() for v in lines[0].split(","))))


def nvml_driver() -> str | None:
    """The driver version through NVML (the nvidia-ml-py package), where nvidia-smi is missing."""
    try:
        import pynvml
        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        pynvml.nvmlShutdown()
    except Exception:             # no package, no library, no driver: the report says unknown
        return None
    return version.decode() if isinstance(version, bytes) else str(version)


def describe(device: torch.device) -> dict:
    """Everything a report states about where it ran."""
    info = {"device": device_name(device), "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2 ** 30, 1))
        smi = nvidia_smi()
        info["driver"] = smi.get("driver_version") or nvml_driver() or smi.get("error") or "unknown"
        info["nvidia_smi"] = smi or "not found"
        peak, basis = bf16_peak(info["device"])
        info.update(peak_bf16_tflops=peak, peak_basis=basis)
    else:
        info.update(driver="no GPU", peak_bf16_tflops=None, peak_basis="no GPU: no peak, no % of peak")
    return info
