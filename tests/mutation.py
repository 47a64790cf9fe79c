"""``make mutate``: mutation testing of displback/protocol and displback/backend with mutmut.

Each group pairs modules with the test files that exercise them fast; mutmut runs a group's
test files once under coverage of every function, then each mutant against only the tests
that called its function (mutmut's own selection, within the group's files). Each group runs
in its own copy of the tree (``build/mutate/<group>``: mutmut reads ``[tool.mutmut]`` from the
``pyproject.toml`` of the directory it runs in), so the groups can have different test files.
At the end: every survivor (name and diff, also in ``survivors.txt`` of the group's
directory) and a score per group, killed / (mutants run).

    python -m tests.mutation                      # every group (hours: see docs/testing.md)
    python -m tests.mutation protocol backend-units
    python -m tests.mutation backend-units --modules displback/backend/quotas.py
    python -m tests.mutation --list
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Group:
    """Modules mutated together and the test files that judge their mutants."""

    name: str
    modules: tuple[str, ...]  # mutmut ``only_mutate`` globs
    tests: tuple[str, ...]  # pytest paths


_BACKEND = "displback/backend/"
GROUPS: tuple[Group, ...] = (
    Group("protocol", ("displback/protocol/*",), ("tests/protocol",)),
    # The store, the accounts and the release lists: unit tests on the simulated hypervisor.
    Group(
        "backend-units",
        tuple(
            _BACKEND + m
            for m in (
                "buffers.py", "copies.py", "deferred.py", "errors.py", "guestmem.py",
                "input.py", "outputs.py", "quotas.py", "retained.py", "throttle.py",
            )
        ),
        tuple(
            "tests/backend/" + t
            for t in (
                "test_buffers.py", "test_deferred.py", "test_guestmem.py", "test_outputs.py",
                "test_quotas.py", "test_limit_overrides.py", "test_throttled_logs.py",
                "test_input_router.py",
            )
        ),
    ),
    # The glue: only end-to-end tests on the simulated machine reach it (slow per mutant).
    Group(
        "backend-daemon",
        tuple(
            _BACKEND + m
            for m in ("connector.py", "device.py", "daemon.py", "xenbusdev.py", "vkbd.py")
        ),
        ("tests/backend",),
    ),
)

_SURVIVORS = """
import json, sys
from mutmut.__main__ import SourceFileMutationData, get_diff_for_mutant, status_by_exit_code
from mutmut.utils.file_utils import walk_mutatable_files
for path in walk_mutatable_files():
    data = SourceFileMutationData(path=path)
    data.load()
    for name, code in sorted(data.exit_code_by_key.items()):
        status = status_by_exit_code[code]
        if status not in ("killed", "timeout", "skipped"):
            print(json.dumps([name, status, get_diff_for_mutant(name, path=path)]))
"""


def _config(group: Group) -> str:
    def toml_list(items: tuple[str, ...] | list[str]) -> str:
        return "[" + ", ".join(json.dumps(i) for i in items) + "]"

    return (
        "\n[tool.mutmut]\n"
        'source_paths = ["displback"]\n'
        f"only_mutate = {toml_list(group.modules)}\n"
        f'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-x"]\n'
        f"pytest_add_cli_args_test_selection = {toml_list(group.tests)}\n"
    )


def prepare(group: Group, workdir: Path) -> Path:
    """A fresh copy of the package, the tests and pyproject.toml with the group's config."""
    work = workdir / group.name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "displback", work / "displback", ignore=ignore)
    shutil.copytree(ROOT / "tests", work / "tests", ignore=ignore)
    project = (ROOT / "pyproject.toml").read_text()
    if "[tool.mutmut]" in project:
        raise SystemExit("pyproject.toml must not hold [tool.mutmut]: tests/mutation.py writes it")
    (work / "pyproject.toml").write_text(project + _config(group))
    return work


def run(group: Group, workdir: Path, max_children: int) -> dict[str, int]:
    """Run mutmut over ``group``; print its survivors; return mutmut's counts."""
    work = prepare(group, workdir)
    log = work / "mutmut.log"
    print(f"== {group.name}: {', '.join(group.modules)} against {', '.join(group.tests)}")
    print(f"   (progress in {log})", flush=True)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    mutmut = [sys.executable, "-m", "mutmut"]
    with log.open("w") as out:
        subprocess.run(
            [*mutmut, "run", "--max-children", str(max_children)],
            cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, check=True,
        )
    subprocess.run([*mutmut, "export-cicd-stats"], cwd=work, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    stats: dict[str, int] = json.loads((work / "mutants" / "mutmut-cicd-stats.json").read_text())
    listed = subprocess.run(
        [sys.executable, "-c", _SURVIVORS], cwd=work, env=env, check=True,
        capture_output=True, text=True,
    ).stdout
    report = []
    for line in listed.splitlines():
        name, status, diff = json.loads(line)
        report.append(f"# {name}: {status}\n{diff.rstrip()}\n")
    (work / "survivors.txt").write_text("\n".join(report))
    print("\n".join(report))
    return stats


def score(stats: dict[str, int]) -> tuple[int, int, float]:
    """(killed, mutants run, percent): a timeout counts as killed (the tests noticed)."""
    killed = stats["killed"] + stats["timeout"]
    ran = stats["total"] - stats["skipped"]
    return killed, ran, 100.0 * killed / ran if ran else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("groups", nargs="*", metavar="GROUP",
                        help="groups to run (default: all; see --list)")
    parser.add_argument("--list", action="store_true", help="list the groups and exit")
    parser.add_argument("--modules", nargs="+", metavar="GLOB",
                        help="mutate only these modules (globs) of the chosen groups")
    parser.add_argument("--workdir", type=Path, default=ROOT / "build" / "mutate")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)
    by_name = {g.name: g for g in GROUPS}
    if args.list:
        for g in GROUPS:
            print(f"{g.name}: {' '.join(g.modules)}\n    tests: {' '.join(g.tests)}")
        return 0
    unknown = [n for n in args.groups if n not in by_name]
    if unknown:
        parser.error(f"unknown group(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    chosen = [by_name[n] for n in args.groups] or list(GROUPS)
    if args.modules:
        chosen = [Group(g.name, tuple(args.modules), g.tests) for g in chosen]
    results = {g.name: run(g, args.workdir, args.max_children) for g in chosen}
    print("== mutation score (killed / mutants run; survivors above)")
    for name, stats in results.items():
        killed, ran, percent = score(stats)
        print(f"{name:16} {killed:5} / {ran:5}  {percent:5.1f}%  "
              f"survived {stats['survived']}, no tests {stats['no_tests']}, "
              f"timeout {stats['timeout']}, suspicious {stats['suspicious']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
