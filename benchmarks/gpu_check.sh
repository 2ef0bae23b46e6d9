#!/usr/bin/env bash
# The GPU check (issue 17): one prepared script that runs, on one CUDA GPU and in under 10 minutes,
#   1. env         nvidia-smi, Python, torch, CUDA and the versions of the packages zmaj imports;
#   2. tests       the device-generic unit tests on the GPU: pytest --device cuda -m device (on the CPU dry run
#                  -m "device and not slow": the one slow device test compiles flex-attention, the GPU's path);
#   3. pretrain    the default pre-training (specs/pretrain/stdlib-tiny.yaml, precision auto = bf16 on CUDA),
#                  its held-out bits per byte and wall time;
#   4. train_step  benchmarks/train_step.py on the GPT-2 124M shape (bf16, zmaj and nanoGPT, eager and
#                  compiled): tokens/s and MFU.
# Each step is timed and logged, a failed step does not stop the next, and the script exits 1 if any failed.
# A time budget (ZMAJ_GPU_CHECK_BUDGET_S, 540 s on a GPU) caps every step at what is left, so the whole script
# ends inside a 10-minute slot even when a step hangs; a step that finds under 20 s left is
# not started and counts as failed.
#
# Run from the repository root:
#   bash benchmarks/gpu_check.sh                             # on a machine with a CUDA GPU
#   ZMAJ_GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh   # dry run: the same steps in tiny form on the CPU
#   bash benchmarks/gpu_check.sh --wheels                    # fill .whl/ for a GPU machine without uv (below)
#
# Results go to $OUT (default benchmarks/results/gpu): summary.md, env.txt, tests.log, pretrain.log,
# pretrain_metrics.jsonl, train_step.log, train_step.md, train_step_profile.txt. Eight flat files, which a remote
# machine's results can come back as (a lent machine returns at most 8, 2 folders deep), so the run folder and checkpoints stay in a scratch
# folder ($ZMAJ_GPU_CHECK_WORK, default a fresh one under /tmp). The summary is printed last.
#
# Packages. Here `uv run` provides them. A GPU machine that reaches no package registry (as the GPU machines lent
# to this project's development: Python 3.12 with its own torch, CUDA, Triton, transformers, tokenizers,
# safetensors, einops, jaxtyping, numpy, pytest and hypothesis, but no tensordict, pydantic, beartype, loguru,
# datasets or gguf) gets the missing ones as wheels at uv.lock's versions, and its own torch is used as it is:
#   here, once (needs internet):  bash benchmarks/gpu_check.sh --wheels     # ~6 MB into .whl/ (git-ignored)
#   there:                        bash benchmarks/gpu_check.sh              # with .whl/ copied along
# There the script installs .whl/*.whl into a scratch folder (pip --target --no-index --no-deps) and puts it and
# the repository on PYTHONPATH. That machine's torch may not be uv.lock's (env.txt records both): its timings,
# compiled ones above all (dynamo differs between versions), belong to the torch it ran.
#
# Settings (environment): ZMAJ_GPU_CHECK_DEVICE (cuda | cpu), ZMAJ_GPU_CHECK_STEPS (e.g. "env pretrain" to
# rerun two steps), ZMAJ_GPU_CHECK_BUDGET_S, ZMAJ_GPU_CHECK_PYTHON (an interpreter to use instead of uv or
# python3), ZMAJ_GPU_CHECK_WHEELS (the wheel folder, default .whl), ZMAJ_GPU_CHECK_TESTS (test paths),
# ZMAJ_GPU_CHECK_WORK, OUT.

set -uo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$SELF")/.." || exit 2
REPO=$PWD

# The distributions zmaj and its tests import that such a GPU machine lacks, plus
# typing-extensions: pydantic needs a newer one than the image may hold, and a newer one breaks nobody.
CARRIED="tensordict pyvers beartype pydantic pydantic-core annotated-types typing-inspection typing-extensions
loguru datasets dill multiprocess gguf"

