"""Run a multi-process script in its own session and always clean up after it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent

#: Environment variables of an enclosing distributed job that must not leak into the run.
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK",
             "GROUP_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "PL_GLOBAL_SEED",
             "SLURM_JOB_ID", "SLURM_NTASKS")

requires_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available())
    or sys.platform == "win32",
    reason="needs torch.distributed with the gloo backend (Linux/macOS)",
)


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    env.update(extra or {})
    return env


def run_procs(cmds: Sequence[Sequence[str]], cwd: Path, timeout: float,
              envs: Sequence[Mapping[str, str]] | None = None) -> list[str]:
    """Start every command in a new session; wait for all; on timeout kill every process
    group (including children such as Lightning's rank-1 process) and fail.

    Returns the combined stdout/stderr of each command.
    """
    procs = []
    logs = []
    try:
        for i, cmd in enumerate(cmds):
            log = (cwd / f"proc{i}.log").open("w")
            logs.append(log)
            env = clean_env(envs[i] if envs else None)
            procs.append(subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        for p in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"distributed run did not finish in {timeout} s (hang?): "
                    + "\n".join(_tail(cwd / f"proc{i}.log") for i in range(len(procs))))
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            else:  # the leader exited: still reap anything it left in its group
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
        for log in logs:
            log.close()
    outputs = [(cwd / f"proc{i}.log").read_text() for i in range(len(procs))]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, f"exit code {p.returncode}:\n{out[-6000:]}"
    return outputs


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text()[-n:] if path.exists() else ""
