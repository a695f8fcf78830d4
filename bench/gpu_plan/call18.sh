# Next GPU session, call 2 (~450 s): the same variants under a transformers step's mask (MASK_KIND 3), the fp8 sweep's
# quick cells with the packed variants (issue 19 item 4), the B 8 / 2048 eager row twice and its profile (issue 18).
source .whl/env.sh
W=/tmp/w18; mkdir -p $W; snap() { tar czf $OUT/results.tgz -C $W . ; }
timeout 120 python3 bench/kernel_variants.py --mask --out $W --shapes 8x2048,16x1024,16x4096 --variants base,hp4,hp4n32,fm,hp4fm > $W/kernel-variants-masked.log 2>&1; tail -25 $W/kernel-variants-masked.log; snap
timeout 150 python3 bench/bench_fp8.py --quick --sweep --out $W > $W/bench-fp8-sweep.log 2>&1; grep -vE "^\s*$" $W/bench-fp8-sweep.log | tail -12; snap
for i in 1 2; do timeout 60 python3 bench/bench_generate.py --rows 8x2048x1024 --compile none --repeats 5 --tag b8eager$i --out $W > $W/bench-generate-b8eager$i.log 2>&1; grep -E "eager" $W/bench-generate-b8eager$i.log; done; snap
timeout 90 python3 bench/profile_hf_step.py --batch 8 --capacity 2048 --filled 1024 --backends sdpa,kvdecode --steps 20 --rows 25 > $W/hf-step-profile-b8-cap2048.log 2>&1; grep "===" $W/hf-step-profile-b8-cap2048.log; snap
