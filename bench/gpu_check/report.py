"""The report: gpu_check.json (everything) and gpu_check.md (the same, to read)."""

from __future__ import annotations

import json
import os
from pathlib import Path

REPORT_JSON, REPORT_MD = "gpu_check.json", "gpu_check.md"


def write_report(report: dict, out: Path) -> None:
    for name, text in ((REPORT_JSON, json.dumps(report, indent=1, default=str)), (REPORT_MD, markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, out / name)


def _num(x, fmt: str = ".3g") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def _pct(x) -> str:
    return f"{x:.1%}" if isinstance(x, float) else "n/a"


def markdown(r: dict) -> str:
    env = r["environment"]
    lines = [f"# forcelab GPU check{' (SMOKE)' if r['smoke'] else ''}", "", f"**{r['label']}**", "",
             f"- date (UTC): {r['date']}; budget {r['budget_s']:.0f} s; elapsed {r.get('elapsed_s', 'running')} s",
             f"- device: {env['device']}; driver {env.get('driver')}; CUDA {env.get('cuda')}; "
             f"torch {env['torch']}; triton {env['triton']}; Python {env['python']}",
             f"- peak used for % of peak and MFU: {env.get('peak_bf16_tflops')} TFLOP/s ({env.get('peak_basis')})"]
    if env.get("capability"):
        lines.append(f"- compute capability {env['capability']}, {env['multiprocessors']} SMs, "
                     f"{env['memory_gib']} GiB")
    for name, part in r["parts"].items():
        lines += ["", f"## {name}: {part['status']}", ""]
        if "seconds" in part:
            lines.append(f"{part['seconds']} s of a {part['budget_s']:.0f} s budget.")
        lines += RENDER.get(name, _plain)(part)
    return "\n".join(lines)


def _tests(p: dict) -> list[str]:
    out = [f"- files: {', '.join(p.get('files', []))}", f"- counts: {p.get('counts')}",
           f"- pytest: {p.get('summary', '')} (exit {p.get('returncode')}; full log {p.get('log')})"]
    return out + [f"- {line}" for line in p.get("failed", [])]


def _attention(p: dict) -> list[str]:
    out = [f"tokens per frame {p.get('tokens_per_frame')}; FLOPs: {p.get('flop_formula')}; "
           f"% of peak against {p.get('peak_tflops')} TFLOP/s", ""]
    for shape, s in p.get("shapes", {}).items():
        if "methods" not in s:
            out += [f"### {shape}: {s.get('status')}", ""]
            continue
        out += [f"### {shape}: {s['queries']} queries x {s['keys']} keys, {s['visible_fraction']:.0%} visible, "
                f"B={s['batch']} H={s['heads']} D={s['head_dim']} {s['dtype']}", "",
                f"error: ||x - ref|| / ||ref|| against float32 masked SDPA, tolerance {s['tolerance']:g}", "",
                "| method | fwd ms | fwd TFLOP/s | fwd % peak | bwd ms | bwd TFLOP/s | bwd % peak | "
                "err out | err grads | correct |", "|---|---|---|---|---|---|---|---|---|---|"]
        for method, m in s["methods"].items():
            if m["status"] != "ok":
                out.append(f"| {method} | {m['status']} | | | | | | | | |")
                continue
            out.append(f"| {method} | {m['forward_ms']:.3f} | {m['forward_tflops']:.3g} | "
                       f"{_pct(m.get('forward_peak_fraction'))} | {m['backward_ms']:.3f} | "
                       f"{m['backward_tflops']:.3g} | {_pct(m.get('backward_peak_fraction'))} | "
                       f"{_num(m.get('output_rel_error', '-'), '.1e')} | {_num(m.get('grad_rel_error', '-'), '.1e')} | "
                       f"{m['correct']} |")
        out.append("")
    return out


def _streaming(p: dict) -> list[str]:
    if "dit_fps" not in p:
        return _plain(p)
    vae = p["vae"]
    vae_text = f"{vae['fps']:.2f} FPS ({vae['seconds']:.3f} s)" if isinstance(vae, dict) else vae
    return [f"- shape: {p['layers']} layers, dim {p['dim']}, {p['height']}x{p['width']} -> latents "
            f"{p['latent'][0]}x{p['latent'][1]}, {p['latent_frames']} latent = {p['video_frames']} video frames, "
            f"chunk {p['chunk_frames']}, {p['steps']} steps, {p['dtype']}, {p['weights']} weights",
            f"- DiT alone: {p['dit_fps']:.2f} FPS ({p['dit_seconds']:.3f} s)",
            f"- DiT + VAE decode: {vae_text}"]


def _training(p: dict) -> list[str]:
    if "step_seconds" not in p:
        return _plain(p)
    out = [f"- shape: {p['layers']} layers, dim {p['dim']}, {p['height']}x{p['width']}, {p['latent_frames']} "
           f"latent frames, chunk {p['chunk_frames']}, {p['mixed_precision']} autocast, gradient checkpointing "
           f"{p['gradient_checkpointing']}; roles updated: {p['roles_updated']}",
           f"- step: {p['step_seconds']:.3f} s (all: {[round(s, 3) for s in p['step_seconds_all']]})",
           f"- model FLOPs per step: {p['model_flop_per_step'] / 1e12:.3g} TFLOP -> {p['model_tflops']:.3g} TFLOP/s; "
           f"MFU {_pct(p.get('mfu'))} of {p.get('peak_tflops', 'n/a')} TFLOP/s",
           f"- FLOP formula: {p['flop_formula']}"]
    if "peak_memory_gib" in p:
        out.append(f"- peak memory (torch.cuda.max_memory_allocated): {p['peak_memory_gib']:.2f} GiB")
    return out


def _plain(p: dict) -> list[str]:
    return [f"- {k}: {v}" for k, v in p.items() if k not in ("status", "seconds", "budget_s")]


RENDER = {"tests": _tests, "attention": _attention, "streaming": _streaming, "training": _training}
