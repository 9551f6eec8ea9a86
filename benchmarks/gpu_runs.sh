#!/bin/bash
# The GPU runs issues 23 and 26 wait for, in the order they matter, each under a time limit, its log and JSON kept
# and everything packed into $OUT/results.tgz after each part, so a run cut short still returns what finished.
#
#   bash benchmarks/gpu_runs.sh first COMMIT    # ~9 min: engine overhead, never-accepted 8B draft, EAGLE capture cost
#   bash benchmarks/gpu_runs.sh second COMMIT   # ~9 min: trained pair + EAGLE head side by side, default γ on that pair
#   bash benchmarks/gpu_runs.sh third COMMIT    # ~8 min: serve on that pair (web stack as wheels in .whl/), GPU head
#
# COMMIT is recorded in the JSON (a copied checkout's git metadata can be stale). `second` and `third` share the pair
# trained in /tmp/fam, so run them on the same machine; `third` retrains a smaller pair if it is gone.
set -u
part="${1:?first, second or third}"
commit="${2:?the commit under test}"
out="${OUT:-$PWD/gpu-out}"
results=/tmp/gpu-results
family=/tmp/fam
mkdir -p "$out" "$results"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

run() {  # run NAME SECONDS COMMAND...: one measurement, its output in NAME.log, then everything so far packed
    local name=$1 seconds=$2
    shift 2
    local began
    began=$(date +%s)
    echo "=== $name ($(date +%T))"
    timeout "$seconds" "$@" >"$results/$name.log" 2>&1
    echo "rc=$? in $(($(date +%s) - began)) s" | tee -a "$results/$name.log"
    tail -20 "$results/$name.log"
    tar czf "$out/results.tgz" -C "$results" .
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
case "$part" in
first)
    run overhead 170 python3 benchmarks/overhead.py --out "$results/overhead" --commit "$commit"
    run batch8b 120 python3 benchmarks/batch.py --pair llama-8b --gamma 2 --batch-sizes 1,16,64 --max-new-tokens 64 \
        --repeats 1 --no-hf --out "$results/batch8b"
    run eagle_b 60 python3 benchmarks/eagle.py --parts b --batch-sizes 1 16 64 --out "$results/eagle"
    run controlled 150 python3 benchmarks/controlled.py --acceptance 0.8 --out "$results/controlled" --commit "$commit"
    ;;
second)
    run eagle_a 400 python3 benchmarks/eagle.py --parts a --family-dir "$family" --target-seconds 120 \
        --draft-seconds 40 --max-corpus-bytes 33554432 --batch-sizes 1 4 16 64 --out "$results/eagle"
    run policy 150 python3 benchmarks/policy.py --target "$family/target" --draft "$family/draft" \
        --batch-sizes 1,4,16,64 --gammas 1,2,3,4,6 --repeats 2 --out "$results/policy" --commit "$commit"
    ;;
third)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
        exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
    if [ ! -f "$family/target/config.json" ]; then
        run retrain 200 python3 -m speculor train --output "$family" --model target:32x576@100 --model draft:4x256@30 \
            --distill-from target --max-corpus-bytes 33554432 --device cuda
    fi
    run serve 300 python3 benchmarks/serve.py --target "$family/target" --draft "$family/draft" --device cuda \
        --max-batch-size 64 --requests 48 --max-tokens 128 --ignore-eos --json "$results/serve.json"
    run head 200 python3 -m speculor train-eagle --target speculor/models/target --output "$results/eagle3-target" \
        --seconds 150 --batch-size 64 --sequence-length 256 --ttt-steps 4 --draft-vocab 2048 --learning-rate 0.002 \
        --max-corpus-bytes 40000000 --device cuda --seed 0 --quiet
    ;;
*)
    echo "unknown part $part: first, second or third" >&2
    exit 2
    ;;
esac
