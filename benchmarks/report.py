"""Plain-text tables for the benchmark scripts (run as `python benchmarks/NAME.py`)."""

from __future__ import annotations


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format)."""
    cells = [[header for _, header, _ in columns]]
    cells += [[format(row[key], fmt) if fmt else str(row[key]) for key, _, fmt in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cpu_line(cpu: dict, load_before, load_after) -> str:
    """The CPU a benchmark ran on (asirra.cpu.describe_cpu) and the machine's load around it: beside every figure."""
    flags = ", ".join(cpu["flags"]) if cpu["flags"] is not None else "flags unknown"
    kernels = cpu["int8_kernels"]
    return (f"CPU {cpu['model']} ({cpu['cores']} cores; {flags}); int8 kernels {kernels['path']} "
            f"({kernels['reason']}); load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
