# GPU call (~480 s): the GPU suite on the code after a23a673 (the eager fused merge by default, the shared fused
# scratch, the mask-row check; first run 12-05d on an H100 before a23a673) and the host pieces of one call, both forms.
source .whl/env.sh
W=/tmp/w17; mkdir -p $W; snap() { tar czf $OUT/results.tgz -C $W . ; }
{ date -u; nvidia-smi -L; git log --oneline -1; git status --short | head; python3 -c "import torch,triton,transformers;print(torch.__version__,triton.__version__,transformers.__version__)"; } > $W/env.log 2>&1
export TIMELOG=$W/gpu-test-times.txt; t0=$(date +%s)
HYPOTHESIS_PROFILE=gpu-smoke OMP_NUM_THREADS=2 PYTHONPATH=$PWD/.whl:$PYTHONPATH timeout 420 python3 -m pytest -q -m gpu -n 8 --dist loadgroup -p no:cacheprovider -p timelog --durations=15 -rfEsx > $W/gpu-tests.log 2>&1; echo "pytest rc=$? wall $(( $(date +%s) - t0 )) s" >> $W/gpu-tests.log
tail -4 $W/gpu-tests.log; grep -E "^FAILED|^ERROR" $W/gpu-tests.log | head -20; snap
timeout 45 python3 bench/profile_host.py --parts > $W/host-parts.log 2>&1; grep -v Warn $W/host-parts.log | tail -21; snap
