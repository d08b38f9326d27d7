#!/usr/bin/env bash
# The prepared GPU check: correctness first (one PASS or FAIL line per check, about 2 minutes),
# then classify and CAM throughput over precisions x batch sizes (about 3 minutes).
#
#   bash benchmarks/gpu_check.sh            # report: $OUT/gpu_report.txt (or benchmarks/gpu_report.txt)
#
# Needs torch with CUDA plus requirements.txt's packages; uses the golden fixtures of tests/ and
# random full-size ViT-B/16 weights, so nothing is downloaded. Exit status 1 if a check failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
REPORT="${OUT:-benchmarks}/gpu_report.txt"
N_CLASSIFY=${N_CLASSIFY:-64}     # images per classify run
N_CAMS=${N_CAMS:-32}             # images per CAM run
CHECK_S=${CHECK_S:-290}          # hard limit of the correctness part
PER_RUN_S=${PER_RUN_S:-35}       # hard limit per throughput run
WORK=$(mktemp -d)

{
  echo "# GPU check $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'devices', torch.cuda.device_count())"
} | tee "$REPORT"

echo "## correctness" | tee -a "$REPORT"
timeout "$CHECK_S" python3 benchmarks/gpu_check.py --device cuda --work "$WORK/check" 2>"$WORK/check.err" \
  | tee -a "$REPORT"
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then
  echo "FAIL correctness part: exit status $status (stderr tail below)" | tee -a "$REPORT"
  tail -n 20 "$WORK/check.err" | tee -a "$REPORT"
fi

for precision in bf16 fp16 fp32; do
  for bs in 8 32; do
    echo "## classify precision=$precision batch_size=$bs n=$N_CLASSIFY" | tee -a "$REPORT"
    timeout "$PER_RUN_S" python3 benchmarks/bench_classify.py --device cuda --precision "$precision" \
        --batch_size "$bs" --n "$N_CLASSIFY" --skip_cold --skip_plain --rounds 1 --workdir "$WORK/cls" 2>&1 \
      | grep -E "per image|main forward|images/s|peak|crops per image|vs fp32" | tee -a "$REPORT"
  done
done
for precision in fp16 fp32; do
  echo "## cams precision=$precision n=$N_CAMS" | tee -a "$REPORT"
  timeout "$PER_RUN_S" python3 benchmarks/bench_cams.py --device cuda --precision "$precision" \
      --n "$N_CAMS" --skip_plain --workdir "$WORK/cams" 2>&1 \
    | grep -E "per image|blocks|per label|peak" | tee -a "$REPORT"
done
rm -rf "$WORK"
echo "report: $REPORT"
[ "$status" -eq 0 ]
