#!/bin/sh
# /init of the kTLS test VM (busybox sh, PID 1). Installed by run.sh.
#
# Sets up the minimal system, loads tls.ko and the AEAD crypto modules, runs
# /payload/run with a timeout, prints exactly one final line
#     KTLS-VM-RESULT: PASS            (payload exited 0)
#     KTLS-VM-RESULT: FAIL (...)      (anything else)
# and powers the VM off. run.sh reads that line from the serial console.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export HOME=/root TERM=dumb

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
# Make sure we talk to the serial console even if the kernel could not open
# /dev/console for us before devtmpfs was mounted.
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm /tmp /run
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /dev/shm 2>/dev/null
mount -t tmpfs tmpfs /run 2>/dev/null

say() { echo "ktls-vm-init: $*"; }

finish() {
    # $1: PASS or FAIL reason
    sync
    echo
    if [ "$1" = PASS ]; then
        echo "KTLS-VM-RESULT: PASS"
    else
        echo "KTLS-VM-RESULT: FAIL ($1)"
    fi
    sync
    poweroff -f
    sleep 2
    echo o >/proc/sysrq-trigger
    sleep 10
    exit 1 # init exiting panics the kernel; panic=-1 + -no-reboot ends QEMU
}

# Parameters from the kernel command line (set by run.sh).
payload_timeout=240
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        ktls_vm.timeout=*) payload_timeout=${arg#ktls_vm.timeout=} ;;
    esac
done

say "kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) CPU(s), $(awk '/MemTotal/{print $2" kB"}' /proc/meminfo)"
have="" missing=""
flags=$(awk -F: '/^flags/{print $2; exit}' /proc/cpuinfo)
for f in aes pclmulqdq avx avx2 sse4_1; do
    case " $flags " in
        *" $f "*) have="$have $f" ;;
        *) missing="$missing $f" ;;
    esac
done
say "cpu flags present:${have:- none}; missing:${missing:- none}"

hostname ktls-vm 2>/dev/null
if ! ip link set lo up 2>/dev/null; then
    ifconfig lo 127.0.0.1 netmask 255.0.0.0 up || finish "cannot bring up lo"
fi
ip addr show lo 2>/dev/null | grep -q 'inet 127.0.0.1' ||
    ifconfig lo 127.0.0.1 netmask 255.0.0.0 up ||
    finish "no 127.0.0.1 on lo"

if ! out=$(timeout 60 modprobe tls 2>&1); then
    echo "$out"
    finish "modprobe tls failed"
fi
[ -r /proc/net/tls_stat ] || finish "/proc/net/tls_stat missing after modprobe tls"
say "modprobe tls: ok"

# Crypto modules that run.sh put in the image (one name per line). A failure
# here is reported, not fatal: the payload decides what it needs (e.g.
# aesni-intel needs the AES-NI CPU flag, the generic AES is always there).
if [ -r /etc/ktls-vm/crypto-modules ]; then
    ok="" bad=""
    while read -r m; do
        [ -n "$m" ] || continue
        if out=$(timeout 60 modprobe "$m" 2>&1); then
            ok="$ok $m"
        else
            bad="$bad $m"
            say "modprobe $m FAILED: $out"
        fi
    done </etc/ktls-vm/crypto-modules
    say "crypto modules loaded:${ok:- none}"
    [ -z "$bad" ] || say "crypto modules NOT loaded:$bad"
fi

say "/proc/net/tls_stat:"
cat /proc/net/tls_stat

[ -x /payload/run ] || finish "/payload/run missing or not executable"
export KTLS_VM=1
say "running /payload/run (timeout ${payload_timeout}s)"
echo "----- payload output -----"
cd /payload || finish "cannot cd to /payload"
timeout -s KILL "$payload_timeout" /payload/run
rc=$?
cd /
echo "----- end of payload output (exit $rc) -----"
if [ "$rc" -eq 0 ]; then
    finish PASS
elif [ "$rc" -eq 137 ]; then
    dmesg | tail -n 20
    finish "exit $rc: killed, timeout of ${payload_timeout}s reached?"
else
    dmesg | tail -n 20
    finish "exit $rc"
fi
