# shellcheck shell=bash
# Sourced, not run: boots a COPY of a cached Debian rootfs (scripts/nspawn-rootfs) under
# systemd-nspawn as a full systemd system, with its own user namespace and so its own
# binfmt_misc instance (Linux >= 6.7): nothing registered inside reaches the host.
#   nspawn_prepare ROOTFS COPY   copy the cached rootfs, add the user-namespace guard
#   nspawn_boot COPY LOG         boot it in the background; sets NSPAWN_PID and NSPAWN_LEADER
#   nspawn_exec CMD...           run CMD as the container's root (clean environment)
#   nspawn_poweroff              clean shutdown, waits for systemd-nspawn to exit
# The guard: a unit that every binfmt_misc user in the container requires refuses to go on
# (and powers the container off) when the container shares the host's user namespace, and
# nspawn_boot checks the same from the host before returning.
NSPAWN_DIR=${BINFMTD_NSPAWN_DIR:-/var/lib/binfmtd-nspawn}
NSPAWN_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

nspawn_prepare() {
  local rootfs=$1 copy=$2 unit=/etc/systemd/system
  if pgrep -f -- "systemd-nspawn -D $copy " >/dev/null; then
    echo "nspawn: a container still runs on $copy" >&2; return 1
  fi
  rm -rf "$copy"
  mkdir -p "$(dirname "$copy")"
  cp -a --reflink=auto "$rootfs" "$copy"
  cat > "$copy$unit/binfmtd-nspawn-userns-guard.service" <<'UNIT'
[Unit]
Description=Refuse to use binfmt_misc from the host's user namespace
DefaultDependencies=no
Before=proc-sys-fs-binfmt_misc.mount systemd-binfmt.service binfmt-support.service sysinit.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'if grep -qE "^ *0 +0 +4294967295 *$" /proc/self/uid_map; then echo "binfmtd-nspawn: initial user namespace, refusing to boot" >&2; systemctl poweroff --force; exit 1; fi'
UNIT
  local dependent
  for dependent in proc-sys-fs-binfmt_misc.mount systemd-binfmt.service binfmt-support.service \
                   binfmtd.service; do
    mkdir -p "$copy$unit/$dependent.d"
    printf '[Unit]\nRequires=binfmtd-nspawn-userns-guard.service\nAfter=binfmtd-nspawn-userns-guard.service\n' \
      > "$copy$unit/$dependent.d/nspawn-guard.conf"
  done
  # pip inside trusts what the host trusts (a site's TLS-inspecting proxy included).
  cp /etc/ssl/certs/ca-certificates.crt "$copy/etc/ssl/certs/binfmtd-nspawn-host-ca.crt"
  # A real host mounts binfmt_misc at boot (automount); in a container /proc/sys is read-only,
  # so the automount is skipped: mount the container's own instance at boot instead.
  mkdir -p "$copy$unit/sysinit.target.wants"
  ln -sf /lib/systemd/system/proc-sys-fs-binfmt_misc.mount "$copy$unit/sysinit.target.wants/"
}

# Without systemd as the host's PID 1, --keep-unit puts the container's cgroups under the
# caller's: give each container its own cgroup so two can run side by side, and none leaves
# cgroups owned by its uid range behind for the next one.
nspawn_cgroups() {
  local name=$1 h
  [ -d /run/systemd/system ] && return 0
  for h in /sys/fs/cgroup/systemd /sys/fs/cgroup/unified /sys/fs/cgroup; do
    [ -w "$h/cgroup.procs" ] || continue
    mkdir -p "$h/binfmtd-nspawn-$name" && echo "$BASHPID" > "$h/binfmtd-nspawn-$name/cgroup.procs"
    [ "$h" = /sys/fs/cgroup ] || continue
    break
  done
}

nspawn_cgroups_remove() {
  local name=$1 h
  for h in /sys/fs/cgroup/systemd /sys/fs/cgroup/unified /sys/fs/cgroup; do
    [ -d "$h/binfmtd-nspawn-$name" ] || continue
    find "$h/binfmtd-nspawn-$name" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
}

nspawn_boot() {
  local copy=$1 log=$2 i state
  NSPAWN_NAME=$(basename "$copy")
  ( nspawn_cgroups "$NSPAWN_NAME"
    exec systemd-nspawn -D "$copy" -b --private-users=pick --register=no --keep-unit \
      --console=passive ) >"$log" 2>&1 &
  NSPAWN_PID=$!
  NSPAWN_LEADER=
  for i in $(seq 1 100); do
    # The container's init: the child of systemd-nspawn once it runs systemd.
    NSPAWN_LEADER=$(ps -o pid=,comm= --ppid "$NSPAWN_PID" 2>/dev/null | awk '$2 == "systemd" {print $1; exit}') || true
    [ -n "$NSPAWN_LEADER" ] && break
    kill -0 "$NSPAWN_PID" 2>/dev/null || { cat "$log" >&2; return 1; }
    sleep 0.1
  done
  [ -n "$NSPAWN_LEADER" ] || { echo "nspawn: no container init after 10 s" >&2; return 1; }
  if [ "$(readlink "/proc/$NSPAWN_LEADER/ns/user")" = "$(readlink /proc/self/ns/user)" ]; then
    echo "nspawn: the container shares the host's user namespace: stopping it" >&2
    nspawn_kill; return 1
  fi
  for i in $(seq 1 120); do
    state=$(nspawn_exec systemctl is-system-running 2>/dev/null || true)
    case $state in running|degraded) return 0 ;; esac
    kill -0 "$NSPAWN_PID" 2>/dev/null || { cat "$log" >&2; return 1; }
    sleep 0.5
  done
  echo "nspawn: the container did not finish booting (state: $state)" >&2
  return 1
}

nspawn_exec() {
  nsenter -t "$NSPAWN_LEADER" -a -- env -i PATH="$NSPAWN_PATH" HOME=/root LANG=C.UTF-8 \
    PIP_CERT=/etc/ssl/certs/binfmtd-nspawn-host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 "$@"
}

nspawn_poweroff() {
  local i
  nspawn_exec systemctl poweroff >/dev/null 2>&1 || true
  for i in $(seq 1 120); do
    if ! kill -0 "$NSPAWN_PID" 2>/dev/null; then
      wait "$NSPAWN_PID" 2>/dev/null || true
      nspawn_cgroups_remove "$NSPAWN_NAME"
      return 0
    fi
    sleep 0.5
  done
  echo "nspawn: no clean shutdown after 60 s: killing it" >&2
  nspawn_kill
  nspawn_cgroups_remove "$NSPAWN_NAME"
  return 1
}

# The hard way out (a failed check): the container's init first, so no process outlives it.
nspawn_kill() {
  [ -n "${NSPAWN_LEADER:-}" ] && kill -KILL "$NSPAWN_LEADER" 2>/dev/null
  [ -n "${NSPAWN_PID:-}" ] && kill -KILL "$NSPAWN_PID" 2>/dev/null
  wait "${NSPAWN_PID:-}" 2>/dev/null || true
  [ -n "${NSPAWN_NAME:-}" ] && nspawn_cgroups_remove "$NSPAWN_NAME"
  return 0
}
