"""Handing a job to a VM that booted before the job existed (warm pools).

A pool VM boots with a NoCloud seed whose user-data is `waiter_user_data()`: a POSIX
`sh` script (nothing to install: it runs in any image that runs cloud-init user-data,
and in the test image) that opens the virtio-serial port `CHANNEL_NAME`, says
`ORCH-READY`, and blocks reading the job. The host connects to the port's socket (libvirt
`<channel type='unix'>`), waits for the ready line and sends

    ORCH-JOB <length>\\n<length bytes: the job's script>

The script is the same generated user-data a cold VM gets (with its nonce), preceded by
the host's clock and a random seed for the guest to apply first: a VM that waited (or
was restored from a snapshot) must not run a job with a stale clock or the entropy every
other pool VM shares. From there the job runs exactly like a cold one: output on the
serial console, the result line, power off.
"""

from __future__ import annotations

import asyncio
import secrets
import shlex
import time
from pathlib import Path

CHANNEL_NAME = "org.ci-orchestrator.job.0"
READY = b"ORCH-READY"
JOB = b"ORCH-JOB"
SEED_BYTES = 64


class HandOffError(Exception):
    """The job could not be handed over (the VM never said it was ready, or went away)."""


def waiter_user_data(*, vm_name: str) -> bytes:
    """The pool VM's user-data: find the job port, say ready, read and run the job."""
    return f"""#!/bin/sh
# Pool VM {vm_name}: waits for a job from the orchestrator (see hypervisors/handoff.py).
orch_port=
orch_tries=0
while [ -z "$orch_port" ] && [ $orch_tries -lt 600 ]; do
  for orch_dev in /sys/class/virtio-ports/*; do
    [ "$(cat "$orch_dev/name" 2>/dev/null)" = {CHANNEL_NAME} ] && orch_port=/dev/${{orch_dev##*/}}
  done
  [ -z "$orch_port" ] && {{ orch_tries=$((orch_tries + 1)); sleep 0.1; }}
done
[ -c "$orch_port" ] || {{ echo "orchestrator: no virtio port {CHANNEL_NAME}"; poweroff -f; }}
exec 3<>"$orch_port"
echo "orchestrator: {vm_name} is waiting for a job"
printf '{READY.decode()}\\n' >&3
read -r orch_tag orch_size <&3
[ "$orch_tag" = {JOB.decode()} ] || {{ echo "orchestrator: unexpected hand-off: $orch_tag"; poweroff -f; }}
head -c "$orch_size" <&3 > /tmp/orch-job
exec 3<&-
chmod +x /tmp/orch-job
exec /tmp/orch-job
""".encode()


# Every copy of a template starts from the same RNG state, and a write to /dev/urandom
# mixes into the input pool without reseeding the generator that reads come from. A
# kernel with vmgenid reseeds it by itself as the copy starts (each copy gets a new
# generation id, mixed in first): nothing to do, and nothing is started to find out (a
# glob in the shell). Without it only the RNDRESEEDCRNG ioctl reseeds at once, which a
# shell cannot issue: perl (Essential on Debian, and much quicker to start than python3
# under software emulation) or python3 asks for it; with neither, the kernel reseeds from
# the mixed pool at its next interval (seconds after boot, a minute at most). The line
# printed says which happened (tests read it from the console).
RESEED_AFTER_RESTORE = """orch_vmgenid=
for orch_dev in /sys/bus/acpi/drivers/vmgenid/*:*; do [ -e "$orch_dev" ] && orch_vmgenid=1; done
if [ -n "$orch_vmgenid" ]; then
  echo "orchestrator: RNG reseeded by the kernel (vmgenid)"
elif command -v perl >/dev/null 2>&1 && perl -e 'open(my $f, ">", "/dev/urandom") or exit 1; ioctl($f, 0x5207, 0) or exit 1' 2>/dev/null; then
  echo "orchestrator: RNG reseeded (RNDRESEEDCRNG, perl)"
elif command -v python3 >/dev/null 2>&1 && python3 -c 'import fcntl, os; fcntl.ioctl(os.open("/dev/urandom", os.O_WRONLY), 0x5207)' 2>/dev/null; then
  echo "orchestrator: RNG reseeded (RNDRESEEDCRNG, python3)"
else
  echo "orchestrator: host entropy mixed in; the kernel reseeds at its next interval (no vmgenid, perl or python3)"
fi
"""


