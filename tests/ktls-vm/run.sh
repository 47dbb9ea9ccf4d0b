#!/usr/bin/env bash
# Boot Debian 12's cloud kernel (6.1, CONFIG_TLS=m) under QEMU/TCG with a tiny
# busybox initramfs, load kernel TLS, run a caller-supplied payload inside the
# VM and report its result. See README.md beside this file.
#
#   tests/ktls-vm/run.sh --payload DIR [--timeout SECS] [options]
#   tests/ktls-vm/run.sh --smoke          (same as --payload tests/ktls-vm/smoke)
#
# Exits 0 only if the VM printed "KTLS-VM-RESULT: PASS".
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
WORK=${KTLS_VM_DIR:-$ROOT/target/ktls-vm}
CACHE=$WORK/cache

TIMEOUT=300
PAYLOAD_TIMEOUT=""
PAYLOAD=""
MEM=1024
SMP=2
CPU=max
LOG=""
KPKG=""
APPEND_EXTRA=""
KEEP=0
REFRESH=0

usage() {
    cat <<EOF
usage: $0 (--payload DIR | --smoke) [options]

  --payload DIR          copy DIR to /payload in the VM; /payload/run is executed
                         (if DIR/prepare exists it is run on the host first,
                         with the staged payload directory as \$1)
  --smoke                use the kTLS smoke payload in $HERE/smoke
  --timeout SECS         overall bound for the VM run (default $TIMEOUT)
  --payload-timeout SECS bound for /payload/run inside the VM
                         (default: --timeout minus 45, at least 10)
  --log FILE             console log (default $WORK/console.log)
  --mem MB               guest memory (default $MEM)
  --smp N                guest CPUs (default $SMP)
  --cpu MODEL            QEMU CPU model (default $CPU: AES-NI, PCLMUL, AVX2 under
                         TCG; e.g. qemu64 has no AES-NI, to test generic crypto)
  --kernel-pkg NAME      kernel package (default: what linux-image-cloud-amd64
                         depends on)
  --append ARGS          extra kernel command line arguments
  --refresh              re-resolve and re-download the kernel even if cached
  --keep                 keep the build directory (initramfs, staging tree)
  -h, --help             this text

Environment: KTLS_VM_DIR (default $ROOT/target/ktls-vm) holds cache/, logs, builds.
EOF
}

say() { echo "ktls-vm: $*"; }
die() {
    echo "ktls-vm: ERROR: $*" >&2
    exit 1
}
need_arg() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs an argument (see --help)"; }
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

while [ $# -gt 0 ]; do
    case "$1" in
        --payload) need_arg "$@"; PAYLOAD=$2; shift 2 ;;
        --payload=*) PAYLOAD=${1#*=}; shift ;;
        --smoke) PAYLOAD=$HERE/smoke; shift ;;
        --timeout) need_arg "$@"; TIMEOUT=$2; shift 2 ;;
        --timeout=*) TIMEOUT=${1#*=}; shift ;;
        --payload-timeout) need_arg "$@"; PAYLOAD_TIMEOUT=$2; shift 2 ;;
        --payload-timeout=*) PAYLOAD_TIMEOUT=${1#*=}; shift ;;
        --log) need_arg "$@"; LOG=$2; shift 2 ;;
        --log=*) LOG=${1#*=}; shift ;;
        --mem) need_arg "$@"; MEM=$2; shift 2 ;;
        --smp) need_arg "$@"; SMP=$2; shift 2 ;;
        --cpu) need_arg "$@"; CPU=$2; shift 2 ;;
        --kernel-pkg) need_arg "$@"; KPKG=$2; shift 2 ;;
        --append) need_arg "$@"; APPEND_EXTRA=$2; shift 2 ;;
        --refresh) REFRESH=1; shift ;;
        --keep) KEEP=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

