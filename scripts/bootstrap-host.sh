#!/usr/bin/env bash
# Installs and starts everything the orchestrator, its tests and its demo need on a
# Debian 12 host, as root. Idempotent: every step checks before it acts, so a second run
# takes a few seconds. Works without systemd (libvirt-daemon-system is skipped on purpose:
# it pulls systemd in; its postinst work is done by hand below, as the test-image recipe
# records).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
here=$(cd "$(dirname "$0")/.." && pwd)

log() { printf 'bootstrap: %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: run as root (it installs Debian packages and starts libvirtd/RabbitMQ)" >&2
    exit 2
fi

debs=(rabbitmq-server libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
      qemu-system-x86 qemu-utils libvirt-dev pkg-config busybox-static zstd
      python3-venv python3-dev gcc virtinst libxml2-utils iptables dnsmasq-base git procps
      prometheus chromium chromium-driver)
missing=()
for p in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
    # libvirtd sets up its firewall chains at start: restart it if iptables is new.
    case " ${missing[*]} " in *" iptables "*) restart_libvirtd=1 ;; esac
    case " ${missing[*]} " in *" prometheus "*) prometheus_new=1 ;; esac
fi
# promtool (the tests check the example alert rules with it) comes only with Debian's
# Prometheus server, whose package enables and starts the server. This host wants the
# tool, not a server: one this run installed is stopped and disabled again (a server
# installed before is somebody's, and left alone).
if [ -n "${prometheus_new:-}" ]; then
    if [ -d /run/systemd/system ]; then
        systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    else
        /etc/init.d/prometheus stop >/dev/null 2>&1 || true
        update-rc.d prometheus disable >/dev/null 2>&1 || true
    fi
fi

# --- RabbitMQ -------------------------------------------------------------------------
if ! rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
    log "starting rabbitmq-server"
    rabbitmq-server -detached || true
    # await_startup exits 69 until the node has registered with epmd: ping first.
    timeout 90 sh -c 'until rabbitmq-diagnostics -q ping >/dev/null 2>&1; do sleep 0.5; done'
fi
rabbitmqctl -q await_startup >/dev/null

# --- libvirt + QEMU without systemd ------------------------------------------------------
getent group kvm >/dev/null || groupadd -r kvm
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
# The qemu driver looks up the built-in user even when qemu.conf says user="root".
id libvirt-qemu >/dev/null 2>&1 || useradd -r -g libvirt-qemu -G kvm -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
mkdir -p /var/log/libvirt /var/lib/libvirt/boot /var/lib/libvirt/images /run/libvirt
# stdio_handler "file": QEMU appends the serial console to its file itself. With the
# default "logd", virtlogd rotates it at 2 MiB and the job log loses its beginning; the
# daemon keeps long consoles bounded on its own (CONSOLE_MAX_BYTES).
qemu_conf='user = "root"
group = "root"
security_driver = "none"
stdio_handler = "file"'
if [ "$(cat /etc/libvirt/qemu.conf 2>/dev/null)" != "$qemu_conf" ]; then
    printf '%s\n' "$qemu_conf" > /etc/libvirt/qemu.conf
    restart_libvirtd=1
fi
pgrep -x virtlogd >/dev/null || virtlogd -d
libvirtd_pid=$(cat /run/libvirtd.pid 2>/dev/null || true)
if [ -n "${libvirtd_pid}" ] && kill -0 "$libvirtd_pid" 2>/dev/null; then
    # A second `libvirtd -d` would delete the live daemon's socket: restart only by PID.
    if [ -n "${restart_libvirtd:-}" ] || [ ! -S /run/libvirt/libvirt-sock ]; then
        log "restarting libvirtd"
        kill "$libvirtd_pid"
        timeout 30 sh -c "while kill -0 $libvirtd_pid 2>/dev/null; do sleep 0.2; done"
        libvirtd -d
    fi
else
    log "starting libvirtd"
    libvirtd -d
fi
timeout 60 sh -c 'until virsh -c qemu:///system version >/dev/null 2>&1; do sleep 0.25; done'

# An isolated network for the demo (a bridge with no address and no forwarding: the
# demo VM reaches nothing). The daemon itself makes it active and autostarted.
if ! virsh -c qemu:///system net-info orchestrator-demo >/dev/null 2>&1; then
    netxml=$(mktemp)
    printf "<network><name>orchestrator-demo</name><bridge name='virbr-orchdemo' stp='off'/></network>\n" > "$netxml"
    virsh -c qemu:///system net-define "$netxml" >/dev/null
    rm -f "$netxml"
fi

# --- Python environment -------------------------------------------------------------
venv="$here/.venv"
stamp="$venv/.installed-$(sha256sum "$here/pyproject.toml" | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    log "creating $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    # libvirt-python builds against libvirt-dev here (gcc + Python headers).
    "$venv/bin/pip" install -q -e "$here[test,libvirt,lint]"
    "$venv/bin/python" -c "import aio_pika, libvirt, pycdlib, zstandard, orchestrator" 
    rm -f "$venv"/.installed-*
    touch "$stamp"
fi
log "ready"
