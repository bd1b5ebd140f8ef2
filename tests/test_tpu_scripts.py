"""experiments/tpu: syntax, --help, argument errors, and the worker scripts run against fakes.

No test talks to Google Cloud: a fake `gcloud` that fails loudly (and leaves a marker file) is
first on PATH, and the scripts' --dry-run prints the worker scripts, which then run here in a
temporary HOME with a fake `taskpgm`, `curl` and venv.
"""

import os
import re
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

TPU_DIR = Path(__file__).resolve().parents[1] / "experiments" / "tpu"
SCRIPTS = sorted(TPU_DIR.glob("*.sh"))
RUNNABLE = [p for p in SCRIPTS if not p.name.startswith("_")]
ZONE = ("--zone", "us-central2-b")
# Variables the scripts read; cleared so the caller's environment cannot steer a test.
_SCRIPT_VARS = ("TPU_NAME", "ZONE", "PROJECT_ID", "REMOTE_DIR", "VENV_DIR", "RUNS_DIR", "RUN_DIR",
                "LOG_DIR", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "TPU_CAPACITY", "GIT_REF",
                "SRC_TARBALL", "GIT_URL", "PYTHON", "JAX_SPEC", "HF_MODEL", "MODEL_DIR",
                "HF_TOKEN_FILE", "NFS_SHARE", "NFS_MOUNT", "FETCH_DEST", "GPU_VENV", "GPUS",
                "DRY_RUN", "TASKPGM_DISTRIBUTED")


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def sandbox(tmp_path):
    """A HOME, a PATH whose first entry holds the fakes, and the gcloud marker file."""
    home, fakes = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    fakes.mkdir()
    marker = tmp_path / "gcloud-was-called"
    _write_exe(fakes / "gcloud", f'#!/bin/sh\necho "FAKE GCLOUD CALLED: $*" >&2\n'
                                 f'echo "$*" >> "{marker}"\nexit 97\n')
    # The metadata server's worker number, when a test sets FAKE_WORKER; else curl fails and the
    # worker scripts fall back to the hostname.
    _write_exe(fakes / "curl", '#!/bin/sh\n[ -n "$FAKE_WORKER" ] && echo "$FAKE_WORKER" && exit 0\n'
                               "exit 7\n")
    env = {k: v for k, v in os.environ.items() if k not in _SCRIPT_VARS}
    env.update(HOME=str(home), PATH=f"{fakes}:{os.environ['PATH']}")
    return {"tmp": tmp_path, "home": home, "bin": fakes, "marker": marker, "env": env}


def _run(sandbox, script, *args, cwd=None, check_no_gcloud=True, env=None):
    cmd = [str(TPU_DIR / script), *args] if isinstance(script, str) else ["bash", str(script)]
    result = subprocess.run(cmd, check=False, env={**sandbox["env"], **(env or {})},
                            cwd=cwd or sandbox["tmp"],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if check_no_gcloud:
        assert not sandbox["marker"].exists(), result.stderr
    return result


def _worker_script(output: str, label: str) -> str:
    match = re.search(rf"^----- {label} script -----\n(.*?)\n----- end {label} script -----$",
                      output, re.DOTALL | re.MULTILINE)
    assert match, output
    return match.group(1)


def test_the_expected_scripts_are_there():
    assert {p.name for p in RUNNABLE} == {"create.sh", "setup.sh", "run.sh", "fetch.sh",
                                          "delete.sh", "gpu_host.sh"}
    assert (TPU_DIR / "README.md").is_file()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True, capture_output=True, timeout=30)


