"""The Markdown report, rewritten whole (atomically) after every section, so a cut-off run leaves what it finished.
Stdlib only."""

from __future__ import annotations

import contextlib
import time
import traceback
from pathlib import Path

MIB, GIB = 2**20, 2**30


class Report:
    def __init__(self, path: Path, title: str):
        self.path = path
        self.lines = [f"# {title}", ""]
        self.failures: list[str] = []
        self.skipped: list[str] = []

    def add(self, text: str = "") -> None:
        self.lines.append(text)

    def table(self, header: list[str], rows: list[list]) -> None:
        self.add("| " + " | ".join(header) + " |")
        self.add("|" + "---|" * len(header))
        for row in rows:
            self.add("| " + " | ".join(str(x) for x in row) + " |")
        self.add()

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.add(f"- {'PASS' if ok else 'FAIL'}: {name}" + (f" — {detail}" if detail else ""))
        if not ok:
            self.failures.append(name)
        return ok

    def skip(self, what: str, why: str) -> None:
        """An item that did not run, or did not finish, and why: a line here and a name in the verdict."""
        self.add(f"- skipped: {what} — {why}")
        self.skipped.append(what)

    def log_tail(self, tail: str) -> None:
        if tail.strip():
            self.add("```\n" + tail.rstrip() + "\n```")

    @contextlib.contextmanager
    def section(self, title: str):
        self.add(f"## {title}")
        self.add()
        began = time.monotonic()
        print(f">>> {title}", flush=True)
        try:
            yield
        except Exception:
            self.failures.append(title)
            self.add("- FAIL: the section raised:")
            self.log_tail(traceback.format_exc()[-4000:])
        self.add()
        self.add(f"_{title}: {time.monotonic() - began:.0f} s_")
        self.add()
        self.write()

    def verdict(self) -> str:
        if self.failures:
            text = f"FAILED: {', '.join(self.failures)}"
        else:
            text = "all checks passed" if not self.skipped else "all checks that ran passed"
        if self.skipped:
            text += f"; {len(self.skipped)} item(s) skipped: {', '.join(self.skipped)}"
        return text

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text("\n".join(self.lines) + "\n")
        tmp.replace(self.path)


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmt_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / MIB:.1f} MiB"
