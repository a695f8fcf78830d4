# Issue 19 item 4 (~520 s): where the fp8 kernel's time goes, and the HF headline row with FP8StaticCache.
# 1. bench_generate's headline row (B 8, cap 32k, L 16k) for kvdecode bf16 and fp8, every mode (captured fp8
#    3.38 vs bf16 3.25 ms on 12-05b, before the one-row mask; the row's attention alone is 0.665x bf16 now).
# 2. packed KV heads on fp8 (the loop's instructions per head and tile 359 -> 266 at hp4, kernel_sass.py with
#    Triton 3.6: fp8 is bound by instructions, bf16 by bytes, where packing lost), at the HF row and B 16 L 32k.
# 3. Nsight Compute's raw metrics (pipes, issue, stalls) of the fp8 and bf16 kernels at B 16 L 32k.
source .whl/env.sh; export PATH=$PATH:/usr/local/cuda/bin:$(ls -d /opt/nvidia/nsight-compute/* 2>/dev/null | tail -1)
W=/tmp/w30; mkdir -p $W; snap() { tar czf $OUT/results.tgz -C $W . ; }
{ date -u; nvidia-smi -L; git log --oneline -1; ncu --version | tail -1; python3 -c "import torch,triton,transformers;print(torch.__version__,triton.__version__,transformers.__version__)"; } > $W/env.log 2>&1
timeout 200 python3 bench/bench_generate.py --rows 8x32768x16384 --backends kvdecode,kvdecode-fp8 --compile headline --tag fp8row --out $W > $W/bench-generate-fp8row.log 2>&1; echo "rc=$?" >> $W/bench-generate-fp8row.log; tail -12 $W/bench-generate-fp8row.log; snap
V=base,splits/2,hp2,hp4,hp4n32,hp4n32s*2,hp4s1,hp4w8
timeout 110 python3 bench/kernel_variants.py --mask --fill 0.5 --kv bf16,fp8 --shapes 8x32768 --variants $V --out $W > $W/kernel-variants-fp8-hf-row.log 2>&1; tail -20 $W/kernel-variants-fp8-hf-row.log; snap
mkdir -p $W/u; timeout 100 python3 bench/kernel_variants.py --kv fp8 --shapes 16x32768 --variants $V --out $W/u > $W/kernel-variants-fp8-16x32k.log 2>&1; tail -10 $W/kernel-variants-fp8-16x32k.log; snap
S="--section SpeedOfLight --section ComputeWorkloadAnalysis --section InstructionStats --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis --section Occupancy"
for kv in fp8 bf16; do
  timeout 80 ncu --clock-control none --profile-from-start off $S --csv --page raw python3 bench/ncu_cells.py --cell 16x32768 --kv $kv --no-sdpa --launches 1 > $W/ncu-raw-$kv-16x32768.csv 2> $W/ncu-$kv.err; echo "ncu $kv rc=$?" >> $W/env.log; snap
done
cat $W/env.log