if [[ ${1:-} == --wheels ]]; then
    wheels=${ZMAJ_GPU_CHECK_WHEELS:-.whl}
    python_version=${ZMAJ_GPU_CHECK_WHEEL_PYTHON:-3.12}  # the GPU machine's
    rm -rf "$wheels" && mkdir -p "$wheels"
    # shellcheck disable=SC2086
    pins=$(uv run --locked python - $CARRIED <<'EOF'
import sys, tomllib
locked = {p["name"]: p["version"] for p in tomllib.load(open("uv.lock", "rb"))["package"]}
print(" ".join(f"{name}=={locked[name]}" for name in sys.argv[1:]))
EOF
    ) || exit 2
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
        platforms+=(--platform "$p")
    done
    # shellcheck disable=SC2086
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python_version" \
        --implementation cp "${platforms[@]}" -d "$wheels" $pins || exit 2
    echo "$(find "$wheels" -type f -name '*.whl' | wc -l) wheels for Python $python_version in $wheels ($(du -sh "$wheels" | cut -f1)): $pins"
    exit 0
fi

if [[ ${1:-} == --env ]]; then  # the env step: what the machine is, and whether zmaj imports there
    read -r -a PY <<<"${ZMAJ_GPU_CHECK_PY:-python3}"
    DEVICE=${ZMAJ_GPU_CHECK_DEVICE:-cuda}
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "host: $(uname -srm); $(nproc) CPUs; interpreter: ${PY[*]}"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
    else
        echo "nvidia-smi: not found"
    fi
    # shellcheck disable=SC2086
    exec "${PY[@]}" - "$DEVICE" $CARRIED torch triton numpy transformers tokenizers safetensors einops jaxtyping \
        pytest hypothesis <<'EOF'
import importlib.metadata as metadata
import platform
import sys

device, packages = sys.argv[1], sys.argv[2:]
print(f"python {platform.python_version()} at {sys.executable}")
for name in packages:
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        version = "-"
    print(f"{name} {version}")

import torch

print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        memory = p.total_memory / 2**30
        print(f"cuda:{i} {p.name}, compute capability {p.major}.{p.minor}, {memory:.0f} GiB, {p.multi_processor_count} SMs")
import zmaj.convert.load
import zmaj.data.pipeline
import zmaj.models.gpt
import zmaj.train.loop

print("zmaj imports: ok")
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("torch sees no usable CUDA GPU")
EOF
fi

DEVICE=${ZMAJ_GPU_CHECK_DEVICE:-cuda}
STEPS=${ZMAJ_GPU_CHECK_STEPS:-env tests pretrain train_step}
WHEELS=${ZMAJ_GPU_CHECK_WHEELS:-.whl}
OUT=${OUT:-benchmarks/results/gpu}
WORK=${ZMAJ_GPU_CHECK_WORK:-$(mktemp -d /tmp/zmaj-gpu-check.XXXXXX)}
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
if [[ $DEVICE == cuda ]]; then
    BUDGET=${ZMAJ_GPU_CHECK_BUDGET_S:-540}
    # Unit tests: all of tests/unit, filtered to the device-generic ones by the marker.
    TESTS=${ZMAJ_GPU_CHECK_TESTS:-tests/unit}
    PRETRAIN_ARGS=(--set train.device=cuda)  # the spec's auto would fall back to a 10-minute CPU run
    TRAIN_STEP_ARGS=(--shape gpt2-124m --dtypes bf16 --stacks zmaj,nanoGPT --rounds 5)
    LIMITS=(env=60 tests=150 pretrain=150 train_step=330)
else
    # Dry run: every step and every file of the real one, on the CPU at a size that takes minutes.
    BUDGET=${ZMAJ_GPU_CHECK_BUDGET_S:-1800}
    TESTS=${ZMAJ_GPU_CHECK_TESTS:-tests/unit/nn/test_layers.py tests/unit/train/test_step.py}
    PRETRAIN_ARGS=(--set train.steps=2)
    TRAIN_STEP_ARGS=(--quick --dtypes fp32 --modes eager --stacks zmaj,nanoGPT --profile-steps 1)
    LIMITS=(env=120 tests=600 pretrain=600 train_step=600)
