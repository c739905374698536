#!/bin/bash
# The GPU check: ONE device call (~8 min on an H200) that verifies every CUDA path and records the
# numbers. Runs THERE, from the repository root, with .gpu-wheels carried (bench/gpu/prepare.sh):
#
#   bash bench/gpu/check.sh            # everything; results in $OUT (results.json, summary.txt, check.log)
#   GPU_CHECK_PARTS=loaders,train bash bench/gpu/check.sh    # some parts (preflight always runs)
#   bash bench/gpu/check.sh --dry      # here, on CPU, tiny sizes (make gpu-check-dry)
#
# 1. checks python3 and its torch (>= 2.11, CUDA, the APIs the engine uses): one line and exit 1 if not;
# 2. installs the carried wheels into a target folder (PYTHONPATH), and DALI + polars when their parts
#    were carried into $GPU_CHECK_BIG_DIR (default /root/dali) earlier in the same loan;
# 3. bench/gpu/run.py: pytest -m gpu, then each benchmark under `timeout`, figures into $OUT/results.json,
#    the summary table (targets beside the figures) last.
# Docs: docs/gpu-check.md.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
DRY=0
[ "${1:-}" = "--dry" ] && DRY=1
if [ $DRY = 1 ]; then
  OUT=${OUT:-$PWD/.forgeline/gpu-check-dry}
  PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
else
  OUT=${OUT:-$PWD/.forgeline/gpu-check}
  PY=${PYTHON:-python3}
fi
mkdir -p "$OUT"
exec > >(tee -a "$OUT/check.log") 2>&1
export PYTHONUNBUFFERED=1 OUT
echo "gpu-check: $(date -u +%FT%TZ) on $(hostname), $(nproc) CPUs, python $("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1)"

fail() { echo "gpu-check: FAILED: $*"; exit 1; }

# --- 1. the interpreter and its torch, in one line ---------------------------------------------
GPU_CHECK_DRY=$DRY "$PY" - <<'PYEOF' || exit 1
import importlib, os, sys
dry = os.environ["GPU_CHECK_DRY"] == "1"
def fail(msg):
    print(f"gpu-check: FAILED: {msg}"); sys.exit(1)
if not dry and sys.version_info[:2] != (3, 12):
    fail(f"python3 is {sys.version.split()[0]}: the carried wheels are for CPython 3.12")
try:
    import torch
except Exception as e:  # noqa: BLE001
    fail(f"import torch: {type(e).__name__}: {e}")
ver = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
if ver < (2, 11):
    fail(f"torch {torch.__version__} is older than 2.11, the oldest this check and the engine support")
missing = []
for api in ("compiler.save_cache_artifacts", "compiler.load_cache_artifacts", "cuda.Event", "cuda.Stream",
            "cuda.mem_get_info", "from_dlpack", "amp.GradScaler", "distributed.is_nccl_available"):
    obj = torch
    for part in api.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            try:
                obj = importlib.import_module(f"torch.{api.rsplit('.', 1)[0]}")
                obj = getattr(obj, api.rsplit(".", 1)[1], None)
            except ImportError:
                obj = None
            break
    if obj is None:
        missing.append(f"torch.{api}")
if missing:
    fail(f"torch {torch.__version__} lacks {', '.join(missing)}, which the engine uses")
