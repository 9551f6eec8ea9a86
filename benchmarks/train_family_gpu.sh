#!/usr/bin/env bash
# Train the family shipped in speculor/models on one GPU (about 6 minutes on an H100), from the card's own Python
# source, and pack it for the trip back: $OUT/family.tar.* (15 MB parts; `cat family.tar.* | tar xf -`) and
# $OUT/train.log. Run from the repository root. The shipped family is this script's target, draft-1x192 and
# draft-4x128, plus draft-3x128 and draft-4x128-long from a second, shorter run that distilled from the saved target
# (command in benchmarks/RESULTS.md, "Shipped family"); its draft-2x256 was not shipped. The environment variables
# only exist so the very same script can be rehearsed on a CPU with tiny settings first, e.g.
#   OUT=/tmp/rehearsal MAX_CORPUS_BYTES=300000 EXTRA="--steps 3 --batch-size 2 --sequence-length 64 --vocab-size 400" \
#     benchmarks/train_family_gpu.sh
set -euo pipefail
OUT=${OUT:-out/family-gpu}
WORK=${WORK:-/tmp/speculor-family}
TARGET_SECONDS=${TARGET_SECONDS:-180}
DRAFT_SECONDS=${DRAFT_SECONDS:-40}
MAX_CORPUS_BYTES=${MAX_CORPUS_BYTES:-200000000}
EXTRA=${EXTRA:-}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10 TOKENIZERS_PARALLELISM=true

mkdir -p "$OUT"
rm -rf "$WORK"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
  "$PYTHON" -c "import torch, transformers, tokenizers; print(torch.__version__, transformers.__version__, tokenizers.__version__)"
} 2>&1 | tee "$OUT/train.log"
# shellcheck disable=SC2086  # EXTRA is a list of options
"$PYTHON" -m speculor.train_command --output "$WORK/family" \
  --model "target:8x384@$TARGET_SECONDS" \
  --model "draft-1x192:1x192@$DRAFT_SECONDS" \
  --model "draft-2x256:2x256@$DRAFT_SECONDS" \
  --model "draft-4x128:4x128@$DRAFT_SECONDS" \
  --distill-from target --max-corpus-bytes "$MAX_CORPUS_BYTES" $EXTRA 2>&1 | tee -a "$OUT/train.log"
du -ab "$WORK/family" | tee -a "$OUT/train.log"
tar -C "$WORK" -cf - family | split -b 15M - "$OUT/family.tar."
date -u | tee -a "$OUT/train.log"
