"""The demo: one real job end to end — RabbitMQ, the daemon, a VM under libvirt.

Builds the tiny test image (once), starts `orchestrator run` with the test image's
image map, enqueues a job with `orchestrator enqueue --wait`, prints the job's log and
its result, and stops the daemon with SIGTERM (a graceful drain). Run it through
`bash scripts/demo.sh`, which installs and starts everything first.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
TEST_IMAGE = Path("/var/cache/orchestrator/test-image")
STATE_DIR = Path("/var/lib/orchestrator-demo")
SCRIPT = """\
echo "Hello from job $JOB_NAME inside $(uname -sr)"
echo "vCPUs: $(grep -c ^processor /proc/cpuinfo), memory: $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo)"
for step in build test package; do echo "step $step: ok"; done
"""


def main() -> int:
    started = time.monotonic()
    subprocess.run(
        [str(BIN / "python"), str(ROOT / "examples" / "test-image" / "build.py"), str(TEST_IMAGE)], check=True
    )
    env = {
        **os.environ,
        "AMQP_PREFIX": "demo",
        "ORCH_CONFIG": str(TEST_IMAGE / "image-map.yaml"),
        "STATE_DIR": str(STATE_DIR),
        "IMAGE_DIR": str(TEST_IMAGE),  # the test image's files: the only ones its VMs may boot from
        "ORCH_BACKEND": "libvirt",
        # Software emulation works everywhere; on a host with working KVM use auto.
        "LIBVIRT_DOMAIN_TYPE": os.environ.get("LIBVIRT_DOMAIN_TYPE", "qemu"),
        "LIBVIRT_NETWORK": os.environ.get("LIBVIRT_NETWORK", "orchestrator-demo"),
        "HOST_NAME": "demo-host",
        "LOG_FORMAT": "text",
        "DRAIN_TIMEOUT_S": "30",
    }
    daemon_log = STATE_DIR / "daemon.log"
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with daemon_log.open("w") as log:
        daemon = subprocess.Popen([str(BIN / "orchestrator"), "run"], env=env, stderr=log, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while "daemon.started" not in daemon_log.read_text():
            if daemon.poll() is not None or time.monotonic() > deadline:
                print(daemon_log.read_text(), file=sys.stderr)
                print("demo: the daemon did not start (its log is above)", file=sys.stderr)
                return 1
            time.sleep(0.1)
        job_id = str(uuid.uuid4())
        print(f"demo: daemon up; enqueueing job {job_id} on label 'demo'", flush=True)
        enqueue = subprocess.run(
            [
                str(BIN / "orchestrator"),
                "enqueue",
                "--request-id",
                job_id,
                "--repo",
                "https://example.invalid/demo.git",
                "--commit",
                "0" * 40,
                "--runs-on",
                "demo",
                "--script",
                SCRIPT,
                "--env",
                "JOB_NAME=demo",
                "--wait",
                "--wait-timeout",
                "300",
            ],
            env=env,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        console = STATE_DIR / "logs" / f"{job_id}.console"
        print("----- job log (the VM's serial console) -----")
        print(console.read_text(errors="replace") if console.exists() else "(no console log)")
        print("----- job result -----")
        print(enqueue.stdout, end="")
        print(enqueue.stderr, end="", file=sys.stderr)
        print(f"demo: finished in {time.monotonic() - started:.1f} s with exit code {enqueue.returncode}")
        return enqueue.returncode
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=120)


if __name__ == "__main__":
    raise SystemExit(main())