@pytest.mark.parametrize("script", RUNNABLE, ids=lambda p: p.name)
def test_script_shape(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    header = text.split("\nset -euo pipefail\n")[0]
    assert "# Usage:" in header and f"experiments/tpu/{script.name}" in header
    assert os.access(script, os.X_OK)


@pytest.mark.parametrize("script", RUNNABLE, ids=lambda p: p.name)
def test_help_prints_usage_without_gcloud(sandbox, script):
    result = _run(sandbox, script.name, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout and "Flags:" in result.stdout
    assert "-h, --help" in result.stdout


def test_run_without_config_fails_clearly(sandbox):
    result = _run(sandbox, "run.sh", *ZONE, "--name", "taskpgm-v4")
    assert result.returncode == 2
    assert "missing CONFIG.yaml" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(("script", "args", "message"), [
    ("run.sh", ("cfg.yaml", "oops", *ZONE), "unexpected argument 'oops'"),
    ("run.sh", ("a.b=1", "cfg.yaml", *ZONE), "comes before CONFIG.yaml"),
    ("run.sh", ("cfg.txt", *ZONE), "is not a .yaml file"),
    ("run.sh", ("cfg.yaml", "--zone", "central"), "does not look like a zone"),
    ("run.sh", ("cfg.yaml", *ZONE, "--name", "Bad_Name"), "--name 'Bad_Name'"),
    ("run.sh", ("cfg.yaml", *ZONE, "--run-dir"), "--run-dir needs a value"),
    ("run.sh", ("cfg.yaml", *ZONE, "--env", "1X=2"), "is not KEY=VALUE"),
    ("run.sh", ("cfg.yaml", *ZONE, "--run-dir", "~/taskpgm/runs"), "inside --remote-dir"),
    ("run.sh", ("cfg.yaml", *ZONE, "--frobnicate"), "unknown flag '--frobnicate'"),
    ("run.sh", ("cfg.yaml", *ZONE, "--workers", "0"), "is not a positive number"),
    ("run.sh", ("cfg.yaml", *ZONE, "--shared-wait", "-1"), "is not a number of seconds"),
    ("create.sh", (), "no zone"),
    ("create.sh", (*ZONE, "--accelerator-type", "tpu32"), "is not like v4-32"),
    ("create.sh", (*ZONE, "--accelerator-type", "v9-8"), "no default runtime"),
    ("create.sh", (*ZONE, "--timeout", "soon"), "is not a number"),
    ("create.sh", (*ZONE, "v4-8"), "unknown argument 'v4-8'"),
    ("setup.sh", (*ZONE, "--remote-dir", "~"), "dedicated directory"),
    ("setup.sh", (*ZONE, "--tarball", "missing.tar.gz"), "is not a file"),
    ("setup.sh", (*ZONE, "--model", "not a repo"), "is not a Hugging Face repo id"),
    ("setup.sh", (*ZONE, "--ref", "no-such-ref-anywhere"), "is not a commit"),
    ("fetch.sh", ZONE, "give CONFIG.yaml or --run-dir"),
    ("fetch.sh", ("cfg.yaml", *ZONE, "--worker", "w1"), "is not a worker index"),
    ("fetch.sh", ("a.yaml", "b.yaml", *ZONE), "unexpected argument 'b.yaml'"),
    ("fetch.sh", ("a.yaml", *ZONE, "--exclude", "--dry-run"), "--exclude needs a value"),
    ("delete.sh", ("--name", "x"), "no zone"),
    ("delete.sh", (*ZONE, "--name", "--yes"), "--name needs a value"),
    ("gpu_host.sh", (), "missing CONFIG.yaml"),
    ("gpu_host.sh", ("missing.yaml",), "no config file 'missing.yaml'"),
    ("gpu_host.sh", ("cfg.yaml", "--gpus", "0"), "is not a positive number"),
    ("gpu_host.sh", ("cfg.yaml", *ZONE), "unknown flag '--zone'"),  # no TPU there
])
def test_bad_arguments_fail_before_gcloud(sandbox, script, args, message):
    result = _run(sandbox, script, *args)
    assert result.returncode != 0
    assert message in result.stderr


def test_create_dry_run_command(sandbox):
    result = _run(sandbox, "create.sh", *ZONE, "--name", "taskpgm-v4", "--accelerator-type",
                  "v5litepod-16", "--spot", "--project", "my-project", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert ("+ gcloud compute tpus tpu-vm create taskpgm-v4 --accelerator-type=v5litepod-16 "
            "--version=v2-alpha-tpuv5-lite --spot --zone=us-central2-b --project=my-project"
            in result.stdout)


def test_delete_dry_run_command(sandbox):
    result = _run(sandbox, "delete.sh", *ZONE, "--name", "taskpgm-v4", "--yes", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("+ gcloud compute tpus tpu-vm delete taskpgm-v4 --quiet "
                                     "--zone=us-central2-b")


@pytest.mark.parametrize("script", [p.name for p in RUNNABLE if p.name != "gpu_host.sh"])
def test_tpu_flags_need_a_value(sandbox, script):
    result = _run(sandbox, script, "--project")
    assert result.returncode == 2
    assert result.stderr == (f"{script}: --project needs a value\n"
                             f"Run '{script} --help' for usage.\n")


def test_tpu_target_from_the_environment_and_flags(sandbox):
    env = {"TPU_NAME": "env-tpu", "ZONE": "europe-west4-a", "PROJECT_ID": "env-project"}
    result = _run(sandbox, "delete.sh", "--dry-run", env=env)
    assert result.stdout == ("+ gcloud compute tpus tpu-vm delete env-tpu --zone=europe-west4-a "
                             "--project=env-project\n")
    result = _run(sandbox, "delete.sh", "--name", "flag-tpu", *ZONE, "--dry-run", env=env)
    assert result.stdout == ("+ gcloud compute tpus tpu-vm delete flag-tpu --zone=us-central2-b "
                             "--project=env-project\n")


def test_gcloud_failure_is_reported(sandbox):
    # Past validation the scripts do call gcloud; its failure must stop them, not be ignored.
    result = _run(sandbox, "delete.sh", *ZONE, "--yes", check_no_gcloud=False)
    assert result.returncode == 97
    assert "FAKE GCLOUD CALLED: compute tpus tpu-vm delete taskpgm" in result.stderr


def _fake_venv(home: Path, body: str) -> None:
    (home / "taskpgm").mkdir()
    venv_bin = home / "taskpgm-venv" / "bin"
    venv_bin.mkdir(parents=True)
    _write_exe(venv_bin / "taskpgm", "#!/usr/bin/env bash\n" + body)


def _run_config(sandbox, *extra):
    config = sandbox["tmp"] / "bbh.yaml"
    config.write_text("name: bbh\n")
    result = _run(sandbox, "run.sh", str(config), *ZONE, "--dry-run", *extra)
    assert result.returncode == 0, result.stderr
    return result


def test_run_worker_script_runs_taskpgm_and_keeps_logs(sandbox):
    home = sandbox["home"]
    _fake_venv(home, 'printf "<%s>" "$@"; echo; echo "dist=$TASKPGM_DISTRIBUTED x=$EXTRA"\n'
                     "exit 4\n")
    result = _run_config(sandbox, "model.checkpoint=~/models/Llama 2", "mesh.fsdp=16",
                         "--env", "EXTRA=a b")
    assert "+ gcloud compute tpus tpu-vm describe taskpgm" in result.stdout  # the worker count
    assert "+ gcloud compute tpus tpu-vm scp" in result.stdout
    assert "--worker=all" in result.stdout
    script = sandbox["tmp"] / "worker.sh"
    script.write_text(_worker_script(result.stdout, "run"))
    # What the scp would have done: the config lands in the worker's home.
    shutil.copy(sandbox["tmp"] / "bbh.yaml", home / ".taskpgm-upload-bbh.yaml")

    out = _run(sandbox, script)
    assert out.returncode == 4, out.stderr  # taskpgm's status comes back
    run_dir = home / "taskpgm-runs" / "bbh"
    assert (f"<run><uploaded-configs/bbh.yaml><--run-dir><{run_dir}>"
            f"<model.checkpoint={home}/models/Llama 2><mesh.fsdp=16>") in out.stdout
    assert "dist=auto x=a b" in out.stdout
    assert "exited with status 4" in out.stdout
    assert (home / "taskpgm" / "uploaded-configs" / "bbh.yaml").read_text() == "name: bbh\n"
    (log,) = (run_dir / "logs").glob("worker-*.log")
    assert "dist=auto" in log.read_text() and "===== exit status 4" in log.read_text()
    assert not list((run_dir / "logs").glob("*.pid"))


def test_run_worker_script_detach_status_stop(sandbox):
    home = sandbox["home"]
    _fake_venv(home, "echo started\nsleep 60\n")
    scripts = {}
    for action in ("run", "detach", "status", "stop"):
        flags = () if action == "run" else (f"--{action}",)
        output = _run_config(sandbox, *flags).stdout
        scripts[action] = sandbox["tmp"] / f"{action}.sh"
        scripts[action].write_text(_worker_script(output, action))
    logs = home / "taskpgm-runs" / "bbh" / "logs"
    try:
        shutil.copy(sandbox["tmp"] / "bbh.yaml", home / ".taskpgm-upload-bbh.yaml")
        out = _run(sandbox, scripts["detach"])
        assert out.returncode == 0 and "started (pid" in out.stdout, out.stderr
        assert "running (pid" in _run(sandbox, scripts["status"]).stdout
        shutil.copy(sandbox["tmp"] / "bbh.yaml", home / ".taskpgm-upload-bbh.yaml")
        again = _run(sandbox, scripts["run"])
        assert again.returncode == 3 and "still alive" in again.stderr
        assert "sent SIGTERM" in _run(sandbox, scripts["stop"]).stdout
        for _ in range(100):
            if "not running" in _run(sandbox, scripts["status"]).stdout:
                break
            time.sleep(0.05)
        assert "not running" in _run(sandbox, scripts["status"]).stdout
    finally:  # never leave the fake run behind
        for pidfile in logs.glob("*.pid"):
            try:
                os.killpg(int(pidfile.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


def test_fetch_packs_the_run_without_checkpoints(sandbox):
    result = _run(sandbox, "fetch.sh", "experiments/configs/llama2_7b_bbh.yaml", *ZONE,
                  "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "taskpgm:taskpgm-fetch.tar.gz" in result.stdout and "--worker=0" in result.stdout
    run_dir = sandbox["home"] / "taskpgm-runs" / "llama2_7b_bbh"
    for name in ("report.md", "results.json", "figures/affinity.png", "logs/worker-0.log",
                 "single_task/t1/ckpt/100/state", "checkpoints/5/x"):
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text(name)
    script = sandbox["tmp"] / "pack.sh"
    script.write_text(_worker_script(result.stdout, "pack-run"))
    assert _run(sandbox, script).returncode == 0
    with tarfile.open(sandbox["home"] / "taskpgm-fetch.tar.gz") as tar:
        names = {n.removeprefix("./") for n in tar.getnames()}
    assert {"report.md", "results.json", "figures/affinity.png", "logs/worker-0.log"} <= names
    assert not any("ckpt" in n or "checkpoints" in n for n in names)


def test_fetch_exclude_replaces_the_default_list(sandbox):
    result = _run(sandbox, "fetch.sh", "--run-dir", "/runs/x", *ZONE, "--exclude", "big",
                  "--exclude", "tmp dir", "--dry-run")
    assert result.returncode == 0, result.stderr
    pack = _worker_script(result.stdout, "pack-run")
    assert 'tar -C "$RUN_DIR" -czf ~/taskpgm-fetch.tar.gz --exclude=big --exclude=tmp\\ dir .' \
        in pack


def test_setup_worker_script_installs_and_is_idempotent(sandbox):
    tmp, home = sandbox["tmp"], sandbox["home"]
    # A GitHub-style tarball: one top-level directory holding the project.
    src = tmp / "src" / "taskpgm-main"
    src.mkdir(parents=True)
    (src / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    tarball = tmp / "project.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(src, arcname="taskpgm-main")
    pip_log = tmp / "pip.log"
    fake_python = ("#!/usr/bin/env bash\n"
                   'if [[ $1 == -m && $2 == venv ]]; then mkdir -p "$3/bin"; '
                   f'cp "$0" "$3/bin/python"; printf \'#!/bin/sh\\necho pip "$@" >> {pip_log}\\n\' '
                   '> "$3/bin/pip"; chmod +x "$3/bin/pip"; exit 0; fi\n'
                   f'if [[ $1 == -m && $2 == pip ]]; then echo "$@" >> {pip_log}; exit 0; fi\n'
                   'if [[ $1 == -c ]]; then echo "jax 0.0-fake"; exit 0; fi\n'
                   "exit 1\n")
    _write_exe(sandbox["bin"] / "python3.11", fake_python)
    result = _run(sandbox, "setup.sh", *ZONE, "--tarball", str(tarball), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"scp {tarball} taskpgm:taskpgm-src.tar.gz --worker=all" in result.stdout
    script = tmp / "setup.sh"
    script.write_text(_worker_script(result.stdout, "setup"))

    for attempt in range(2):
        shutil.copy(tarball, home / "taskpgm-src.tar.gz")
        (home / "taskpgm-runs").mkdir(exist_ok=True)
        out = _run(sandbox, script)
        assert out.returncode == 0, out.stdout + out.stderr
        assert (home / "taskpgm" / "pyproject.toml").is_file()
        if attempt == 0:  # a stale file from an old source tree must go; the venv stays
            (home / "taskpgm" / "stale.py").write_text("")
            (home / "taskpgm-venv" / "keep").write_text("")
    assert not (home / "taskpgm" / "stale.py").exists()
    assert (home / "taskpgm-venv" / "keep").exists() and (home / "taskpgm-runs").is_dir()
    installs = pip_log.read_text().splitlines()
    assert installs.count("pip install -q jax[tpu]>=0.10") == 2
    assert installs.count(f"pip install -q -e {home}/taskpgm") == 2


def test_gpu_host_dry_run_and_sbatch(sandbox):
    config = sandbox["tmp"] / "bbh.yaml"
    config.write_text("name: bbh\n")
    result = _run(sandbox, "gpu_host.sh", str(config), "mesh.fsdp=8", "--setup", "--dry-run",
                  "--venv", str(sandbox["tmp"] / "venv"))
    assert result.returncode == 0, result.stderr
    assert "pip install -q jax\\[cuda12\\]\\>=0.10" in result.stdout
    assert f"venv/bin/taskpgm run {config} --run-dir runs/bbh mesh.fsdp=8" in result.stdout
    sbatch = _run(sandbox, "gpu_host.sh", "experiments/configs/llama2_7b_bbh.yaml",
                  "--print-sbatch", "2", "--run-dir", "/shared/runs/bbh", "mesh.data=2",
                  "mesh.fsdp=8").stdout
    assert "#SBATCH --nodes=2" in sbatch and "#SBATCH --ntasks-per-node=1" in sbatch
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in sbatch
    assert re.search(r"^srun --kill-on-bad-exit=1 \S+/taskpgm run "
                     r"experiments/configs/llama2_7b_bbh.yaml --run-dir /shared/runs/bbh "
                     r"mesh.data=2 mesh.fsdp=8$", sbatch, re.MULTILINE)


def _shared_check_scripts(sandbox, *extra):
    _fake_venv(sandbox["home"], 'echo "ran on $(curl)"\n')
    script = sandbox["tmp"] / "worker.sh"
    script.write_text(_worker_script(_run_config(sandbox, "--workers", "2", *extra).stdout, "run"))
    return script


def test_run_refuses_a_run_directory_the_workers_do_not_share(sandbox):
    script = _shared_check_scripts(sandbox, "--shared-wait", "1")
    shutil.copy(sandbox["tmp"] / "bbh.yaml", sandbox["home"] / ".taskpgm-upload-bbh.yaml")
    out = _run(sandbox, script, env={"FAKE_WORKER": "0"})
    assert out.returncode == 2
    assert "is not shared" in out.stderr and "sees 1 of 2 workers" in out.stderr
    assert "ran on" not in out.stdout


def test_run_starts_when_the_workers_share_the_run_directory(sandbox):
    script = _shared_check_scripts(sandbox, "--shared-wait", "20")
    # Two "workers" with one HOME: whichever comes first moves the uploaded config into place.
    shutil.copy(sandbox["tmp"] / "bbh.yaml", sandbox["home"] / ".taskpgm-upload-bbh.yaml")
    procs = [subprocess.Popen(["bash", str(script)], env={**sandbox["env"], "FAKE_WORKER": w},
                              cwd=sandbox["tmp"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, stdin=subprocess.DEVNULL) for w in ("0", "1")]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "[worker 0] ran on 0" in outs[0][0] and "[worker 1] ran on 1" in outs[1][0]
    logs = sandbox["home"] / "taskpgm-runs" / "bbh" / "logs"
    assert {p.name for p in logs.glob("*.log")} == {"worker-0.log", "worker-1.log"}
