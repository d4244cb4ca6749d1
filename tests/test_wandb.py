"""W&B: credentials are asked of wandb itself, an online run never hangs, and a normal run prints no noise.

Each case runs in a fresh process of its own (wandb keeps session state, credentials and the current run, per
process); the key-in-the-environment case shares the online run's process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tiny_config import tiny_config, write_config

ROOT = Path(__file__).resolve().parents[1]
FAKE_KEY = "0123456789abcdef" * 2 + "01234567"  # 40 characters, like a real key
# Printed by a run in the past and meaning nothing to the user; none may come back.
SILENCED = (
    "in eval mode",  # Lightning, about the frozen teacher
    "anonymous setting has no effect",  # W&B, about an argument Lightning always passes
    "LeafSpec",  # torch deprecation raised by Lightning's code
    "Tip: For seamless cloud logging",  # Lightning's advertisement
)


def _env(home: Path, **env: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return clean | {"HOME": str(home), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"} | env


def start(code: str, home: Path, stderr: Path, **env: str) -> subprocess.Popen:
    with stderr.open("w") as err:
        return subprocess.Popen(
            [sys.executable, "-c", code], env=_env(home, **env), stdout=subprocess.PIPE, stderr=err, text=True
        )


def python(code: str, home: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env=_env(home, **env), capture_output=True, text=True, timeout=300
    )


# The check's answer, then the processes it left running as this process's children (wandb-core would be
# one: wandb starts it as a child and waits for it at exit).
CHECK = """
import os
from dynvit.run.loggers import has_wandb_credentials

def children(pid):
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except (OSError, ValueError):
            continue
        if stat.rsplit(")", 1)[1].split()[1] == str(pid):
            found.append(stat.split(" ", 2)[1])
    return found

print("credentials:", has_wandb_credentials(), flush=True)
print("children:", children(os.getpid()), flush=True)
"""
TIMEOUT_S = 600  # imports under load take minutes; a hung exit lasted until the process was killed


def checked(out: str) -> list[str]:
    """The check's answers in a process's output: whether there are credentials, and the children left."""
    return [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith(("credentials: ", "children: "))]


def answer(process: subprocess.Popen, stderr: Path) -> list[str]:
    """The check's answers, once the process has ended; fails if it is still running after ``TIMEOUT_S``."""
    try:
        out, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"the credentials check was still running after {TIMEOUT_S} s: {stderr.read_text()[-2000:]}")
    assert process.returncode == 0, stderr.read_text()[-3000:]
    return checked(out)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="lists child processes through /proc")
def test_credentials_come_from_wandb_itself_and_the_check_exits(tmp_path):
    homes = {name: tmp_path / name for name in ("bare", "login")}
    for home in homes.values():
        home.mkdir()
    # Fresh processes (wandb caches credentials per process), started together: each spends most of its
    # time importing torch and Lightning. A key in WANDB_API_KEY is checked by the online run's process below.
    bare = start(CHECK, homes["bare"], tmp_path / "bare.err")
    # What `wandb login` stores, wherever and under whatever host name the installed wandb writes it
    # (silently: a login that prints starts wandb-core, see has_wandb_credentials).
    login = python(f"import wandb; wandb.login(key={FAKE_KEY!r}, verify=False)", homes["login"], WANDB_SILENT="true")
    assert login.returncode == 0, login.stderr
    logged_in = start(CHECK, homes["login"], tmp_path / "login.err")
    results = [answer(p, tmp_path / f"{name}.err") for p, name in ((bare, "bare"), (logged_in, "login"))]
    assert [has_credentials for has_credentials, _ in results] == ["False", "True"]
    # No wandb-core: the check asks nothing of the server, so there is no service to wait for at exit.
    assert [children for _, children in results] == ["[]", "[]"]


def test_online_without_network_falls_back_to_offline_and_prints_no_noise(tmp_path):
    config = tiny_config(tmp_path / "run")
    config["throughput"]["enabled"] = False
    config["wandb"] = {"online": True, "init_timeout": 3}
    path = write_config(tmp_path / "config.yaml", config)
    home = tmp_path / "home"
    home.mkdir()
    start = time.perf_counter()
    # The same process first answers the credentials check for a key in WANDB_API_KEY (one import fewer).
    done = python(
        CHECK + f"from dynvit.run.cli import main; main(['fit', '--config={path}'])",
        home,
        WANDB_API_KEY=FAKE_KEY,
        WANDB_BASE_URL="http://127.0.0.1:9",  # nothing listens there: no network
    )
    elapsed = time.perf_counter() - start
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    # The key counts as credentials, and the check itself starts no wandb-core.
    assert checked(done.stdout) == ["True", "[]"]
    assert "W&B could not start an online run" in output and "logging offline" in output
    offline = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and any(offline[0].rglob("*.wandb"))
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert elapsed < 120  # the 3 s init timeout, not wandb's 90 s and its retries
    for noise in SILENCED:
        assert noise not in output, noise
