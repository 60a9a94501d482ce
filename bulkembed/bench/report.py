"""The bench's report: what was measured on which model and device, as a table (or JSON)."""

from __future__ import annotations

import os
from pathlib import Path

from bulkembed.bench.inprocess import VARIANTS
from bulkembed.worker.engine import Engine

MIB = 1 << 20


def describe(engine: Engine, model: Path, quant: str | None) -> dict:
    import ctypes

    import llama_cpp

    buf = ctypes.create_string_buffer(128)
    llama_cpp.llama_model_desc(engine.model, buf, len(buf))
    flags = llama_cpp.llama_print_system_info().decode()
    summary = " ".join(part.split("=")[0].strip() for part in flags.split("|") if part.strip().endswith("= 1"))
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    return {
        "model": {"file": model.name, "mib": model.stat().st_size / MIB, "desc": buf.value.decode(), "quant": quant,
                  "n_layer": llama_cpp.llama_model_n_layer(engine.model), "n_embd": engine.n_embd,
                  "n_head": llama_cpp.llama_model_n_head(engine.model),
                  "n_head_kv": llama_cpp.llama_model_n_head_kv(engine.model),
                  "n_vocab": engine.vocab.n_tokens, "n_ctx_train": engine.n_ctx_train},
        "device": {"gpu_offload": gpu, "summary": ("GPU offload; " if gpu else "CPU only; ") + summary,
                   "system_info": flags.strip(), "cpus": os.cpu_count()},
        "lm_head": engine.lm_head_state,
    }


def format_report(report: dict) -> str:
    m, c = report["model"], report["corpus"]
    lines = [
        f"model   {m['file']} ({m['desc']}, quant {m['quant'] or '?'}, {m['mib']:.1f} MiB): {m['n_layer']} layers, "
        f"{m['n_embd']} wide, {m['n_head']}/{m['n_head_kv']} heads, vocab {m['n_vocab']}",
        f"corpus  {c['source']}: {c['docs']} docs, {c['tokens']} tokens, length min/median/max "
        f"{c['min']}/{c['median']:.0f}/{c['max']}",
        f"run     threads {report['threads']}, ubatch cap {report['ubatch']}, flash-attn {report['flash_attn']}, "
        f"shard tokens {report['shard_tokens']}, decodes padded to {report.get('min_decode', '?')}"
        f"{', one document a decode' if report.get('isolate') else ''}, best of {report['repeat']}",
        f"device  {report['device']['summary']}",
        f"LM head {report.get('lm_head', '?')} (the bulkembed row's engine)",
        f"memory  {report['rss_note']}; peak RSS includes the resident model", "",
    ]
    header = ("mode", "docs", "tokens", "seconds", "tok/s", "docs/s", "peak RSS MiB", "peak VRAM MiB", "ratio to raw",
              "CPU s/wall s")
    rows = [header] + [(r["mode"], str(r["docs"]), str(r["tokens"]), f"{r['seconds']:.2f}", f"{r['tok_per_s']:.0f}",
                        f"{r['docs_per_s']:.1f}", _num(r["peak_rss_mib"]), _num(r["peak_vram_mib"]),
                        _num(r["ratio_to_raw"], "{:.3f}"), f"{r['cpu_per_wall']:.2f}") for r in report["modes"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True)))
              for row in rows]
    lines += [f"  {r['mode']}: {r['note']}" for r in report["modes"] if r["note"]]
    lines += [f"  {note}" for note in report.get("notes", [])]
    if (ratio := report["ratio_bulkembed_raw"]) is not None:
        verdict = "meets" if ratio >= 0.95 else "BELOW"
        lines += ["", f"==> bulkembed / raw = {ratio:.3f} ({verdict} the >= 0.95 target)"]
    rate = {r["mode"]: r["tok_per_s"] for r in report["modes"]}
    best = max((m for m in rate if m.startswith("bulkembed") and m not in VARIANTS), key=rate.get, default=None)
    if "bulkembed-head" in rate and "bulkembed" in rate:
        lines.append(f"==> bulkembed without / with the LM head = {rate['bulkembed'] / rate['bulkembed-head']:.2f} "
                     f"(the head's share of the time: {1 - rate['bulkembed-head'] / rate['bulkembed']:.0%})")
    if "bulkembed-isolated" in rate and "bulkembed" in rate:
        lines.append(f"==> bulkembed isolated / packed = {rate['bulkembed-isolated'] / rate['bulkembed']:.2f} "
                     f"(what one document a decode costs)")
    for peer in ("llama-embedding", "llama-embed", "transformers"):
        if best and peer in rate:
            lines.append(f"==> {best} / {peer} = {rate[best] / rate[peer]:.2f}")
    if report.get("sweep"):
        memory = "peak_vram_mib" if report["device"]["gpu_offload"] else "peak_rss_mib"
        lines += ["", "Tokens per second", *_grid(report["sweep"], "tok_per_s"),
                  "", f"Peak {'VRAM' if memory == 'peak_vram_mib' else 'RSS'} (MiB)", *_grid(report["sweep"], memory)]
    return "\n".join(lines)


def _num(value: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def _grid(cells: list[dict], key: str) -> list[str]:
    """The blog's layout: rows ubatch_size, at most four ctx_size columns per table, all-N/A rows left out."""
    ubs, ctxs = sorted({c["ub"] for c in cells}), sorted({c["ctx"] for c in cells})
    at = {(c["ub"], c["ctx"]): c for c in cells}
    lines = []
    for group in (ctxs[i:i + 4] for i in range(0, len(ctxs), 4)):
        table = [["ubatch_size", *(f"ctx_size={x}" for x in group)]]
        for ub in ubs:
            row = [at[ub, x] for x in group]
            if any(c["status"] == "ok" for c in row):
                table.append([str(ub), *("N/A" if c["status"] != "ok" else _num(c[key]) for c in row)])
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        table.insert(1, ["-" * w for w in widths])
        lines += [" | ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in table] + [""]
    return lines[:-1]