fi
START=$(date +%s)
RESULTS=$WORK/steps.tsv  # step, status, seconds, detail
: >"$RESULTS"
FAILED=0

limit_of() {  # the step's own time limit from LIMITS
    local entry
    for entry in "${LIMITS[@]}"; do [[ ${entry%%=*} == "$1" ]] && echo "${entry#*=}"; done
}

record() {  # step status seconds detail
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RESULTS"
    [[ $2 == ok ]] || FAILED=1
    echo "== $1: $2 in $3 s${4:+ ($4)}"
}

# run_step NAME COMMAND...: run the step under its time limit (capped by the budget left), output to
# $OUT/NAME.log (or env.txt), and record its status and seconds. Returns the command's exit status.
run_step() {
    local name=$1 log
    shift
    log=$OUT/$name.log
    [[ $name == env ]] && log=$OUT/env.txt
    local left=$((BUDGET - ($(date +%s) - START))) limit
    limit=$(limit_of "$name")
    ((limit > left)) && limit=$left
    if ((limit < 20)); then
        record "$name" "not run" 0 "only ${left} s of the ${BUDGET} s budget left"
        return 1
    fi
    echo "== $name: up to ${limit} s: $*"
    local began=$SECONDS rc
    timeout --kill-after=15 "$limit" "$@" >"$log" 2>&1
    rc=$?
    local took=$((SECONDS - began)) status=ok detail=""
    if ((rc == 124 || rc == 137)); then
        status=failed detail="stopped at its ${limit} s limit"
    elif ((rc != 0)); then
        status=failed detail="exit status $rc"
    fi
    record "$name" "$status" "$took" "$detail"
    tail -n 12 "$log" | sed 's/^/    /'
    return "$rc"
}

# The interpreter: an explicit one, else the project's environment through uv, else the machine's python3.
if [[ -n ${ZMAJ_GPU_CHECK_PYTHON:-} ]]; then
    PY=("$ZMAJ_GPU_CHECK_PYTHON")
elif command -v uv >/dev/null 2>&1; then
    PY=(uv run --locked python)
else
    PY=(python3)
fi
if [[ ${PY[0]} != uv ]]; then
    # No uv: carried wheels, if any, installed beside the machine's packages; zmaj itself from this checkout.
    SITE=$WORK/site
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        began=$SECONDS
        if "${PY[@]}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "$WHEELS"/*.whl >"$WORK/pip.log" 2>&1; then
            record setup ok $((SECONDS - began)) "$(find "$WHEELS" -type f -name '*.whl' | wc -l) wheels from $WHEELS"
        else
            record setup failed $((SECONDS - began)) "pip install of $WHEELS: $(tail -n 1 "$WORK/pip.log")"
        fi
    fi
    export PYTHONPATH=$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}
fi

has_step() { [[ " $STEPS " == *" $1 "* ]]; }

if has_step env; then
    # The script itself, as a command that timeout can run (a shell function it cannot).
    ZMAJ_GPU_CHECK_PY="${PY[*]}" ZMAJ_GPU_CHECK_DEVICE=$DEVICE run_step env bash "$SELF" --env
fi

if has_step tests; then
    # Slow device tests too on a GPU: the one there is, compiled flex-attention, is the GPU's own path (and
    # slow only where Inductor compiles it for a 2-core CPU).
    marker="device and not slow"
    [[ $DEVICE == cuda ]] && marker="device"
    pytest_args=(-m "$marker" -q -p no:cacheprovider -rfEx --durations=10)
    # pytest-xdist, where the machine has it (the GPU image does; uv.lock does not): the tests spend their time
    # in Python, so several processes sharing the GPU finish sooner.
    if [[ $DEVICE == cuda ]] && "${PY[@]}" -c "import xdist" >/dev/null 2>&1; then
        pytest_args+=(-n "$(($(nproc) > 16 ? 8 : ($(nproc) + 1) / 2))")
    fi
    # CI=1: hypothesis's derandomized profile (tests/conftest.py), so a failure shows again on the next run.
    # shellcheck disable=SC2086
    CI=1 run_step tests "${PY[@]}" -m pytest --device "$DEVICE" "${pytest_args[@]}" $TESTS
