#!/usr/bin/env bash
# `make test-arm64`: the edge client on arm64 under qemu-user emulation, end to end.
#
#   1. host tools: mmdebstrap, qemu-user-static, binfmt-support (apt-get, when missing; needs root or sudo)
#   2. binfmt_misc: mounted, and qemu-aarch64 registered with the F flag (the kernel runs aarch64 binaries
#      anywhere, a chroot included, through the host's static emulator)
#   3. an arm64 Debian root file system (mmdebstrap from Debian's packages: python3, python3-venv)
#   4. aarch64 wheels, downloaded on the host (pip download --platform): `.[edge-lite]`, and `.[edge]` (torch)
#   5. inside the root: a venv, `pip install --no-index fedgen-fleet[edge-lite]` from those wheels
#   6. a 2-round FedGen job on the shipped MNIST subset: broker, server and a host device here, the arm64
#      device `edge-client --runtime lite` in the root (bench/arm64/job.py) on an emulated Cortex-A53 (a Pi Zero
#      2 W's CPU; ARM64_CPU); then the same job all on the host: the accuracy must agree round by round
#   7. the same with `.[edge]` and `--runtime torch`, when torch's aarch64 wheel installs within
#      ARM64_TORCH_BUDGET seconds (ARM64_TORCH=0 leaves it out); when torch cannot run on ARM64_CPU, on
#      ARM64_TORCH_CPU (default cortex-a76, a Pi 5's)
#   8. the report: printed, and written to ARM64_REPORT (default bench/results/arm64.md)
# Every step is timed. The root file system is kept in ARM64_WORK and reused by later runs (ARM64_FRESH=1
# rebuilds it, and the wheels and venvs, from nothing).
#
# Settings (environment): ARM64_WORK (default /var/tmp/fedgen-arm64, outside the checkout), ARM64_SUITE
# (bookworm), ARM64_MIRROR (http://deb.debian.org/debian), ARM64_CPU (cortex-a53), ARM64_TORCH (1),
# ARM64_TORCH_BUDGET (600), ARM64_TORCH_CPU (cortex-a76), ARM64_FRESH (0), PYTHON (the host's Python with the
# project's server extra; default .venv/bin/python).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
WORK="${ARM64_WORK:-/var/tmp/fedgen-arm64}"
ROOT="$WORK/root"
SUITE="${ARM64_SUITE:-bookworm}"
MIRROR="${ARM64_MIRROR:-http://deb.debian.org/debian}"
TORCH="${ARM64_TORCH:-1}"
TORCH_BUDGET="${ARM64_TORCH_BUDGET:-600}"
FRESH="${ARM64_FRESH:-0}"
CPU="${ARM64_CPU:-cortex-a53}"
TORCH_CPU="${ARM64_TORCH_CPU:-cortex-a76}"
PY="${PYTHON:-$REPO/.venv/bin/python}"
REPORT="${ARM64_REPORT:-$REPO/bench/results/arm64.md}"
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

T_START=$EPOCHREALTIME
mkdir -p "$WORK"
RUN="$WORK/run"
rm -rf "$RUN" && mkdir -p "$RUN"
TIMES="$RUN/times.tsv"
: > "$TIMES"
note() { printf '%s\t%s\n' "$1" "$2" >> "$RUN/notes.tsv"; echo "test-arm64: $1: $2"; }
: > "$RUN/notes.tsv"
# run_step NAME COMMAND...: run it in a subshell with errexit (so a failing command inside a function stops it),
# record its wall time and status, leave the status in STEP_RC. step: stop the script when it fails;
# try_step: go on.
run_step() {
  local name="$1"; shift
  local t0=$EPOCHREALTIME
  echo "test-arm64: == $name"
  set +e
  ( set -e; "$@" )
  STEP_RC=$?
  set -e
  printf '%s\t%s\t%s\n' "$name" "$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')" \
    "$STEP_RC" >> "$TIMES"
}
step() {
  run_step "$@"
  if [ "$STEP_RC" != 0 ]; then echo "test-arm64: FAILED: $1 (exit $STEP_RC)" >&2; exit "$STEP_RC"; fi
}
try_step() {
  run_step "$@"
  if [ "$STEP_RC" != 0 ]; then echo "test-arm64: $1 failed (exit $STEP_RC); going on" >&2; fi
}
GUEST=(chroot "$ROOT" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8)
guest() {  # guest COMMAND...: run in the root, with a clean environment (none of the host's pip settings)
  $SUDO "${GUEST[@]}" "$@"
}
mounted=0
cleanup() {
  if [ "$mounted" = 1 ]; then $SUDO umount "$ROOT/proc" 2>/dev/null || true; fi
}
trap cleanup EXIT

[ -x "$PY" ] || { echo "test-arm64: $PY not found (run make install, or set PYTHON)" >&2; exit 2; }