if not dry:
    if not torch.cuda.is_available():
        fail(f"torch {torch.__version__} sees no CUDA device (CUDA build {torch.version.cuda})")
    if not torch.distributed.is_nccl_available():
        fail(f"torch {torch.__version__} has no NCCL (the DDP path needs it)")
    print(f"gpu-check: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
else:
    print(f"gpu-check: torch {torch.__version__} (dry run: no CUDA needed)")
PYEOF

# --- 2. carried wheels -------------------------------------------------------------------------
WHEELS=.gpu-wheels
SITE=${GPU_CHECK_SITE:-/tmp/gpu-check-site}
if [ $DRY = 1 ]; then
  if [ -d $WHEELS ]; then
    n=$(ls $WHEELS/*.whl 2>/dev/null | wc -l)
    dups=$(ls $WHEELS/*.whl 2>/dev/null | xargs -r -n1 basename | cut -d- -f1 | tr 'A-Z_.' 'a-z--' | sort | uniq -d)
    [ -z "$dups" ] || fail "$WHEELS holds two versions of: $dups"
    echo "gpu-check: $WHEELS: $n wheels, $(du -sm $WHEELS | cut -f1) MiB (dry run: not installed; the cp312 wheels are for the GPU machine)"
  else
    echo "gpu-check: $WHEELS: not prepared (dry run: the venv has the packages; bench/gpu/prepare.sh makes it)"
  fi
else
  ls $WHEELS/*.whl >/dev/null 2>&1 || fail "no $WHEELS/*.whl: run bash bench/gpu/prepare.sh here and name .gpu-wheels in the call's carry"
  stamp=$(ls -l $WHEELS/*.whl | md5sum | cut -c1-12)
  if [ "$(cat "$SITE/.stamp" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$SITE"
    "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
      --find-links $WHEELS --target "$SITE" $WHEELS/*.whl || fail "pip install of the carried wheels into $SITE"
    echo "$stamp" > "$SITE/.stamp"
  fi
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  echo "gpu-check: $(ls $WHEELS/*.whl | wc -l) carried wheels installed in $SITE"

  # --- DALI + polars: only when their parts were carried earlier in this loan -----------------
  BIG=${GPU_CHECK_BIG_DIR:-/root/dali}
  DSITE=${GPU_CHECK_BIG_SITE:-/tmp/gpu-check-big}
  if [ -n "$(ls "$BIG" 2>/dev/null)" ]; then
    ok=1
    if [ -f $WHEELS/big-parts.sha256 ]; then
      missing=$(cd "$BIG" && sha256sum -c --quiet "$OLDPWD/$WHEELS/big-parts.sha256" 2>&1 | grep -c ': FAILED')
      if [ "$missing" != 0 ]; then
        ok=0
        echo "gpu-check: DALI: $missing of $(wc -l < $WHEELS/big-parts.sha256) part files in $BIG missing or different: the dali part and DALI tests will skip"
        (cd "$BIG" && sha256sum -c "$OLDPWD/$WHEELS/big-parts.sha256" 2>&1 | grep -v ': OK$' | head -5)
      fi
    fi
    if [ $ok = 1 ] && [ "$(cat "$DSITE/.stamp" 2>/dev/null)" != done ]; then
      rm -rf "$DSITE" "$BIG/x" && mkdir -p "$BIG/x"
      { ! ls "$BIG"/p* >/dev/null 2>&1 || cat "$BIG"/p* | tar x -C "$BIG/x"; } &&
      "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
        --target "$DSITE" $(ls "$BIG"/x/*.whl "$BIG"/*.whl 2>/dev/null) && echo done > "$DSITE/.stamp" ||
        { ok=0; echo "gpu-check: DALI: unpacking/installing the parts from $BIG failed: the dali part will skip"; }
    fi
    if [ $ok = 1 ] && [ -d "$DSITE/nvidia" ]; then
      # nvimgcodec ships nvidia/__init__.py: a regular package there would hide the image's nvidia.*
      # (or, if the image's nvidia is a regular package, hide nvidia.dali). Merge the two instead.
      img=$("$PY" -c 'import nvidia, os; print(os.path.dirname(nvidia.__file__) if getattr(nvidia, "__file__", None) else "")' 2>/dev/null)
      if [ -n "$img" ]; then
        for d in "$DSITE"/nvidia/*/; do
          n=$(basename "$d"); [ "$n" = __pycache__ ] || [ -e "$img/$n" ] || ln -s "${d%/}" "$img/$n" ||
            echo "gpu-check: DALI: could not link $n into $img"
        done
      fi
      rm -f "$DSITE/nvidia/__init__.py"   # a namespace portion: never hides the image's nvidia package
    fi
    [ $ok = 1 ] && export PYTHONPATH="$DSITE:$PYTHONPATH" && echo "gpu-check: DALI + polars from $BIG installed in $DSITE"
  else
    echo "gpu-check: DALI: no parts in $BIG (carry .dali/c0..cN first, docs/gpu-check.md): the dali part and the DALI/training GPU tests skip"
  fi
fi

# --- 3. the parts -------------------------------------------------------------------------------
args=(--out "$OUT")
[ $DRY = 1 ] && args+=(--dry)
"$PY" bench/gpu/run.py "${args[@]}"
rc=$?
echo "gpu-check: done (rc $rc); results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $rc
