# Sourced by scripts/gpu_study.sh, scripts/gpu_sitting.sh and scripts/cpu_slice.sh:
#   run NAME LOG_JSON COMMAND...
# runs COMMAND, appends its output to $OUT/NAME.log, and records in LOG_JSON the command, its
# wall time and exit code, the package versions, the device and the machine, which
# `python -m cifar_jax.publish --run_log LOG_JSON` turns into REPRODUCE.md.
run() {
  local name=$1 log_json=$2; shift 2
  local start; start=$(date +%s.%N)
  # tee ignores SIGTERM: a time limit signals the whole process group, and the command must
  # still be able to write its last lines (it stops cleanly on SIGTERM) into the log.
  "$@" 2>&1 | (trap '' TERM; exec tee -a "$OUT/$name.log")
  local rc=${PIPESTATUS[0]}
  python3 - "$log_json" "$name" "$start" "$rc" "$(printf '%q ' "$@")" <<'PY'
import json, os, platform, sys, time
path, name, start, rc, command = sys.argv[1:]
command = command.strip()
log = json.load(open(path)) if os.path.exists(path) else {"commands": [], "wall_times": {}}
if command not in log["commands"]:  # a resumed phase runs the same command again
    log["commands"].append(command)
log["wall_times"][name] = log["wall_times"].get(name, 0) + time.time() - float(start)
log.setdefault("exit_codes", {})[name] = int(rc)
versions = {"python": platform.python_version()}
for module in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "torch"):
    try:
        versions[module] = __import__(module, fromlist=["_"]).__version__
    except Exception:
        pass
try:
    import torch
    versions["cuda (torch)"] = torch.version.cuda
except Exception:
    pass
try:
    import jax
    log["device"] = f"{jax.device_count()}x {jax.devices()[0].device_kind}"
except Exception:
    pass
cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
            if line.startswith("model name")), platform.processor()) \
    if os.path.exists("/proc/cpuinfo") else platform.processor()
memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
log["machine"] = f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB, {platform.system()}"
log["versions"] = versions
with open(path + ".tmp", "w") as f:  # atomic: a time limit's SIGKILL may come mid-write
    json.dump(log, f, indent=2)
os.replace(path + ".tmp", path)
PY
  return "$rc"
}

# pack_results RUNS TAR: what the reports need from the runs under RUNS, and nothing else (no
# checkpoints, no weights, no compilation cache): each trial's result.json, metrics.jsonl and
# config.json, the grids' configs, tables, summaries and plots, HLO dumps.
pack_results() {
  local runs=$1 tar; tar="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"
  (cd "$runs" && find . \( -name checkpoints -o -name best_weights -o -name xla_cache \) -prune \
     -o \( -name result.json -o -name metrics.jsonl -o -name config.json -o -name grid_config.json \
     -o -name results.csv -o -name summary.md -o -name '*.png' -o -name '*.hlo.txt' \) -print \
     | tar czf "$tar" -T -)
}

# install_wheels: the pure-Python wheels in .whl/ (scripts/prepare_device.sh), for images that
# lack them, into /tmp/site on PYTHONPATH; once per process tree (a sitting's phases inherit it).
install_wheels() {
  case ":${PYTHONPATH:-}:" in *:/tmp/site:*) return 0 ;; esac
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
}