[ -n "$PAYLOAD" ] || { usage >&2; die "no payload: give --payload DIR or --smoke"; }
[ -d "$PAYLOAD" ] || die "payload directory not found: $PAYLOAD"
PAYLOAD=$(cd "$PAYLOAD" && pwd)
[ -f "$PAYLOAD/run" ] || die "payload has no 'run' script: $PAYLOAD/run"
is_uint "$TIMEOUT" && [ "$TIMEOUT" -ge 20 ] || die "--timeout must be an integer >= 20 (got '$TIMEOUT')"
if [ -z "$PAYLOAD_TIMEOUT" ]; then
    PAYLOAD_TIMEOUT=$((TIMEOUT - 45))
    [ "$PAYLOAD_TIMEOUT" -ge 10 ] || PAYLOAD_TIMEOUT=10
fi
is_uint "$PAYLOAD_TIMEOUT" && [ "$PAYLOAD_TIMEOUT" -ge 1 ] || die "--payload-timeout must be a positive integer"
[ "$PAYLOAD_TIMEOUT" -lt "$TIMEOUT" ] || die "--payload-timeout ($PAYLOAD_TIMEOUT) must be below --timeout ($TIMEOUT)"
is_uint "$MEM" || die "--mem must be an integer (MB)"
is_uint "$SMP" || die "--smp must be an integer"
case "$APPEND_EXTRA" in *$'\n'*) die "--append must be one line" ;; esac

mkdir -p "$WORK" "$CACHE"
[ -n "$LOG" ] || LOG=$WORK/console.log
mkdir -p "$(dirname "$LOG")"
LOG=$(cd "$(dirname "$LOG")" && pwd)/$(basename "$LOG")

T_START=$(date +%s.%N)
t_mark=$T_START
TIMINGS=""
phase_done() { # $1: name
    local now
    now=$(date +%s.%N)
    TIMINGS="$TIMINGS $1=$(awk -v a="$t_mark" -v b="$now" 'BEGIN{printf "%.1fs", b-a}')"
    t_mark=$now
}

# ---------------------------------------------------------------- host tools
APT_UPDATED=0
apt_update() {
    [ "$APT_UPDATED" = 1 ] && return 0
    say "apt-get update"
    timeout 600 apt-get update -qq || die "apt-get update failed (is a Debian mirror reachable?)"
    APT_UPDATED=1
}

apt_install() { # packages...
    [ "$(id -u)" = 0 ] || die "missing packages: $*; install them as root: apt-get install --no-install-recommends $*"
    command -v apt-get >/dev/null || die "missing packages: $* (and no apt-get to install them)"
    apt_update
    say "installing: $*"
    DEBIAN_FRONTEND=noninteractive timeout 900 \
        apt-get install -y -qq --no-install-recommends "$@" >"$WORK/apt-install.log" 2>&1 || {
        tail -n 30 "$WORK/apt-install.log" >&2
        die "apt-get install $* failed (log: $WORK/apt-install.log)"
    }
}

is_static_elf() { # file: true if an ELF without a dynamic loader
    local out
    out=$(LC_ALL=C ldd "$1" 2>&1 || true)
    case "$out" in *"not a dynamic executable"* | *"statically linked"*) return 0 ;; esac
    return 1
}

find_static_busybox() {
    local b
    for b in /bin/busybox /usr/bin/busybox; do
        if [ -x "$b" ] && is_static_elf "$b"; then
            echo "$b"
            return 0
        fi
    done
    return 1
}

missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v cpio >/dev/null || missing+=(cpio)
{ command -v depmod && command -v modprobe; } >/dev/null || missing+=(kmod)
command -v gzip >/dev/null || missing+=(gzip)
command -v dpkg-deb >/dev/null || missing+=(dpkg)
command -v ldd >/dev/null || missing+=(libc-bin)
find_static_busybox >/dev/null || missing+=(busybox-static)
if ((${#missing[@]})); then
    apt_install "${missing[@]}"
fi
BUSYBOX=$(find_static_busybox) || die "no statically linked busybox after installing busybox-static"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 still missing"
phase_done tools

# -------------------------------------------------------------- the kernel
# Cached per package+version under $CACHE/kernel/<pkg>_<version>/ (an extracted
# .deb plus modules.dep from depmod); the .deb itself is kept in $CACHE/debs/.
exec 9>"$CACHE/.lock"
flock -w 900 9 || die "could not lock $CACHE/.lock within 900 s (another run stuck?)"

resolve_kernel_pkg() { # prints "pkg version" or nothing
    local pkg=$KPKG ver
    if [ -z "$pkg" ]; then
        pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
            awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-cloud-amd64$/ {print $2; exit}')
    fi
    [ -n "$pkg" ] || return 0
    ver=$(apt-cache policy "$pkg" 2>/dev/null | awk '$1 == "Candidate:" {print $2; exit}')
    [ -n "$ver" ] && [ "$ver" != "(none)" ] || return 0
    echo "$pkg $ver"
}

newest_cached_kernel() { # prints the newest complete cached kernel dir, if any
    local d
    for d in "$CACHE"/kernel/*/; do
        [ -f "$d.ready" ] || continue
        case "$d" in *.tmp.*) continue ;; esac
        if [ -z "$KPKG" ] || [[ $(basename "$d") == "${KPKG}_"* ]]; then echo "${d%/}"; fi
    done | sort -V | tail -n 1
}

# A cached kernel is used as is (fast, works offline); --refresh runs
# apt-get update and picks up a newer kernel package if Debian has one.
KDIR=""
[ "$REFRESH" = 1 ] || KDIR=$(newest_cached_kernel)
if [ -n "$KDIR" ]; then
    say "using cached kernel $(basename "$KDIR") (--refresh looks for a newer one)"
else
    [ "$REFRESH" = 0 ] || apt_update
    resolved=$(resolve_kernel_pkg)
    if [ -z "$resolved" ] && [ "$APT_UPDATED" = 0 ]; then
        apt_update
        resolved=$(resolve_kernel_pkg)
    fi
    [ -n "$resolved" ] || die "cannot resolve the kernel package (${KPKG:-dependency of linux-image-cloud-amd64}) with apt-cache"
    read -r PKG PKGVER <<<"$resolved"
    KDIR=$CACHE/kernel/${PKG}_${PKGVER}
fi

if [ ! -f "$KDIR/.ready" ]; then
    mkdir -p "$CACHE/debs"
    deb=$(ls "$CACHE/debs/${PKG}_${PKGVER//:/%3a}_"*.deb 2>/dev/null | head -n 1 || true)
    if [ -z "$deb" ]; then
        say "downloading $PKG=$PKGVER"
        dl() { (cd "$CACHE/debs" && timeout 600 apt-get download -q -o APT::Sandbox::User=root "$PKG=$PKGVER"); }
        if ! dl; then
            # Package lists may be stale (old version gone from the mirror).
            APT_UPDATED=0
            apt_update
            resolved=$(resolve_kernel_pkg)
            [ -n "$resolved" ] || die "cannot resolve the kernel package after apt-get update"
            read -r PKG PKGVER <<<"$resolved"
            KDIR=$CACHE/kernel/${PKG}_${PKGVER}
            dl || die "apt-get download $PKG=$PKGVER failed"
        fi
        deb=$(ls -t "$CACHE/debs/${PKG}_"*.deb 2>/dev/null | head -n 1 || true)
        [ -n "$deb" ] || die "apt-get download did not leave a ${PKG}_*.deb in $CACHE/debs"
    else
        say "using cached $(basename "$deb")"
    fi
    say "extracting $(basename "$deb")"
    tmpk=$KDIR.tmp.$$
    rm -rf "$tmpk"
    mkdir -p "$tmpk"
    dpkg-deb -x "$deb" "$tmpk" || die "dpkg-deb -x $deb failed"
    # merged-/usr kernel packages (Debian 13+) ship /usr/lib/modules
    if [ ! -d "$tmpk/lib/modules" ] && [ -d "$tmpk/usr/lib/modules" ]; then
        mkdir -p "$tmpk/lib"
        mv "$tmpk/usr/lib/modules" "$tmpk/lib/modules"
    fi
    [ -d "$tmpk/lib/modules" ] || die "no /lib/modules in $deb"
    # Compressed modules (newer Debian kernels): decompress in place so that
    # depmod, the initramfs and busybox modprobe all see plain .ko files.
    mapfile -t zmods < <(find "$tmpk/lib/modules" -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')
    if ((${#zmods[@]})); then
        zneed=()
        for z in "${zmods[@]}"; do
            case "$z" in
                *.xz) command -v xz >/dev/null || zneed+=(xz-utils) ;;
                *.zst) command -v zstd >/dev/null || zneed+=(zstd) ;;
            esac
        done
        if ((${#zneed[@]})); then
            mapfile -t zneed < <(printf '%s\n' "${zneed[@]}" | sort -u)
            apt_install "${zneed[@]}"
        fi
        say "decompressing ${#zmods[@]} compressed modules"
        for z in "${zmods[@]}"; do
            case "$z" in
                *.xz) xz -d -f "$z" ;;
                *.zst) zstd -q -d --rm -f "$z" ;;
                *.gz) gzip -d -f "$z" ;;
            esac
        done
    fi
    kvers=$(ls "$tmpk/lib/modules")
    [ "$(echo "$kvers" | wc -l)" = 1 ] || die "expected one /lib/modules/<ver> in $deb, found: $kvers"
    ls "$tmpk"/boot/vmlinuz-* >/dev/null 2>&1 || die "no /boot/vmlinuz-* in $deb"
    depmod -b "$tmpk" "$kvers" || die "depmod -b $tmpk $kvers failed"
    touch "$tmpk/.ready"
    rm -rf "$KDIR"
    mv "$tmpk" "$KDIR"
    # keep only the current kernel in the cache
    for old in "$CACHE"/kernel/*/ "$CACHE"/debs/*.deb; do
        case "$old" in
            "$KDIR/" | "$deb" | *"*"*) ;;
            *) say "pruning old cache entry $(basename "$old")"; rm -rf "$old" ;;
        esac
    done
fi
exec 9>&-

KVER=$(ls "$KDIR/lib/modules")
VMLINUZ=$(ls "$KDIR"/boot/vmlinuz-* | head -n 1)
say "kernel: $(basename "$KDIR") ($KVER)"
phase_done kernel

# -------------------------------------------------------------- initramfs
BUILD=$(mktemp -d "$WORK/build.XXXXXX")
cleanup() {
    if [ "$KEEP" = 1 ]; then
        say "kept build directory $BUILD"
    else
        rm -rf "$BUILD"
    fi
}
trap cleanup EXIT
S=$BUILD/root
mkdir -p "$S"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,root,etc/ktls-vm,payload,lib/modules}
chmod 1777 "$S/tmp"

# busybox + one symlink per applet
cp "$BUSYBOX" "$S/bin/busybox"
napplets=0
while read -r applet; do
    [ -n "$applet" ] && [ "$applet" != bin/busybox ] && [ "$applet" != /bin/busybox ] || continue
    applet=${applet#/}
    mkdir -p "$S/$(dirname "$applet")"
    [ -e "$S/$applet" ] || ln -s /bin/busybox "$S/$applet"
    napplets=$((napplets + 1))
done < <("$S/bin/busybox" --list-full 2>/dev/null || "$S/bin/busybox" --list | sed 's|^|bin/|')
for a in sh mount modprobe timeout poweroff ip ifconfig awk grep cat; do
    [ -e "$S/bin/$a" ] || [ -e "$S/sbin/$a" ] || [ -e "$S/usr/bin/$a" ] || [ -e "$S/usr/sbin/$a" ] ||
        die "busybox ($BUSYBOX) has no '$a' applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$S/etc/passwd"
printf 'root:x:0:\n' >"$S/etc/group"
printf '127.0.0.1 localhost ktls-vm\n::1 localhost\n' >"$S/etc/hosts"
if [ "$(id -u)" = 0 ]; then
    mknod -m 600 "$S/dev/console" c 5 1
    mknod -m 666 "$S/dev/null" c 1 3
fi

# kernel modules: tls + AEAD crypto (+ their dependencies via modules.dep)
CRYPTO_MODS=(
    aesni-intel          # AES-NI AES/GCM (needs the aes CPU flag)
    ghash-clmulni-intel  # PCLMUL GHASH
    gcm ghash-generic ctr ccm
    chacha20poly1305 chacha-x86_64 chacha_generic poly1305-x86_64 poly1305_generic
)
declare -A SEEN=()
mod_files=()
add_module() { # name required(0/1)
    local name=$1 req=$2 out line f
    if ! out=$(modprobe -d "$KDIR" -S "$KVER" --show-depends "$name" 2>&1); then
        [ "$req" = 0 ] || die "module '$name' not found in $KVER: $out"
        say "module $name: not in this kernel (skipped)"
        return 1
    fi
    while read -r line; do
        case "$line" in
            insmod\ *)
                f=${line#insmod }
                f=${f%% *}
                f=${f#"$KDIR"}
                if [ -z "${SEEN[$f]:-}" ]; then
                    SEEN[$f]=1
                    mod_files+=("$f")
                fi
                ;;
            builtin\ *) say "module $name: built into the kernel" ;;
        esac
    done <<<"$out"
    return 0
}
add_module tls 1
: >"$S/etc/ktls-vm/crypto-modules"
for m in "${CRYPTO_MODS[@]}"; do
    if add_module "$m" 0; then echo "$m" >>"$S/etc/ktls-vm/crypto-modules"; fi
done
MD=$S/lib/modules/$KVER
mkdir -p "$MD"
for f in "${mod_files[@]}"; do
    mkdir -p "$S/$(dirname "$f")"
    cp "$KDIR/$f" "$S/$f"
done
for f in modules.order modules.builtin modules.builtin.modinfo; do
    [ -f "$KDIR/lib/modules/$KVER/$f" ] && cp "$KDIR/lib/modules/$KVER/$f" "$MD/"
done
depmod -b "$S" "$KVER" || die "depmod for the initramfs module tree failed"
[ -s "$MD/modules.dep" ] || die "empty modules.dep in the initramfs tree"
say "modules (${#mod_files[@]}): $(for f in "${mod_files[@]}"; do basename "$f" .ko; done | tr '\n' ' ')"

# payload
cp -a "$PAYLOAD/." "$S/payload/"
if [ -f "$PAYLOAD/prepare" ]; then
    [ -x "$PAYLOAD/prepare" ] || die "$PAYLOAD/prepare exists but is not executable"
    say "running payload hook: $PAYLOAD/prepare $S/payload"
    timeout 1200 "$PAYLOAD/prepare" "$S/payload" || die "payload prepare hook failed ($PAYLOAD/prepare)"
fi
[ -f "$S/payload/run" ] && [ -x "$S/payload/run" ] || die "payload 'run' is not executable: chmod +x $PAYLOAD/run"
shebang=$(head -n 1 "$S/payload/run")
if [[ $shebang == '#!'* ]]; then
    interp=${shebang#\#!}
    interp=${interp# }
    interp=${interp%% *}
    [ -e "$S$interp" ] || [ -e "$S/payload/${interp#/payload/}" ] ||
        die "payload run uses interpreter '$interp', which is not in the VM (busybox only: use #!/bin/sh)"
fi

# shared libraries for every dynamically linked ELF in the payload
declare -A LIBS=()
nelf=0
while IFS= read -r -d '' f; do
    [ "$(head -c 4 "$f" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ] || continue
    nelf=$((nelf + 1))
    is_static_elf "$f" && continue
    out=$(LC_ALL=C ldd "$f" 2>&1) || die "ldd failed for payload file ${f#"$S"}: $out"
    if grep -q 'not found' <<<"$out"; then
        die "payload file ${f#"$S"} needs libraries missing on this host:
$(grep 'not found' <<<"$out")"
    fi
    for lib in $(awk '{for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i}' <<<"$out"); do
        LIBS[$lib]=1
    done
done < <(find "$S/payload" -type f -print0)
if ((${#LIBS[@]})); then
    for lib in "${!LIBS[@]}"; do
        mkdir -p "$S$(dirname "$lib")"
        cp -L "$lib" "$S$lib"
        dirname "$lib" >>"$S/etc/ld.so.conf"
    done
    sort -u -o "$S/etc/ld.so.conf" "$S/etc/ld.so.conf"
    ldconfig -r "$S" 2>/dev/null || say "warning: ldconfig -r failed; relying on the loader's default paths"
    say "payload: $nelf ELF file(s), ${#LIBS[@]} shared libraries added: $(printf '%s ' "${!LIBS[@]}")"
else
    say "payload: $nelf ELF file(s), all static"
fi

install -m 755 "$HERE/init.sh" "$S/init"

INITRD=$BUILD/initramfs.gz
(cd "$S" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --owner=0:0 --quiet) |
    gzip -6 >"$INITRD"
say "initramfs: $(du -h "$INITRD" | cut -f1) ($(find "$S" | wc -l) entries)"
phase_done initramfs

# -------------------------------------------------------------------- boot
APPEND="console=ttyS0 panic=-1 quiet ktls_vm.timeout=$PAYLOAD_TIMEOUT${APPEND_EXTRA:+ $APPEND_EXTRA}"
QEMU=(qemu-system-x86_64 -accel tcg -cpu "$CPU" -m "$MEM" -smp "$SMP"
    -nodefaults -no-user-config -display none -nic none
    -serial stdio -monitor none -no-reboot
    -kernel "$VMLINUZ" -initrd "$INITRD" -append "$APPEND")
say "booting (timeout ${TIMEOUT}s, payload timeout ${PAYLOAD_TIMEOUT}s, log $LOG)"
say "${QEMU[*]}"
set +e
timeout -k 10 "$TIMEOUT" "${QEMU[@]}" </dev/null 2>&1 | tee "$LOG"
rcs=("${PIPESTATUS[@]}")
set -e
qrc=${rcs[0]}
phase_done vm
TOTAL=$(awk -v a="$T_START" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')

echo
say "timings:$TIMINGS total=${TOTAL}s"
oops=$(tr -d '\r' <"$LOG" | grep -aE '^\[ *[0-9]+\.[0-9]+\] .*(Oops|BUG:|Kernel panic|WARNING: CPU|general protection fault|invalid opcode|soft lockup|blocked for more than|Call Trace)' | head -n 5 || true)
if [ -n "$oops" ]; then
    echo "ktls-vm: ERROR: the guest kernel logged an oops/warning/panic (see $LOG):" >&2
    sed 's/^/  | /' <<<"$oops" >&2
fi
result=$(tr -d '\r' <"$LOG" | grep -a '^KTLS-VM-RESULT: ' | tail -n 1 || true)
if [ -z "$result" ]; then
    {
        echo "ktls-vm: ERROR: the VM printed no KTLS-VM-RESULT line."
        case "$qrc" in
            124 | 137) echo "ktls-vm: QEMU was killed after the ${TIMEOUT}s timeout." ;;
            0) echo "ktls-vm: QEMU exited 0 (VM powered off or panicked before the result)." ;;
            *) echo "ktls-vm: QEMU exited with status $qrc." ;;
        esac
        echo "ktls-vm: last 40 lines of $LOG:"
        tr -d '\r' <"$LOG" | tail -n 40 | sed 's/^/  | /'
    } >&2
    exit 1
fi
if [ "$result" = "KTLS-VM-RESULT: PASS" ]; then
    if [ -n "$oops" ]; then
        echo "ktls-vm: ERROR: the payload passed, but the guest kernel oopsed/warned: failing" >&2
        exit 1
    fi
    say "PASS ($(basename "$KDIR"), $TOTAL s)"
    exit 0
fi
echo "ktls-vm: ERROR: $result (log: $LOG)" >&2
exit 1
