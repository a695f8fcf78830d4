# Issue 18 item 1 (~150 s, after call17 on the same machine): the deep pipelines at the two batch cells still behind
# torch SDPA (B 16 L 1k / 4k: 1.03x / 1.007x at s1 st4 on 12-05e), deeper still, beside SDPA in one run.
source .whl/env.sh
W=/tmp/w33; mkdir -p $W; snap() { tar czf $OUT/results.tgz -C $W . ; }
{ date -u; nvidia-smi -L; git log --oneline -1; } > $W/env.log 2>&1
timeout 150 python3 bench/kernel_variants.py --shapes 16x1024,16x4096,4x4096 --variants base,s1st4,s1st5,s1st6,s1n32st8,s1st4w8,s4st4,s4st5 --out $W > $W/kernel-variants.log 2>&1; tail -28 $W/kernel-variants.log; snap
