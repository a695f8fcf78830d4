# The least device time that still says whether the eager fused default stands (~220 s): the GPU tests of the launcher,
# threads, capture and compiled steps (150 s), then the host pieces of one call (three forms).
source .whl/env.sh
W=/tmp/w35; mkdir -p $W; snap() { tar czf $OUT/results.tgz -C $W . ; }
{ date -u; nvidia-smi -L; git log --oneline -1; python3 -c "import torch,triton;print(torch.__version__,triton.__version__)"; } > $W/env.log 2>&1
HYPOTHESIS_PROFILE=gpu-smoke OMP_NUM_THREADS=2 timeout ${SUITE_S:-150} python3 -m pytest -q -m gpu -n 8 -p no:cacheprovider -rfEs tests/triton_kernels/test_launch.py tests/test_threads.py tests/test_capture.py tests/test_ops.py > $W/gpu-tests-core.log 2>&1; echo "pytest rc=$?" >> $W/gpu-tests-core.log
tail -3 $W/gpu-tests-core.log; grep -E "^FAILED|^ERROR" $W/gpu-tests-core.log | head -20; snap
timeout 45 python3 bench/profile_host.py --parts > $W/host-parts.log 2>&1; grep -v Warn $W/host-parts.log | tail -25; snap
