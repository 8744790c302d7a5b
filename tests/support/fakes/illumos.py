"""Fake zonecfg / zoneadm / zfs for the zones backend's tests (they cannot run off
illumos). Run as `python illumos.py TOOL ARGS...` from wrappers named after each tool;
state lives in the JSON file $FAKE_ILLUMOS_STATE. `zoneadm boot` runs the job's
user-data from the zone's seed ISO (console, workdir and poweroff redirected through the
script's sandbox hooks) and serves the output on the zone's com1 socket, like a bhyve
guest would."""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # run as a script: reach the repository's modules
from tests.support.fakes.guest_sandbox import sandbox_user_data

STATE = Path(os.environ["FAKE_ILLUMOS_STATE"])
DEVROOT = Path(os.environ["FAKE_ZVOL_ROOT"])


@contextmanager
def state():
    STATE.touch()
    with STATE.open("r+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        text = handle.read()
        data = json.loads(text) if text else {"datasets": [], "zones": {}}
        yield data
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(data))


def fail(message: str) -> None:
    print(message, file=sys.stderr)
    raise SystemExit(1)


def zfs(args: list[str]) -> None:
    with state() as data:
        sets = data["datasets"]
        if args[0] == "list":
            if args[-1] not in sets:
                fail(f"cannot open '{args[-1]}': dataset does not exist")
            print(args[-1])
            if "-d" in args:  # `-d 1`: the children too, as zfs lists them
                depth = args[-1].count("/") + 1
                for name in sets:
                    if name.startswith(args[-1] + "/") and name.count("/") == depth and "@" not in name:
                        print(name)
        elif args[0] == "create":
            name = args[-1]
            sets.append(name)
            device = DEVROOT / name
            device.parent.mkdir(parents=True, exist_ok=True)
            device.write_bytes(b"\0" * int(args[-2]))
        elif args[0] == "snapshot":
            sets.append(args[1])
        elif args[0] == "clone":
            if args[-2] not in sets:
                fail(f"cannot open '{args[-2]}': dataset does not exist")
            if "-p" in args:  # creates the missing parents, as zfs does
                parts = args[-1].split("/")
                sets.extend(p for p in ("/".join(parts[:i]) for i in range(1, len(parts))) if p not in sets)
            sets.append(args[-1])
        elif args[0] == "set":
            pass
        elif args[0] == "destroy":
            if args[-1] not in sets:
                fail(f"cannot open '{args[-1]}': dataset does not exist")
            sets.remove(args[-1])


def zonecfg(args: list[str]) -> None:
    name = args[1]
    with state() as data:
        zones = data["zones"]
        if args[2] == "-f":
            text = Path(args[3]).read_text()
            attrs = dict(re.findall(r'add attr; set name=([\w-]+); set type=string; set value="([^"]*)"; end', text))
            zonepath = re.search(r'set zonepath="([^"]*)"', text).group(1)
            zones[name] = {"state": "configured", "attrs": attrs, "zonepath": zonepath, "pid": None}
        elif name not in zones:
            fail(f"{name}: No such zone configured")
        elif args[2] == "delete":
            del zones[name]
        elif args[2] == "info":
            wanted = args[4].removeprefix("name=")
            if wanted not in zones[name]["attrs"]:
                fail("No such attr resource.")
            print(f"attr:\n\tname: {wanted}\n\ttype: string\n\tvalue: {zones[name]['attrs'][wanted]}")


def zoneadm(args: list[str]) -> None:
    if args[0] == "list":
        with state() as data:
            print("0:global:running:/::ipkg:shared")
            for name, zone in data["zones"].items():
                print(f"-:{name}:{zone['state']}:{zone['zonepath']}::bhyve:excl")
        return
    name, verb = args[1], args[2]
    with state() as data:
        zone = data["zones"].get(name)
        if zone is None:
            fail(f"zoneadm: {name}: No such zone configured")
        if verb == "list":
            print(f"-:{name}:{zone['state']}:{zone['zonepath']}::bhyve:excl")
        elif verb == "install":
            zone["state"] = "installed"
        elif verb == "uninstall":
            zone["state"] = "configured"
        elif verb == "boot":
            zone["state"] = "running"
            guest = subprocess.Popen(
                [sys.executable, __file__, "zoneadm", "_guest", name],
                start_new_session=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            zone["pid"] = guest.pid
        elif verb in ("halt", "shutdown"):
            if zone["pid"]:
                try:
                    os.killpg(zone["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass
            zone["pid"] = None
            zone["state"] = "installed"


def guest(name: str) -> None:
    import pycdlib

    with state() as data:
        zone = data["zones"][name]
    sock_path = Path(zone["zonepath"]) / "root" / "tmp" / "vm.com1"
    sock_path.parent.mkdir(parents=True, exist_ok=True)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    server.listen(1)
    iso = pycdlib.PyCdlib()
    iso.open(zone["attrs"]["cdrom"])
    buffer = io.BytesIO()
    iso.get_file_from_iso_fp(buffer, rr_path="/user-data")
    iso.close()
    work = Path(tempfile.mkdtemp())
    console = work / "console"
    console.touch()
    script = sandbox_user_data(buffer.getvalue(), console=console, workdir=work / "job", poweroff="true")
    (work / "user-data").write_text(script)
    connection, _ = server.accept()
    subprocess.run(["sh", str(work / "user-data")])
    connection.sendall(b"fake-bhyve: guest booted\n" + console.read_bytes())
    connection.close()
    with state() as data:
        data["zones"][name]["state"] = "installed"
        data["zones"][name]["pid"] = None


def main() -> None:
    tool, args = sys.argv[1], sys.argv[2:]
    if args and args[0] == "_guest":
        guest(args[1])
    elif tool == "zfs":
        zfs(args)
    elif tool == "zonecfg":
        zonecfg(args)
    elif tool == "zoneadm":
        zoneadm(args)
    else:
        fail(f"unknown fake tool {tool}")


if __name__ == "__main__":
    main()
