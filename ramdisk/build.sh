#!/usr/bin/env bash
# Build the ipa-twisted deploy ramdisk: a Debian kernel and an initramfs whose init starts the
# agent (`twistd ipa`, through ipa_twisted.startup.launch). Made from Debian packages
# (debootstrap, minbase variant) and wheels of this checkout and its Python dependencies
# (pip wheel); see docs/ramdisk.md.
#
#   ramdisk/build.sh [--output DIR] [--suite SUITE] [--mirror URL] [--all-drivers]
#                    [--extra-packages "pkg ..."] [--force] [--print-hash]
#                    [--agent ours|reference]
#
# --agent reference builds the same ramdisk around the reference agent instead
# (ironic-python-agent $IPA_REFERENCE_VERSION, default 13.0.0, from the package index,
# installed the same way), for bench/boot.py; default DIR then .cache/ramdisk-reference.
# Writes DIR/vmlinuz, DIR/initrd.img and DIR/manifest.txt (default DIR: .cache/ramdisk). The
# build is skipped when DIR/stamp holds the hash of everything that goes in (this script,
# ramdisk/*, the agent's sources, the options): rebuilt only when one of them changes.
# Needs root (debootstrap, chroot, device nodes), debootstrap, cpio, zstd or gzip, and python3
# with pip; reaches the Debian mirror and the Python package index.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
output=
agent=${IPA_RAMDISK_AGENT:-ours}
reference_version=${IPA_REFERENCE_VERSION:-13.0.0}
suite=${IPA_RAMDISK_SUITE:-bookworm}
mirror=${IPA_RAMDISK_MIRROR:-}
extra_packages=${IPA_RAMDISK_EXTRA_PACKAGES:-}
all_drivers=0
force=0
print_hash=0

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while (($#)); do
  case "$1" in
    --output) output=$2; shift 2;;
    --suite) suite=$2; shift 2;;
    --mirror) mirror=$2; shift 2;;
    --extra-packages) extra_packages=$2; shift 2;;
    --all-drivers) all_drivers=1; shift;;
    --force) force=1; shift;;
    --print-hash) print_hash=1; shift;;
    --agent) agent=$2; shift 2;;
    -h|--help) usage 0;;
    *) echo "build.sh: unknown argument $1" >&2; usage 2 >&2;;
  esac
done

say() { echo "ramdisk: $*" >&2; }
die() { say "$*"; exit 1; }

case "$agent" in
  ours) output=${output:-$repo/.cache/ramdisk}; site_dir=/usr/lib/ipa-twisted
        requirement=$repo; package=ipa-twisted;;
  reference) output=${output:-$repo/.cache/ramdisk-reference}
             site_dir=/usr/lib/ironic-python-agent
             # Programs it needs at start-up that ours does not: lshw (memory, system).
             extra_packages="lshw${extra_packages:+ $extra_packages}"
             requirement=ironic-python-agent==$reference_version; package=ironic-python-agent;;
  *) die "--agent is ours or reference, not $agent";;
esac

# One build of DIR at a time: tests running side by side (the suite and the end-to-end VM
# test) may ask for it at once; the second waits, then finds the first's build up to date.
if [ "$print_hash" = 0 ]; then
  mkdir -p "$output"
  exec 9>"$output.lock"
  flock 9
fi

# The mirror apt already uses on this machine, else Debian's.
if [ -z "$mirror" ]; then
  mirror=$(grep -rhoE '^(deb|URIs:)[[:space:]]+(\[[^]]*\][[:space:]]+)?https?://[^[:space:]]+/debian/?' \
             /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
           | grep -oE 'https?://[^[:space:]]+' | grep -v security | head -n1 || true)
  mirror=${mirror:-http://deb.debian.org/debian}
fi

# -- what goes in, and its hash --------------------------------------------------------------
inputs_hash() {
  {
    echo "suite=$suite all_drivers=$all_drivers extra=$extra_packages agent=$agent"
    [ "$agent" = ours ] || echo "reference=$reference_version"
    cd "$repo"
    find ramdisk pyproject.toml ipa_twisted twisted/plugins -type f \
         \( -name '*.py' -o -name '*.toml' -o -path 'ramdisk/*' \) \
         ! -path '*/__pycache__/*' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
  } | sha256sum | cut -c1-16
}
hash=$(inputs_hash)
if ((print_hash)); then echo "$hash"; exit 0; fi
mkdir -p "$output"
output=$(cd "$output" && pwd)
if ((!force)) && [ "$(cat "$output/stamp" 2>/dev/null)" = "$hash" ] \
   && [ -s "$output/vmlinuz" ] && [ -s "$output/initrd.img" ]; then
  say "up to date ($hash): $output"
  exit 0
fi

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot and device nodes need it)"
for tool in debootstrap cpio chroot; do
  command -v "$tool" >/dev/null || die "$tool is not installed (apt-get install $tool)"
