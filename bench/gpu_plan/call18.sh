# Next GPU session, call 2 (~470 s): the kernel variants at the cells behind SDPA (packed heads, the fused merge), the
# same under a transformers step's mask (MASK_KIND 3; mc0/mc1: the mask-row check off/on, 8x16384 = the HF
# headline's kernel, 146.5 us vs SDPA 134.4 on 12-05 with the per-row mask), the fp8 sweep's quick cells
# with the packed variants.
source .whl/env.sh
W=/tmp/w18; mkdir -p $W; snap() { tar czf $OUT/results.tgz -C $W . ; }
{ date -u; nvidia-smi -L; git log --oneline -1; } > $W/env.log 2>&1
timeout 150 python3 bench/kernel_variants.py --out $W --shapes 4x4096,16x1024,16x4096,64x1024 --variants base,hp2,hp4,hp4n32,hp4n32s*2,hp4w8,hp4s1,fm,hp4fm > $W/kernel-variants.log 2>&1; tail -45 $W/kernel-variants.log; snap
timeout 150 python3 bench/kernel_variants.py --mask --out $W --shapes 8x2048,16x1024,16x4096,8x16384 --variants base,mc0,mc1,hp4,hp4n32,fm,hp4fm > $W/kernel-variants-masked.log 2>&1; tail -34 $W/kernel-variants-masked.log; snap
timeout 150 python3 bench/bench_fp8.py --quick --sweep --out $W > $W/bench-fp8-sweep.log 2>&1; grep -vE "^\s*$" $W/bench-fp8-sweep.log | tail -12; snap
