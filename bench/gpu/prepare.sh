#!/bin/bash
# Runs HERE (network to the package index), before a GPU loan. Downloads, as cp312 manylinux x86-64
# wheels, what bench/gpu/check.sh needs on the GPU machine and its image lacks (bench/gpu/wheels.txt
# minus bench/gpu/preinstalled.txt) into .gpu-wheels/ (ignored by git; name it in the device call's
# `carry`). Prints the total and fails if it is over the carry budget.
#
#   bash bench/gpu/prepare.sh            # .gpu-wheels/ (~40 MB): loader peers, boto3, dagster
#   bash bench/gpu/prepare.sh --big      # also .dali/c0..cN: DALI (../shared/tools/dali-wheel-parts.sh)
#                                        # plus polars in one more part, each part carried by its own call
#
# Environment: GPU_WHEELS_MAX_MB (default 55), DALI_VERSION (default 2.4.0, read by the DALI script).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUTDIR=.gpu-wheels
MAX_MB=${GPU_WHEELS_MAX_MB:-55}
PIP=${PIP:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 ) -m pip}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux_2_30_x86_64 --platform manylinux_2_31_x86_64
           --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64 --platform manylinux1_x86_64
           --platform any)
DL=(download -q --disable-pip-version-check --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}")

big=0
[ "${1:-}" = "--big" ] && big=1

norm() { tr 'A-Z_.' 'a-z--'; }   # PEP 503 project name
project_of() { basename "$1" | cut -d- -f1 | norm; }

rm -rf "$OUTDIR" && mkdir -p "$OUTDIR"
tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' EXIT
mapfile -t preinstalled < <(grep -v '^#' bench/gpu/preinstalled.txt | grep -v '^$' | norm)

while read -r mode spec; do
  case "$mode" in ''|\#*) continue ;; esac
  echo "prepare: $mode $spec"
  if [ "$mode" = nodeps ]; then
    $PIP "${DL[@]}" --no-deps -d "$tmp" "$spec"
  else
    $PIP "${DL[@]}" -c constraints.txt -d "$tmp" "$spec"
  fi
done < bench/gpu/wheels.txt

kept=0 dropped=()
for w in "$tmp"/*.whl; do
  name=$(project_of "$w")
  if printf '%s\n' "${preinstalled[@]}" | grep -qx "$name"; then dropped+=("$name"); continue; fi
  mv "$w" "$OUTDIR/" && kept=$((kept + 1))
done
# two versions of one project would stop the install there
dups=$(for w in "$OUTDIR"/*.whl; do project_of "$w"; done | sort | uniq -d)
[ -z "$dups" ] || { echo "prepare: FAILED: two versions of: $dups" >&2; exit 1; }
echo "prepare: preinstalled there, not carried: ${dropped[*]:-none}"

if [ $big = 1 ]; then
  # DALI (CUDA 13) is larger than one call may carry: the shared tool splits it into .dali/c0..cN.
  tool=../shared/tools/dali-wheel-parts.sh
  [ -f "$tool" ] || { echo "prepare: FAILED: $tool not found (needed for --big)" >&2; exit 1; }
  mkdir -p "$(git rev-parse --git-path info)"
  bash "$tool"
  # polars (the training test's data fixture writes a Parquet table with it) is ~55 MB: one more part
  n=$(ls -d .dali/c* | wc -l)
  mkdir -p ".dali/c$n"
  $PIP "${DL[@]}" -c constraints.txt -d ".dali/c$n" polars==2.1.0
  for w in ".dali/c$n"/*.whl; do
    printf '%s\n' "${preinstalled[@]}" | grep -qx "$(project_of "$w")" && rm -f "$w"
  done
  # check.sh verifies the copies on the machine against this list before it installs anything
  (cd .dali && for d in c*; do (cd "$d" && sha256sum -- *); done) > "$OUTDIR/big-parts.sha256"
  for d in .dali/c*; do
    mb=$(du -sm "$d" | cut -f1)
    [ "$mb" -le 60 ] || { echo "prepare: FAILED: $d is $mb MB (> 60)" >&2; exit 1; }
  done
  echo "prepare: big parts: $(ls -d .dali/c* | tr '\n' ' ')($(du -sm .dali | cut -f1) MB; one device call each)"
fi

bytes=$(du -cb "$OUTDIR" | tail -1 | cut -f1)
mb=$(( (bytes + 1048575) / 1048576 ))
echo "prepare: $OUTDIR: $kept wheels, $mb MiB"
if [ "$mb" -gt "$MAX_MB" ]; then
  echo "prepare: FAILED: $OUTDIR is $mb MiB, over the $MAX_MB MiB budget (64 MiB per call, tree included)" >&2
  exit 1
fi
# what travels with every call besides the carried paths: tracked + untracked-not-ignored files
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
tree_mb=$(( (tree + 1048575) / 1048576 ))
echo "prepare: working tree that travels: $tree_mb MiB; with $OUTDIR: $((tree_mb + mb)) MiB (limit 64 MiB per call)"
if [ $((tree_mb + mb)) -gt 64 ]; then
  echo "prepare: WARNING: the device call would be refused (over 64 MiB). Largest untracked, not ignored:" >&2
  git ls-files -o --exclude-standard | cut -d/ -f1 | sort -u | xargs -d '\n' du -sm 2>/dev/null | sort -rn | head -5 >&2
fi
