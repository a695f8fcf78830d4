# A short call for little device time (~480 s; SUITE_S=190 VARIANT_S=90 SHAPES=16x1024,16x4096 for ~340 s): the GPU tests the eager fused default touches (launch, threads,
# capture, ops, transformers, warmup; 240 s), the host pieces of one call (three forms), then kernel_variants with
# the deep pipelines at the batch cells behind SDPA (issue 18 item 1).
source .whl/env.sh
W=/tmp/w32; mkdir -p $W; snap() { tar czf $OUT/results.tgz -C $W . ; }
{ date -u; nvidia-smi -L; git log --oneline -1; python3 -c "import torch,triton,transformers;print(torch.__version__,triton.__version__,transformers.__version__)"; } > $W/env.log 2>&1
HYPOTHESIS_PROFILE=gpu-smoke OMP_NUM_THREADS=2 timeout ${SUITE_S:-240} python3 -m pytest -q -m gpu -n 8 -p no:cacheprovider -rfEs tests/triton_kernels/test_launch.py tests/test_threads.py tests/test_capture.py tests/test_ops.py tests/test_hf.py tests/test_static_cache.py -k "fused or launch or thread or captur or reduce_overhead or warmup or gpu_ or compile or pool or eager" > $W/gpu-tests-subset.log 2>&1; echo "pytest rc=$?" >> $W/gpu-tests-subset.log
tail -3 $W/gpu-tests-subset.log; grep -E "^FAILED|^ERROR" $W/gpu-tests-subset.log | head -20; snap
timeout 45 python3 bench/profile_host.py --parts > $W/host-parts.log 2>&1; grep -v Warn $W/host-parts.log | tail -25; snap
timeout ${VARIANT_S:-120} python3 bench/kernel_variants.py --shapes ${SHAPES:-16x1024,16x4096,4x4096,64x1024} --variants base,s1st4,s1st5,s1st6,s1n32st8,s4st4,s4st5 --out $W > $W/kernel-variants.log 2>&1; tail -32 $W/kernel-variants.log; snap
