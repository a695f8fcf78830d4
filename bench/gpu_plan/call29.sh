# Issue 18 item 1 (~540 s): retune the H 32/8 D 128 bf16 family's batch cells with the search's new few-split,
# deep-pipeline corner (one split x four stages: 20.4 us at B 16 L 1k against the table's 24.1, SDPA 19.9,
# h200-2026-12-05e/call25-kernel-variants.log), then the grid's batch cells beside torch SDPA on the retuned
# table and on the shipped one, in one call. Install the table only if it wins:
# cp <files_at>/retune.json kvdecode/tuning/default_h200.json (with the results files under bench/results/).
# The search's deep corner now also tries the one-wave split count (B 4: 4 splits) and 5 stages; kernel_variants
# last: deeper pipelines still (5, 6 stages; 8 of 32 keys; 8 warps) at the four batch cells behind SDPA.
source .whl/env.sh
W=/tmp/w29; mkdir -p $W; snap() { tar czf $OUT/results.tgz -C $W . ; }
{ date -u; nvidia-smi -L; git log --oneline -1; } > $W/env.log 2>&1
cp kvdecode/tuning/default_h200.json $W/retune.json
timeout 220 python3 -m kvdecode tune --coarse --heads 32:8 --head-dim 128 --batch 4,16,64 --lengths 1024,2048,4096,8192 --remeasure --out $W/retune.json > $W/tune.log 2>&1; echo "tune rc=$?" >> $W/tune.log; tail -20 $W/tune.log; snap
KVDECODE_TUNING_TABLE=$W/retune.json timeout 100 python3 bench/bench_decode.py --grid 'B=4,16,64;L=1k,4k' --sections grid --out $W/retuned > $W/grid-retuned.log 2>&1; tail -14 $W/grid-retuned.log; snap
timeout 100 python3 bench/bench_decode.py --grid 'B=4,16,64;L=1k,4k' --sections grid --out $W/shipped > $W/grid-shipped.log 2>&1; tail -14 $W/grid-shipped.log; snap
timeout 130 python3 bench/kernel_variants.py --shapes 16x1024,16x4096,4x4096,64x1024 --variants base,s1st4,s1st5,s1st6,s1n32st8,s1st4w8,s4st4,s4st5 --out $W > $W/kernel-variants.log 2>&1; tail -36 $W/kernel-variants.log; snap