# ------------------------------------------------------------------------------------------ 1. host tools
host_tools() {
  local missing=()
  command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
  [ -x /usr/bin/qemu-aarch64-static ] || missing+=(qemu-user-static)
  command -v update-binfmts >/dev/null || missing+=(binfmt-support)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "test-arm64: installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
    note "host packages installed" "${missing[*]}"
  fi
}
step "host tools (apt-get install mmdebstrap qemu-user-static binfmt-support when missing)" host_tools

# ------------------------------------------------------------------------------------------ 2. binfmt_misc
binfmt() {
  if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    $SUDO mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || {
      echo "test-arm64: cannot mount binfmt_misc (an unprivileged container?): the kernel cannot run aarch64" \
           "binaries through qemu here; run on a host or a privileged container" >&2; return 1; }
  fi
  if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    $SUDO update-binfmts --enable qemu-aarch64
  fi
  grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64
  grep -q '^flags:.*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 || {
    echo "test-arm64: qemu-aarch64 is registered without the F (fix binary) flag: a chroot would not find" \
         "the emulator; re-register it with qemu-user-static's binfmt entry" >&2; return 1; }
}
step "binfmt_misc (qemu-aarch64, F flag)" binfmt

# ------------------------------------------------------------------------------------------ 3. root fs
rootfs() {
  if [ "$FRESH" != 1 ] && [ -f "$ROOT/.fedgen-rootfs" ]; then
    note "root file system" "reused $ROOT (ARM64_FRESH=1 rebuilds it)"
    return 0
  fi
  if mountpoint -q "$ROOT/proc" 2>/dev/null; then $SUDO umount "$ROOT/proc"; fi  # left by an interrupted run
  $SUDO rm -rf --one-file-system "$ROOT" "$WORK/wheels"
  $SUDO mmdebstrap --quiet --arch=arm64 --variant=apt --include=python3,python3-venv "$SUITE" "$ROOT" "$MIRROR"
  echo "$SUITE $(date -u +%FT%TZ)" | $SUDO tee "$ROOT/.fedgen-rootfs" >/dev/null
  note "root file system" "built: Debian $SUITE arm64, $(du -sm "$ROOT" | cut -f1) MiB"
}
step "arm64 root file system (mmdebstrap)" rootfs
$SUDO mount -t proc proc "$ROOT/proc" && mounted=1
GUEST_INFO="$(guest python3 -c 'import platform, sys; print(platform.machine(), "%d.%d" % sys.version_info[:2])')"
read -r GUEST_MACHINE GUEST_PY <<< "$GUEST_INFO"
[ "$GUEST_MACHINE" = aarch64 ] || { echo "test-arm64: the root's python3 says $GUEST_MACHINE" >&2; exit 1; }
note "guest" "$GUEST_MACHINE, Python $GUEST_PY, $(guest sh -c '. /etc/os-release; echo $PRETTY_NAME')"

# ------------------------------------------------------------------------------------------ 4. wheels
PLATFORMS=(--platform manylinux2014_aarch64)
for minor in $(seq 17 36); do PLATFORMS+=(--platform "manylinux_2_${minor}_aarch64"); done
project_wheel() {  # the project's wheel, built from a copy of the checkout's files (the tree is not written)
  rm -rf "$RUN/src" "$WORK/wheels/project" && mkdir -p "$RUN/src" "$WORK/wheels/project"
  (cd "$REPO" && git ls-files -z -c -o --exclude-standard | while IFS= read -r -d '' f; do
     [ -f "$f" ] && printf '%s\0' "$f"; done | xargs -0 cp --parents -t "$RUN/src")
  "$PY" -m pip wheel --no-deps -w "$WORK/wheels/project" "$RUN/src" > "$RUN/project-wheel.log" 2>&1 || {
    tail -20 "$RUN/project-wheel.log" >&2; return 1; }
}
download() {  # download EXTRA: aarch64 wheels of fedgen-fleet[EXTRA] and its dependencies
  local wheel
  wheel="$(ls "$WORK"/wheels/project/fedgen_fleet-*.whl)"
  mkdir -p "$WORK/wheels/$1"
  PIP_FIND_LINKS= PIP_EXTRA_INDEX_URL= "$PY" -m pip download --quiet --no-cache-dir --only-binary=:all: "${PLATFORMS[@]}" --python-version "$GUEST_PY" \
    --implementation cp -d "$WORK/wheels/$1" "$wheel[$1]"
  cp "$wheel" "$WORK/wheels/$1/"
  note "wheels [$1]" "$(ls "$WORK/wheels/$1" | wc -l) files, $(du -sm "$WORK/wheels/$1" | cut -f1) MiB"
}
step "project wheel (host)" project_wheel
step "download aarch64 wheels of .[edge-lite] (host)" download edge-lite

