"""Nox sessions for synapo-ext: `pip install nox && nox` runs lint, core, fast, verl and trl.

Each host gets its own environment because verl 0.9.1 (transformers <5.11) and TRL 1.16 cannot share one.
torch is installed first in every environment and then pinned with a constraint, so no later install can
swap it for a multi-GB CUDA build. Arguments after `--` go to pytest: `nox -s verl -- -k gae -x`.

Environment variables:
    SYNAPO_TORCH: pip requirement(s) for torch, installed first (default "torch==2.13.0", the CPU wheel that
        pip finds in /opt/wheels on the project's machines).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import nox
from nox.command import CommandFailed

nox.options.sessions = ["lint", "core", "fast", "verl", "trl"]
nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = True

TORCH = os.environ.get("SYNAPO_TORCH", "torch==2.13.0")
WHEELS = "/opt/wheels"  # local CPU torch wheel on the project's machines; skipped where it does not exist
RUFF = "ruff==0.17.6"  # pinned: a new ruff release must not turn CI red on its own
PIP = "pip>=25.1"
HOSTS = ("verl", "trl", "transformers")  # the core env must hold none of these
VERSIONS = """import importlib.metadata as m

names = ("pip", "torch", "verl", "transformers", "trl", "numba", "synapo-ext")
found = {d.metadata["Name"].lower(): d.version for d in m.distributions()}
print("versions:", ", ".join(f"{n} {found.get(n, '-')}" for n in names))
"""


def _find_links() -> list[str]:
    return ["--find-links", WHEELS] if os.path.isdir(WHEELS) else []


def _install(session: nox.Session, extras: str) -> None:
    """A current pip, torch, then `-e .[extras]` under a constraint that keeps exactly that torch."""
    # The pip bundled with the venv (23.x) backtracks for over 10 minutes on verl's tree (pyvers pins
    # packaging<26 late); pip >= 25.1 (resolvelib backjumping) resolves it in about a minute.
    session.install("--upgrade", PIP)
    session.install(*_find_links(), *shlex.split(TORCH))
    version = session.run(
        "python", "-c", "import importlib.metadata as m; print(m.version('torch'))", silent=True
    ).strip()
    tmp = Path(session.create_tmp())
    (tmp / "torch-constraint.txt").write_text(f"torch=={version}\n")
    session.install(*_find_links(), "-c", str(tmp / "torch-constraint.txt"), "-e", f".[{extras}]")
    (tmp / "versions.py").write_text(VERSIONS)
    session.run("python", str(tmp / "versions.py"))


def _pytest(
    session: nox.Session, *args: str, host: str = "", allow_empty: bool = False, env: dict | None = None
) -> None:
    """Run pytest on `args`. Exit code 5 (no test collected) fails unless `allow_empty`.

    `host` sets SYNAPO_REQUIRE_HOST, which tests/conftest.py turns into "this host must import; a skip
    because of it is a failure", so a host session cannot go green on tests that never ran.
    """
    session.run(
        "pytest",
        *args,
        *session.posargs,
        env={"SYNAPO_REQUIRE_HOST": host, **(env or {})},
        success_codes=[0, 5] if allow_empty else [0],
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole repository."""
    session.install(RUFF)
    failed = []
    for cmd in (["ruff", "check", "."], ["ruff", "format", "--check", "."]):
        try:
            session.run(*cmd)
        except CommandFailed:  # run both, so one CI log shows every problem
            failed.append(" ".join(cmd))
    if failed:
        session.error(f"failed: {'; '.join(failed)}")


@nox.session
def core(session: nox.Session) -> None:
    """tests/core on the pure-torch path (`SYNAPO_EXT_BACKEND=torch`: the fallback and the GPU path), in an
    environment with no host library: the proof that `synapo_ext.core` needs none."""
    _install(session, "dev")
    session.run(
        "python",
        "-c",
        "import importlib.util, sys\n"
        f"found = [h for h in {HOSTS!r} if importlib.util.find_spec(h) is not None]\n"
        "sys.exit(f'core env must not hold {found}' if found else 0)",
    )
    session.run(
        "python",
        "-c",
        "import sys, synapo_ext.core\n"
        f"loaded = [h for h in {HOSTS!r} if h in sys.modules]\n"
        "sys.exit(f'importing synapo_ext.core loaded {loaded}' if loaded else 0)",
    )
    _pytest(session, "tests/core", env={"SYNAPO_EXT_BACKEND": "torch"})


@nox.session
def fast(session: nox.Session) -> None:
    """tests/core on the default path (`auto`: numba's fused kernels, a default dependency); numba must import."""
    _install(session, "dev")
    _pytest(session, "tests/core", host="numba")


@nox.session
def verl(session: nox.Session) -> None:
    """tests/verl against verl 0.9.1 (transformers <5.11); verl must import, no silent skips."""
    _install(session, "verl,dev")
    _pytest(session, "tests/verl", host="verl")
    session.run("python", "examples/verl_synapo_cpu_check.py")  # the CPU part of examples/verl_synapo.sh


@nox.session
def trl(session: nox.Session) -> None:
    """tests/trl against TRL 1.16 (with peft); TRL and peft must import, no silent skips."""
    _install(session, "trl,dev")
    _pytest(session, "tests/trl", host="trl,peft")


@nox.session
def slow(session: nox.Session) -> None:
    """Opt-in (`nox -s slow`): the tests marked `slow` in tests/core. None selected is not a failure here."""
    _install(session, "dev")
    _pytest(session, "tests/core", "-m", "slow", allow_empty=True)  # the last -m wins over addopts' -m


@nox.session
def verl_slow(session: nox.Session) -> None:
    """Opt-in (`nox -s verl_slow`): the `slow` tests of tests/verl (the other presets' real runs, and the real runs
    over 2 data-parallel ranks, with token-based micro-batches)."""
    _install(session, "verl,dev")
    _pytest(session, "tests/verl", "-m", "slow", host="verl")


@nox.session
def bench(session: nox.Session) -> None:
    """Opt-in: benchmarks/bench_advantages.py in the verl env (`nox -s bench -- --quick`)."""
    _install(session, "verl,fast,dev")
    session.run("python", "benchmarks/bench_advantages.py", *session.posargs)
