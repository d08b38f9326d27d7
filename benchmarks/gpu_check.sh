#!/usr/bin/env bash
# One prepared GPU check (issue 5): classify and CAM throughput over precisions x batch sizes
# on one CUDA device, in about 5 minutes, with a short report.
#
#   bash benchmarks/gpu_check.sh            # report: $OUT/gpu_report.txt (or benchmarks/gpu_report.txt)
#
# Needs torch with CUDA plus requirements.txt's packages (carry missing wheels, see the
# device notes); builds random full-size ViT-B/16 weights, so nothing is downloaded.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
REPORT="${OUT:-benchmarks}/gpu_report.txt"
N_CLASSIFY=${N_CLASSIFY:-64}     # images per classify run
N_CAMS=${N_CAMS:-32}             # images per CAM run
PER_RUN_S=${PER_RUN_S:-50}       # hard limit per run, so the whole matrix fits in ~5 minutes
WORK=$(mktemp -d)

{
  echo "# GPU check $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0))"
} | tee "$REPORT"

for precision in bf16 fp16 fp32; do
  for bs in 8 32; do
    echo "## classify precision=$precision batch_size=$bs n=$N_CLASSIFY" | tee -a "$REPORT"
    timeout "$PER_RUN_S" python3 benchmarks/bench_classify.py --device cuda --precision "$precision" \
        --batch_size "$bs" --n "$N_CLASSIFY" --skip_cold --skip_plain --rounds 1 --workdir "$WORK/cls" 2>&1 \
      | grep -E "per image|main forward|images/s|peak|crops per image" | tee -a "$REPORT"
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
