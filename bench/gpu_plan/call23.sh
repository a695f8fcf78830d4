# A short GPU call (~300 s) for the code after 12-05d: the GPU tests of the fused merge (opt-in; shared scratch), the
# mask-row check, capture, compiled steps, warmup, transformers; then the host pieces of one call in both forms.
source .whl/env.sh
W=/tmp/w23; mkdir -p $W; snap() { tar czf $OUT/results.tgz -C $W . ; }
{ date -u; nvidia-smi -L; git log --oneline -1; } > $W/env.log 2>&1
HYPOTHESIS_PROFILE=gpu-smoke OMP_NUM_THREADS=2 timeout ${SUITE_S:-230} python3 -m pytest -q -m gpu -n 8 -p no:cacheprovider -rfEs tests/triton_kernels/test_launch.py tests/test_threads.py tests/test_capture.py tests/test_ops.py tests/test_hf.py tests/triton_kernels/test_fp8.py tests/triton_kernels/test_split_kv.py -k "fused or launch or thread or captur or reduce_overhead or warmup or gpu_ or packed or step_mask or checks_its_own" > $W/gpu-tests-subset.log 2>&1; echo "pytest rc=$?" >> $W/gpu-tests-subset.log
tail -3 $W/gpu-tests-subset.log; grep -E "^FAILED|^ERROR" $W/gpu-tests-subset.log | head -20; snap
timeout 45 python3 bench/profile_host.py --parts > $W/host-parts.log 2>&1; grep -v Warn $W/host-parts.log | tail -23; snap
