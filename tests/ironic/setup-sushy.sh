#!/usr/bin/env bash
# Idempotent: the Redfish BMC emulator (sushy-tools, libvirt driver) for the end-to-end test
# (tests/test_e2e_vm.py), in its own virtualenv .venv-sushy at the repository root, and the
# Debian packages it and Ironic's redfish-virtual-media boot need: libvirt (the daemons are
# started by the test itself, never as services), Debian's libvirt Python binding (the venv is
# made from /usr/bin/python3 with --system-site-packages so it sees it), OVMF and SeaBIOS, and
# what Ironic builds the boot ISO with (mkisofs, isolinux, ldlinux.c32, mtools).
set -euo pipefail
cd "$(dirname "$0")/../.."

SUSHY_TOOLS_VERSION=2.2.0
venv=.venv-sushy
stamp=$venv/.installed-$(sha1sum "$0" | cut -c1-12)
if [ -e "$stamp" ]; then
  exit 0
fi
started=$(date +%s)

debs=()
for pair in libvirtd:libvirt-daemon /usr/lib/*/libvirt/connection-driver/libvirt_driver_qemu.so:libvirt-daemon-driver-qemu \
            virtlogd:libvirt-daemon virsh:libvirt-clients \
            /usr/lib/python3/dist-packages/libvirt.py:python3-libvirt \
            /usr/share/OVMF/OVMF_CODE_4M.fd:ovmf /usr/share/seabios/bios-256k.bin:seabios \
            qemu-system-x86_64:qemu-system-x86 mkisofs:genisoimage \
            /usr/lib/ISOLINUX/isolinux.bin:isolinux \
            /usr/lib/syslinux/modules/bios/ldlinux.c32:syslinux-common mcopy:mtools; do
  tool=${pair%:*}
  case "$tool" in
    /*) compgen -G "$tool" >/dev/null || debs+=("${pair##*:}") ;;
    *) command -v "$tool" >/dev/null 2>&1 || debs+=("${pair##*:}") ;;
  esac
done
if ((${#debs[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "setup-sushy: missing Debian packages (${debs[*]}); the end-to-end VM test will skip" >&2
    exit 0
  fi
  echo "setup-sushy: installing Debian packages: ${debs[*]}"
  apt-get update -qq >/dev/null
  # No recommends: libvirt's default NAT network (a bridge on this machine) stays out; the
  # daemons are not started as services (policy-rc.d denies it while installing).
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; own_policy=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${debs[@]}" >/dev/null
  if [ "$own_policy" = 1 ]; then rm -f "$policy"; fi
fi

if [ ! -x "$venv/bin/python" ]; then
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q "sushy-tools==$SUSHY_TOOLS_VERSION"
"$venv/bin/python" -c 'import libvirt, sushy_tools'

rm -f "$venv"/.installed-*
touch "$stamp"
echo "setup-sushy: sushy-tools $SUSHY_TOOLS_VERSION in $venv ($(($(date +%s) - started))s)"