done
python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in "$repo/.venv/bin/python" python3; do
    if "$candidate" -m pip --version >/dev/null 2>&1; then python=$candidate; break; fi
  done
fi
[ -n "$python" ] || die "no python3 with pip found (set PYTHON=...)"
if command -v zstd >/dev/null; then compress=(zstd -q -T0 -10); else compress=(gzip -6); fi

started=$(date +%s.%N)
cache=$repo/.cache/ramdisk-downloads
mkdir -p "$cache/debs"
work=$(mktemp -d "$output/build.XXXXXX")
root=$work/root
mounted=()
cleanup() {
  for ((i=${#mounted[@]}-1; i>=0; i--)); do umount -l "${mounted[$i]}" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
since() { awk -v start="$started" -v now="$(date +%s.%N)" 'BEGIN { printf "%.1f", now - start }'; }
step() { say "$(since) s: $*"; }

packages=$(sed -e 's/#.*//' "$here/packages.txt" | tr -s ' \n' ',' | sed 's/^,//;s/,$//')
if [ -n "$extra_packages" ]; then packages="$packages,$(echo "$extra_packages" | tr -s ' ' ',')"; fi

# -- 1. wheels of the agent and its Python dependencies (in parallel with debootstrap) --------
step "building wheels with $python"
( "$python" -m pip wheel -q --disable-pip-version-check --wheel-dir "$work/wheels" "$requirement" \
    >"$work/wheels.log" 2>&1 ) &
wheels_pid=$!

# -- 2. the Debian system ------------------------------------------------------------------------
step "debootstrap $suite (minbase + $(echo "$packages" | tr ',' ' ' | wc -w) packages) from $mirror"
if ! debootstrap --variant=minbase --include="$packages" --cache-dir="$cache/debs" \
       "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1; then
  tail -n 30 "$work/debootstrap.log" >&2
  die "debootstrap failed (log above)"
fi

wait "$wheels_pid" || { cat "$work/wheels.log" >&2; die "pip wheel failed (log above)"; }

# -- 3. the kernel and the modules we need -------------------------------------------------------
step "fetching the kernel"
cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
kernel_package=$(chroot "$root" apt-cache depends linux-image-amd64 2>/dev/null \
                 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$kernel_package" ]; then
  chroot "$root" apt-get -qq update >/dev/null
  kernel_package=$(chroot "$root" apt-cache depends linux-image-amd64 \
                   | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
[ -n "$kernel_package" ] || die "cannot find the kernel package behind linux-image-amd64"
kernel_deb=$(ls "$cache/debs/${kernel_package}"_*.deb 2>/dev/null | head -n1 || true)
if [ -z "$kernel_deb" ]; then
  chroot "$root" sh -c "cd /tmp && apt-get -qq download $kernel_package"
  mv "$root"/tmp/"${kernel_package}"_*.deb "$cache/debs/"
  kernel_deb=$(ls "$cache/debs/${kernel_package}"_*.deb | head -n1)
fi
# Unpacked inside the new system, so its own kmod (not this machine's) resolves modules.
kernel=$root/tmp/kernel
mkdir -p "$kernel"
dpkg-deb --fsys-tarfile "$kernel_deb" | tar -x -C "$kernel" ./boot ./lib/modules
kver=$(ls "$kernel/lib/modules" | head -n1)
cp "$kernel/boot/vmlinuz-$kver" "$work/vmlinuz"

step "selecting kernel modules of $kver"
chroot "$root" depmod -b /tmp/kernel "$kver"
wanted=$(sed -e 's/#.*//' "$here/modules.txt" | tr -s ' \t' '\n' | sed '/^$/d')
if ((all_drivers)); then
  wanted="$wanted
kernel/drivers/ata/ kernel/drivers/block/ kernel/drivers/md/ kernel/drivers/nvme/
kernel/drivers/scsi/ kernel/drivers/net/ethernet/ kernel/drivers/virtio/
kernel/drivers/char/ipmi/ kernel/fs/ kernel/net/8021q/"
fi
names=()
for item in $wanted; do
  if [[ $item == */ ]]; then
    while IFS= read -r file; do
      base=${file##*/}; names+=("${base%%.ko*}")
    done < <(find "$kernel/lib/modules/$kver/$item" -name '*.ko*' 2>/dev/null)
  else
    names+=("$item")
  fi
done
# One modprobe run lists every module file needed (built-in ones print "builtin").
printf '%s\n' "${names[@]}" >"$kernel/wanted"
chroot "$root" sh -c "while read -r m; do modprobe -d /tmp/kernel -S $kver --show-depends \"\$m\" \
    2>/dev/null || echo \"missing \$m\"; done </tmp/kernel/wanted" >"$work/modules.list"
sed -n 's/^missing /ramdisk: kernel module not found, skipped: /p' "$work/modules.list" >&2
modules_dir=$root/lib/modules/$kver
mkdir -p "$modules_dir"
awk '$1 == "insmod" {print $2}' "$work/modules.list" | sort -u | while read -r path; do
  relative=${path#/tmp/kernel}
  mkdir -p "$root$(dirname "$relative")"
  cp "$kernel$relative" "$root$relative"
done
cp "$kernel/lib/modules/$kver"/modules.{order,builtin,builtin.modinfo} "$modules_dir/" \
  2>/dev/null || true
chroot "$root" depmod "$kver"
rm -rf "$kernel"

# -- 4. the agent ------------------------------------------------------------------------------
step "installing the agent ($agent)"
site=$root$site_dir
# For the ramdisk's Python (whatever runs this script): its version, and every manylinux
# platform its C library accepts (pip does not expand one into the older ones).
guest_python=$(chroot "$root" /usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
glibc_minor=$(chroot "$root" /usr/bin/python3 -c 'import os; print(os.confstr("CS_GNU_LIBC_VERSION").split(".")[1])')
platforms=()
for ((minor=glibc_minor; minor>=5; minor--)); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
"$python" -m pip install -q --disable-pip-version-check --no-index --find-links "$work/wheels" \
  --target "$site" --only-binary=:all: --python-version "$guest_python" --implementation cp \
  "${platforms[@]}" "$package" >"$work/install.log" 2>&1 \
  || { cat "$work/install.log" >&2; die "installing the wheels failed (log above)"; }
# Not needed at run time: console scripts made for this machine's Python, test suites.
rm -rf "$site/bin"
find "$site" -depth -type d \( -name test -o -name tests \) -path "$site/twisted/*" -exec rm -rf {} +
# Twisted's SSH, mail and chat protocols (and their dropins, before the plugin cache is
# written): no agent code imports them, and every byte left out is one the kernel need not
# unpack at boot (~5 MB).
rm -rf "$site"/twisted/{conch,mail,words} "$site"/twisted/plugins/{twisted_conch,twisted_mail,twisted_words,cred_sshkeys}.py
# Every launcher runs Python with -S: the agents' packages come from PYTHONPATH, and the
# `site` module's work (Debian's dist-packages paths, .pth files, sitecustomize's apport
# hook) cost 0.3 s of each start under emulation for nothing here. Both agents get it.
if [ "$agent" = ours ]; then
install -m 0755 /dev/stdin "$root/usr/local/bin/twistd" <<'EOF'
#!/bin/sh
# twistd with the agent's Python packages (installed apart from Debian's).
export PYTHONPATH=/usr/lib/ipa-twisted${PYTHONPATH:+:$PYTHONPATH}
exec /usr/bin/python3 -S -c 'from twisted.scripts.twistd import run; run()' "$@"
EOF
# What init starts: `twistd -n --pidfile= ipa`, without twistd's search for service makers.
install -m 0755 /dev/stdin "$root/usr/local/bin/ipa-agent" <<'EOF'
#!/bin/sh
export PYTHONPATH=/usr/lib/ipa-twisted${PYTHONPATH:+:$PYTHONPATH}
exec /usr/bin/python3 -S -m ipa_twisted.startup.launch -n --pidfile= ipa "$@"
EOF
else
install -m 0755 /dev/stdin "$root/usr/local/bin/ipa-agent" <<EOF
#!/bin/sh
# The reference agent (its console script's entry point), with its packages.
export PYTHONPATH=$site_dir\${PYTHONPATH:+:\$PYTHONPATH}
exec /usr/bin/python3 -S -c 'from ironic_python_agent.cmd.agent import run; run()' "\$@"
EOF
fi
install -m 0755 /dev/stdin "$root/usr/local/bin/ironic-collect-introspection-data" <<'EOF'
#!/bin/sh
export PYTHONPATH=/usr/lib/ipa-twisted${PYTHONPATH:+:$PYTHONPATH}
exec /usr/bin/python3 -S -c 'from ipa_twisted.inspector.cli import main; main()' "$@"
EOF
for action in reboot poweroff; do
  install -m 0755 /dev/stdin "$root/usr/local/sbin/$action" <<EOF
#!/bin/sh
# No init system here to ask: sync and $action at once (what "$action -f" means).
sync
exec busybox $action -f
EOF
done
# Byte-compile with the ramdisk's own Python (slow to do at every boot under emulation), and
# write the Twisted plugin cache so twistd need not scan for dropins.
chroot "$root" /usr/bin/python3 -m compileall -q "$site_dir" /usr/lib/python3 \
  >/dev/null 2>&1 || true
if [ "$agent" = ours ]; then
chroot "$root" env PYTHONPATH=/usr/lib/ipa-twisted /usr/bin/python3 -c \
  "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
chroot "$root" env PYTHONPATH=/usr/lib/ipa-twisted /usr/bin/python3 -c \
  "import ipa_twisted, twisted, klein, treq; print('agent', ipa_twisted.__version__)" >&2
else
chroot "$root" env PYTHONPATH="$site_dir" /usr/bin/python3 -c \
  "import importlib.metadata as m; print('reference agent', m.version('ironic-python-agent'))" >&2
fi

# -- 5. the system around it -------------------------------------------------------------------
step "configuring and trimming"
install -m 0755 "$here/init" "$root/init"
echo ipa-ramdisk >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 ipa-ramdisk\n::1 localhost\n' >"$root/etc/hosts"
: >"$root/etc/resolv.conf"
mkdir -p "$root/etc/ironic-python-agent.d" "$root/var/log"
rm -f "$root/dev/console"; mknod -m 600 "$root/dev/console" c 5 1
[ -e "$root/dev/null" ] || mknod -m 666 "$root/dev/null" c 1 3
# Not needed at run time: package caches, documentation, locales, the kernel's initramfs hooks.
rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
       "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* \
       "$root"/usr/share/i18n/* "$root"/var/log/* "$root"/usr/share/zoneinfo/right \
       "$root"/usr/share/zoneinfo/posix "$root"/usr/lib/python3*/test \
       "$root"/usr/share/bash-completion "$root"/usr/share/lintian "$root"/tmp/* \
       "$root"/usr/lib/udev/hwdb.d "$root"/lib/udev/hwdb.d "$root"/var/lib/dpkg/info
# Package management and what only it runs (apt, debconf, Perl: ~14 MB), glibc's iconv
# converters (~8 MB: UTF-8 and Latin-1 are built in; Python has its own codecs) and pydoc's
# topics: nothing in the ramdisk runs them at run time (the same base for either agent).
rm -rf "$root"/usr/bin/apt* "$root"/usr/lib/apt "$root"/usr/lib/x86_64-linux-gnu/libapt-* \
       "$root"/usr/bin/perl* "$root"/usr/lib/x86_64-linux-gnu/perl-base "$root"/usr/share/perl5 \
       "$root"/usr/bin/debconf* "$root"/usr/share/debconf "$root"/usr/lib/x86_64-linux-gnu/gconv \
       "$root"/usr/lib/python3*/pydoc_data
# (hwdb.d is the source of hwdb.bin, which stays; dpkg's per-package file lists are only for
# dpkg: every byte left out is a byte the kernel need not unpack at boot.)

# -- 6. the initramfs ----------------------------------------------------------------------------
step "packing the initramfs (${compress[0]})"
(cd "$root" && find . -xdev -print0 | LC_ALL=C sort -z \
   | cpio --null -o -H newc --quiet | "${compress[@]}") >"$work/initrd.img"

mv "$work/vmlinuz" "$output/vmlinuz"
mv "$work/initrd.img" "$output/initrd.img"
elapsed=$(since)
{
  echo "hash: $hash"
  echo "suite: $suite"
  echo "agent: $agent$([ "$agent" = ours ] || echo " (ironic-python-agent $reference_version)")"
  echo "mirror: $mirror"
  echo "kernel: $kver ($kernel_package)"
  echo "packages: minbase,$packages"
  echo "initrd bytes: $(stat -c %s "$output/initrd.img")"
  echo "build seconds: $elapsed"
} >"$output/manifest.txt"
echo "$hash" >"$output/stamp"
step "done: $output/vmlinuz, $output/initrd.img ($(du -h "$output/initrd.img" | cut -f1))"
