# Next GPU session, call 1 (~560 s): the GPU suite on the code after 5a6f9c6 (packed KV heads, MASK_KIND 3, fused merge:
# CPU-tested only), the host pieces (fused merge: one launch), the kernel variants at the cells behind SDPA.
# Run from the repository root with carry [".whl"]: cp bench/gpu_plan/*.sh .whl/ first, or run it from here.
source .whl/env.sh
W=/tmp/w17; mkdir -p $W; snap() { tar czf $OUT/results.tgz -C $W . ; }
{ date -u; nvidia-smi -L; git log --oneline -1; git status --short | head; python3 -c "import torch,triton,transformers;print(torch.__version__,triton.__version__,transformers.__version__)"; } > $W/env.log 2>&1
export TIMELOG=$W/gpu-test-times.txt; t0=$(date +%s)
HYPOTHESIS_PROFILE=gpu-smoke OMP_NUM_THREADS=2 PYTHONPATH=$PWD/.whl:$PYTHONPATH timeout 340 python3 -m pytest -q -m gpu -n 8 --dist loadgroup -p no:cacheprovider -p timelog --durations=15 -rfEsx > $W/gpu-tests.log 2>&1; echo "pytest rc=$? wall $(( $(date +%s) - t0 )) s" >> $W/gpu-tests.log
tail -4 $W/gpu-tests.log; grep -E "^FAILED|^ERROR" $W/gpu-tests.log | head -20; snap
timeout 45 python3 bench/profile_host.py --parts > $W/host-parts.log 2>&1; grep -v Warn $W/host-parts.log | tail -20; snap
timeout 150 python3 bench/kernel_variants.py --out $W --shapes 4x4096,16x1024,16x4096,64x1024 --variants base,hp2,hp4,hp4n32,hp4n32s*2,hp4w8,hp4s1,fm,hp4fm > $W/kernel-variants.log 2>&1; tail -45 $W/kernel-variants.log; snap
