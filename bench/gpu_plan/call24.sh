# Issue 18 item 1 (~200 s): why B 16 L 1k's split kernel (20.7 us) trails cuDNN's attention (19.4) when both read
# 67 MB (14.5 us at the floor): Nsight Compute's occupancy, warp stalls, memory and launch sections for kvdecode's
# Triton plan and torch SDPA in one process, and the same for B 16 L 4k; then the torch.profiler kernel list.
source .whl/env.sh; export PATH=$PATH:/usr/local/cuda/bin:$(ls -d /opt/nvidia/nsight-compute/* 2>/dev/null | tail -1)
W=/tmp/w24; mkdir -p $W; snap() { tar czf $OUT/results.tgz -C $W . ; }
{ date -u; nvidia-smi -L; git log --oneline -1; ncu --version | tail -1; } > $W/env.log 2>&1
S="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats --section ComputeWorkloadAnalysis"
for cell in 16x1024 16x4096; do
  timeout 120 ncu --clock-control none --profile-from-start off $S --csv --page details python3 bench/ncu_cells.py --cell $cell --launches 2 > $W/ncu-$cell.csv 2> $W/ncu-$cell.err; echo "$cell rc=$?" >> $W/env.log; snap
done
timeout 100 python3 bench/kernel_variants.py --out $W --shapes 16x1024,16x4096 --variants base,splits/2,splits*2,st3,st4,n128,w8,fm,s1n128st3,s1n128st3w8,s1st4,s2st4,s2n128st3 > $W/kernel-variants.log 2>&1; tail -24 $W/kernel-variants.log; snap
# issue 19 item 4: the HF headline row's attention (B 8, cap 32k, L 16k, step mask), bf16 against fp8 (captured
# 3.25 vs 3.38 ms a step on 12-05b: fp8 slower where it reads half the bytes)
timeout 120 python3 bench/kernel_variants.py --mask --fill 0.5 --kv bf16,fp8 --out $W --shapes 8x32768 --variants base,heuristic,tuned,st1,st3,n32,n128,splits/2,splits*2,w8,fm > $W/kernel-variants-hf-row.log 2>&1; tail -24 $W/kernel-variants-hf-row.log; snap
timeout 60 python3 bench/ncu_cells.py --cell 16x1024 --kernels --launches 20 > $W/kernels-16x1024.log 2>&1; cat $W/kernels-16x1024.log; snap
python3 - <<'PY' $W/ncu-16x1024.csv $W/ncu-16x4096.csv
import csv, sys
keep = ("Duration", "Achieved Occupancy", "Theoretical Occupancy", "Memory Throughput", "DRAM Throughput",
        "Registers Per Thread", "Block Limit", "Warp Cycles Per Issued", "Stall", "Grid Size", "Dynamic Shared",
        "Static Shared", "Issue Slots Busy", "Waves Per SM", "L2 Hit", "Eligible Warps", "No Eligible")
for path in sys.argv[1:]:
    try:
        rows = list(csv.DictReader(line for line in open(path) if line.startswith('"')))
    except Exception as e:
        print(path, e); continue
    print("==", path)
    for r in rows:
        name = r.get("Metric Name", "")
        if any(k in name for k in keep):
            print(f'{r.get("ID","")[:3]:>3} {r.get("Kernel Name","")[:28]:28} {name[:48]:48} {r.get("Metric Value","")} {r.get("Metric Unit","")}')
PY
