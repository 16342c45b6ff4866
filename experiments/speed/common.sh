# Shared by the run_*.sh scripts here: `source`d after `out` is set. Sets up the output and scratch folders
# and defines `row SECONDS NAME ARGS...`, one benchmark process under a time limit, logged to $out/log.txt.
scratch=${TMPDIR:-/tmp}/atlas_speed_scratch  # traces and the XLA cache: large, kept out of OUT_DIR
mkdir -p "$out" "$scratch"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONUNBUFFERED=1
cache="--config.compilation_cache_dir=$scratch/xla_cache"
row() {  # row SECONDS NAME ARGS...
  local limit=$1 name=$2; shift 2
  echo "== $name" | tee -a "$out/log.txt"
  local start=$SECONDS
  timeout "$limit" python3 -m atlas_jax.benchmark --output="$out/results.jsonl" "$@" "$cache" 2>&1 \
    | grep -v '^[WI][0-9]' | tee -a "$out/log.txt"
  echo "== $name: rc ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$out/log.txt"
}