def job_payload(
    job_user_data: bytes,
    *,
    now: float | None = None,
    seed: bytes | None = None,
    restored: bool = False,
    mac_change: tuple[str, str] | None = None,
) -> bytes:
    """The job's own user-data, preceded by the host's time and a fresh random seed; for
    a VM restored from a template (`restored`) also a reseed of the kernel's RNG and its
    own MAC for the NIC that has the template's."""
    when = int(time.time() if now is None else now)
    entropy = (seed if seed is not None else secrets.token_bytes(SEED_BYTES)).hex()
    body = job_user_data.split(b"\n", 1)[1] if job_user_data.startswith(b"#!") else job_user_data
    prelude = (
        "#!/bin/sh\n"
        f"date -u -s @{when} >/dev/null 2>&1 || true\n"
        # Mixed into the pool, whatever the guest's entropy was when it was booted or saved.
        f"printf %s {shlex.quote(entropy)} >/dev/urandom 2>/dev/null || true\n"
    )
    if restored:
        prelude += RESEED_AFTER_RESTORE
    if mac_change is not None:
        old, new = (shlex.quote(mac) for mac in mac_change)
        # Every restored copy has the template's MAC in its memory: the host gave each its own.
        prelude += (
            "for orch_nic in /sys/class/net/*; do\n"
            f'  [ "$(cat "$orch_nic/address" 2>/dev/null)" = {old} ] && ip link set dev "${{orch_nic##*/}}" address {new} 2>/dev/null\n'
            "done\n"
        )
    return prelude.encode() + body


class JobPort:
    """An open connection to a pool VM's job port, after the VM said it is ready.

    Kept open while the VM waits, so handing a job over is one write: the waiter blocks
    on its ready line until the host connects, and reads the job right after it."""

    def __init__(self, socket_path: Path, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.socket_path = socket_path
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open_when_ready(cls, socket_path: Path, *, timeout_s: float) -> JobPort:
        """Connect (QEMU may not listen yet) and wait for the ready line. Raises `HandOffError`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    try:
                        reader, writer = await asyncio.open_unix_connection(str(socket_path))
                        break
                    except OSError:
                        if loop.time() > deadline:
                            raise
                        await asyncio.sleep(0.05)
                try:
                    while (line := await reader.readline()).strip() != READY:
                        if not line:
                            raise HandOffError(f"the VM closed its job port before it was ready ({socket_path})")
                except BaseException:
                    writer.close()
                    raise
        except TimeoutError:
            raise HandOffError(f"the VM did not say it was ready within {timeout_s:g} s ({socket_path})") from None
        except OSError as exc:
            raise HandOffError(f"cannot reach the VM's job port {socket_path}: {exc.strerror or exc}") from None
        return cls(socket_path, reader, writer)

    async def send(self, payload: bytes) -> None:
        """Hand the job over and close the port. Raises `HandOffError` (the VM went away)."""
        try:
            if self._reader.at_eof():
                raise HandOffError(f"the VM closed its job port ({self.socket_path})")
            self._writer.write(JOB + f" {len(payload)}\n".encode() + payload)
            await self._writer.drain()
        except OSError as exc:
            raise HandOffError(f"the VM's job port {self.socket_path} is gone: {exc.strerror or exc}") from None
        finally:
            self.close()

    def close(self) -> None:
        self._writer.close()


async def hand_over(socket_path: Path, payload: bytes, *, ready_timeout_s: float) -> None:
    """Connect to a pool VM's job port, wait until it says it is ready, send the job."""
    port = await JobPort.open_when_ready(socket_path, timeout_s=ready_timeout_s)
    await port.send(payload)
