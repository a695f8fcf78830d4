# Next GPU session, call 1 (~480 s): the GPU suite on the code after 5a6f9c6 (packed KV heads, the one-row mask, the
# fused merge, the mask-row check, the fused scratch per stream: CPU-tested only) and the host pieces (one launch).
source .whl/env.sh
W=/tmp/w17; mkdir -p $W; snap() { tar czf $OUT/results.tgz -C $W . ; }
{ date -u; nvidia-smi -L; git log --oneline -1; git status --short | head; python3 -c "import torch,triton,transformers;print(torch.__version__,triton.__version__,transformers.__version__)"; } > $W/env.log 2>&1
export TIMELOG=$W/gpu-test-times.txt; t0=$(date +%s)
HYPOTHESIS_PROFILE=gpu-smoke OMP_NUM_THREADS=2 PYTHONPATH=$PWD/.whl:$PYTHONPATH timeout 420 python3 -m pytest -q -m gpu -n 8 --dist loadgroup -p no:cacheprovider -p timelog --durations=15 -rfEsx > $W/gpu-tests.log 2>&1; echo "pytest rc=$? wall $(( $(date +%s) - t0 )) s" >> $W/gpu-tests.log
tail -4 $W/gpu-tests.log; grep -E "^FAILED|^ERROR" $W/gpu-tests.log | head -20; snap
timeout 45 python3 bench/profile_host.py --parts > $W/host-parts.log 2>&1; grep -v Warn $W/host-parts.log | tail -21; snap
