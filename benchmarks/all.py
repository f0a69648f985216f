"""Run every benchmark, then rewrite the benchmark tables in README.md and docs/.

    python -m benchmarks.all [--quick] [--threads 2] [--out DIR] [--only NAME ...] [--no-run]
                             [--readme PATH | --no-readme]

Runs ``python -m benchmarks.<name>`` for each of BENCHMARKS in turn, each in its own process,
passing on ``--quick``, ``--threads`` and ``--out`` when the script accepts them (read from its
``--help``). In quick mode a script without ``--quick`` is skipped rather than run at full size.
A failing benchmark is reported and the others still run; the exit status is 1 if any failed.

Then, unless ``--quick`` or ``--no-readme``, every block of DOCUMENTS (README.md, docs/tour.md,
docs/recipes.md) between ``<!-- benchmarks:<name> -->`` and ``<!-- /benchmarks:<name> -->`` is
replaced by that benchmark's latest table, with the machine, the threads, the versions and the date
above it. A table comes from
``<out>/<name>.json`` (its ``markdown`` and ``meta`` fields, as :mod:`benchmarks.common` writes
them) or, failing that, from ``<out>/<name>.md``. ``--no-run`` only rewrites the documents.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, RESULTS

BENCHMARKS = ("step", "inference", "layers", "memory", "cold_start", "epoch", "parity", "data_epoch",
              "time_to_accuracy")
# Documents whose marked blocks hold benchmark tables.
DOCUMENTS = (REPO / "README.md", REPO / "docs" / "tour.md", REPO / "docs" / "recipes.md")


def accepted_flags(name: str) -> set[str] | None:
    """The long options ``benchmarks.<name>`` accepts, from its --help; None if it does not run."""
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--help"], cwd=REPO,
                            capture_output=True, text=True)
    if result.returncode != 0:
        return None
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", result.stdout))


def command(name: str, flags: set[str], args: argparse.Namespace) -> tuple[list[str] | None, str]:
    """The command line running one benchmark as asked (None: skip it), and a note about it."""
    line = [sys.executable, "-m", f"benchmarks.{name}"]
    notes = []
    if args.quick:
        if "--quick" not in flags:
            return None, "skipped: it has no --quick"
        line.append("--quick")
    if "--threads" in flags:
        line += ["--threads", str(args.threads)]
    else:
        notes.append("no --threads: it uses its own thread settings")
    if "--out" in flags:
        line += ["--out", str(args.out)]
    else:
        notes.append("no --out: it writes to its default place")
    return line, "; ".join(notes)


def run_all(args: argparse.Namespace) -> list[str]:
    """Run the chosen benchmarks one after the other; return the names of those that failed."""
    failed = []
    for name in args.only or BENCHMARKS:
        flags = accepted_flags(name)
        if flags is None:
            print(f"== {name}: skipped: python -m benchmarks.{name} --help fails (not there yet?)",
                  flush=True)
            continue
        line, note = command(name, flags, args)
        if line is None:
            print(f"== {name}: {note}", flush=True)
            continue
        print(f"== {name}: {' '.join(line[1:])}" + (f"  ({note})" if note else ""), flush=True)
        started = time.perf_counter()
        status = subprocess.run(line, cwd=REPO).returncode
        print(f"== {name}: {'done' if status == 0 else f'FAILED (exit {status})'} "
              f"in {time.perf_counter() - started:.0f} s\n", flush=True)
        if status != 0:
            failed.append(name)
    return failed


def section(name: str, out: Path, document: Path) -> str | None:
    """The block of one benchmark in ``document``: who measured what where, then its table (and
    figure, linked relative to the document); None if no results exist."""
    result, table, figure = out / f"{name}.json", out / f"{name}.md", out / f"{name}.png"
    body = None
    if result.is_file():
        content = json.loads(result.read_text())
        if "markdown" in content and "machine_summary" in content.get("meta", {}):
            body = f"{describe_run(content['meta'])}\n\n{content['markdown'].strip()}"
    if body is None and table.is_file():
        lines = table.read_text().strip().splitlines()
        if lines and lines[0].startswith("# "):     # its own title: the document has one already
            lines[0] = f"*{lines[0][2:].strip()}*"
        body = "\n".join(lines)
    if body is not None and figure.is_file() and figure.resolve().is_relative_to(REPO):
        link = Path(os.path.relpath(figure.resolve(), document.resolve().parent)).as_posix()
        body += f"\n\n![{name}]({link})"
    return body


def describe_run(meta: dict) -> str:
    """One line: the machine, the threads each library used, the versions, the date."""
    threads = meta.get("threads", {})
    used = ", ".join(f"{library} {threads[library]}" for library in ("torch", "numba") if library in threads)
    versions = ", ".join(f"{package} {version}" for package, version in meta.get("versions", {}).items())
    return (f"*{meta['machine_summary']}. Threads: {threads.get('requested')} ({used}). "
            f"{versions}. {meta.get('date', '')}{' (--quick)' if meta.get('quick') else ''}.*")


def update_readme(readme: Path, out: Path, names) -> list[str]:
    """Replace each benchmark's marked block in ``readme``; return the names updated."""
    text, updated = readme.read_text(), []
    for name in names:
        body = section(name, out, readme)
        pattern = re.compile(rf"(<!-- benchmarks:{name} -->\n).*?(<!-- /benchmarks:{name} -->)", re.S)
        if body is None or not pattern.search(text):
            continue
        text = pattern.sub(lambda match: f"{match.group(1)}{body}\n{match.group(2)}", text)
        updated.append(name)
    readme.write_text(text)
    return updated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.all", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every benchmark's tiny configuration")
    parser.add_argument("--threads", type=int, default=2, help="passed to every benchmark (default 2)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these benchmarks")
    parser.add_argument("--no-run", action="store_true", help="only rewrite the documents from existing results")
    parser.add_argument("--readme", type=Path, nargs="+", default=list(DOCUMENTS),
                        help="the documents to rewrite (default README.md, docs/tour.md, docs/recipes.md)")
    parser.add_argument("--no-readme", action="store_true", help="leave the documents alone")
    args = parser.parse_args(argv)

    failed = [] if args.no_run else run_all(args)
    # Quick figures are for smoke tests, never for the documents (unless one is named explicitly).
    explicit_readme = args.readme != parser.get_default("readme")
    if not args.no_readme and (not args.quick or explicit_readme):
        for document in args.readme:
            if document.is_file():
                updated = update_readme(document, args.out, args.only or BENCHMARKS)
                print(f"{document}: updated {', '.join(updated) or 'nothing'}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