# ------------------------------------------------------------------------------------------ 5-7. install, run
site_bytes() { du -sb "$ROOT$1/lib/python$GUEST_PY/site-packages" | cut -f1; }
install() {  # install EXTRA VENV [TIMEOUT_S]: a venv in the root, fedgen-fleet[EXTRA] from the wheels only
  local extra="$1" venv="$2" limit="${3:-0}" before after
  $SUDO rm -rf "$ROOT/opt/wheels-$extra" "$ROOT$venv"
  $SUDO cp -r "$WORK/wheels/$extra" "$ROOT/opt/wheels-$extra"
  guest python3 -m venv "$venv"
  before="$(site_bytes "$venv")"
  timeout "$limit" $SUDO "${GUEST[@]}" "$venv/bin/pip" install --quiet --disable-pip-version-check --no-index \
    --find-links "/opt/wheels-$extra" "fedgen-fleet[$extra]" || return 1
  after="$(site_bytes "$venv")"
  guest "$venv/bin/pip" list --format=freeze --disable-pip-version-check > "$RUN/packages-$extra.txt"
  echo "$((after - before))" > "$RUN/install-bytes-$extra"
  note "installed [$extra]" "$(awk -v b="$((after - before))" 'BEGIN { printf "%.1f MiB", b / 1048576 }') in $venv"
}
step "install .[edge-lite] in the arm64 root (emulated pip)" install edge-lite /opt/fedgen-lite
try_step "FedGen job, arm64 device --runtime lite on $CPU, and the same job on the host" \
  "$PY" "$REPO/bench/arm64/job.py" --root "$ROOT" --venv /opt/fedgen-lite --runtime lite --qemu-cpu "$CPU" \
  --reference --workdir "$RUN/job-lite" --out "$RUN/job-lite-$CPU.json"
LITE_RC=$STEP_RC  # the target's verdict: the lite device finished the job (the torch part is informative)

if [ "$TORCH" = 1 ]; then
  try_step "download aarch64 wheels of .[edge] (host)" download edge
  if [ "$STEP_RC" != 0 ] || [ -z "$(ls "$WORK"/wheels/edge/torch-*.whl 2>/dev/null)" ]; then
    note "torch" "no aarch64 wheels of .[edge] could be downloaded: not run"
  else
    try_step "install .[edge] in the arm64 root (emulated pip, budget $TORCH_BUDGET s)" \
      install edge /opt/fedgen-torch "$TORCH_BUDGET"
    if [ "$STEP_RC" != 0 ]; then
      note "torch" "installing .[edge] did not finish within ARM64_TORCH_BUDGET=$TORCH_BUDGET s (exit $STEP_RC): not run"
    else
      torch_parity() {  # lite vs torch local update, and a torch GEMM, in the root on each emulated CPU
        $SUDO cp "$REPO/bench/arm64/parity_probe.py" "$ROOT/opt/parity_probe.py"
        local cpu
        for cpu in "$CPU" max; do
          $SUDO "${GUEST[@]}" QEMU_CPU="$cpu" OMP_NUM_THREADS=1 /opt/fedgen-torch/bin/python /opt/parity_probe.py \
            > "$RUN/parity-$cpu.out" 2> "$RUN/parity-$cpu.err" || echo "exit $?" >> "$RUN/parity-$cpu.out"
        done
      }
      try_step "lite vs torch local update in the root, on $CPU and on qemu's max CPU" torch_parity
      torch_job() {  # torch_job CPU
        "$PY" "$REPO/bench/arm64/job.py" --root "$ROOT" --venv /opt/fedgen-torch --runtime torch --qemu-cpu "$1" \
          --reference --workdir "$RUN/job-torch-$1" --out "$RUN/job-torch-$1.json"
      }
      try_step "FedGen job, arm64 device --runtime torch on $CPU, and on the host" torch_job "$CPU"
      if [ "$STEP_RC" != 0 ] && grep -q probe_failed "$RUN/job-torch-$CPU.json" 2>/dev/null; then
        note "torch on $CPU" "does not start: $(grep -o 'Illegal instruction' "$RUN/job-torch-$CPU.json" | head -1 \
          || echo 'the import failed') (see job-torch-$CPU.json); trying $TORCH_CPU"
        try_step "FedGen job, arm64 device --runtime torch on $TORCH_CPU, and on the host" torch_job "$TORCH_CPU"
      fi
      [ "$STEP_RC" = 0 ] || note "torch" "the torch job failed (exit $STEP_RC; logs in $RUN/job-torch-*)"
    fi
  fi
else
  note "torch" "left out (ARM64_TORCH=0)"
fi

# ------------------------------------------------------------------------------------------ 8. report
TOTAL="$(awk -v a="$T_START" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')"
"$PY" "$REPO/bench/arm64/report.py" --run "$RUN" --total "$TOTAL" --out "$REPORT"
echo "test-arm64: done in $TOTAL s; report: $REPORT"
exit "$LITE_RC"