fi

if has_step pretrain; then
    if run_step pretrain "${PY[@]}" programs/pretrain.py --run-dir "$WORK/pretrain" \
        ${PRETRAIN_ARGS[@]+"${PRETRAIN_ARGS[@]}"} && ! grep -q " on $DEVICE" "$OUT/pretrain.log"; then
        record pretrain-device failed 0 "pretrain.log never says it trained on $DEVICE"
    fi
    cp "$WORK/pretrain/metrics.jsonl" "$OUT/pretrain_metrics.jsonl" 2>/dev/null
fi

if has_step train_step; then
    run_step train_step "${PY[@]}" benchmarks/train_step.py --device "$DEVICE" "${TRAIN_STEP_ARGS[@]}" \
        --out "$WORK/train_step" --note "benchmarks/gpu_check.sh on $DEVICE"
    cp "$WORK/train_step.md" "$OUT/train_step.md" 2>/dev/null
    cp "$WORK/train_step_profile.txt" "$OUT/train_step_profile.txt" 2>/dev/null
fi

python3 - "$RESULTS" "$OUT" "$DEVICE" "$(($(date +%s) - START))" <<'EOF'
"""summary.md: each step's status and time, then what it measured."""
import json
import re
import statistics
import sys
from pathlib import Path

results, out, device, total = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]


def read(name: str) -> str:
    path = out / name
    return path.read_text(errors="replace") if path.exists() else ""


env = read("env.txt")
first = env.splitlines()[0] if env else "date and commit: not recorded (env step not run)"
gpus = [line for line in env.splitlines() if line.startswith("cuda:")]
torch_line = next((line for line in env.splitlines() if line.startswith("torch ") and "CUDA" in line), "")
lines = [f"# GPU check on {device}", "", f"- {first}"]
lines += [f"- {line}" for line in (*gpus, torch_line) if line]
lines += ["", "| step | result | seconds | detail |", "| --- | --- | ---: | --- |"]
for row in results.read_text().splitlines():
    step, status, seconds, detail = (row.split("\t") + [""] * 4)[:4]
    lines.append(f"| {step} | {status} | {seconds} | {detail} |")
lines.append(f"| all | | {total} | |")

tests = read("tests.log").strip().splitlines()
if tests:
    lines += ["", f"Tests: {tests[-1].strip('= ')}"]

metrics = [json.loads(line) for line in read("pretrain_metrics.jsonl").splitlines() if line.strip()]
final = next((m for m in reversed(metrics) if m.get("final")), None)
steps = [m for m in metrics if "tokens_per_s" in m]
trained_on = re.search(r"M parameters, (\S+) on (\S+)", read("pretrain.log"))
if final is not None:
    on = f"{trained_on.group(1)} on {trained_on.group(2)}" if trained_on else "?"
    lines += [
        "",
        f"Pre-training (specs/pretrain/stdlib-tiny.yaml, {on}): held-out {final['val_bpb']:.3f} bits per byte "
        f"at step {final['step']} (unigram baseline {final.get('unigram_bpb', float('nan')):.3f}), "
        f"{final.get('wall_s', float('nan')):.0f} s wall time in all",
    ]
    if steps:
        later = steps[len(steps) // 2 :]  # the first steps include warm-up
        rate = statistics.median(m["tokens_per_s"] for m in later)
        mfu = [m["mfu"] for m in later if "mfu" in m]
        lines[-1] += f"; median {rate:,.0f} tokens/s" + (f" ({100 * statistics.median(mfu):.1f}% MFU)" if mfu else "")
        lines[-1] += " over the second half of its steps"
    lines[-1] += "."

table = [line for line in read("train_step.md").splitlines() if line.startswith("|")]
if table:
    lines += ["", "Training step (benchmarks/train_step.py; full notes in train_step.md):", "", *table]

text = "\n".join(lines) + "\n"
(out / "summary.md").write_text(text)
print("\n" + text)
EOF

if ((FAILED)); then
    echo "gpu_check: some steps failed; logs in $OUT"
    exit 1
fi
echo "gpu_check: all steps passed; results in $OUT"
