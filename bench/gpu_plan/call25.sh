# One call (~480 s) for a session short of device time: the GPU tests the day's changes touch (call23, 180 s), then
# Nsight Compute and the kernel variants at B 16 L 1k / 4k (call24). Each snapshots into its own results file.
SUITE_S=180 bash .whl/call23.sh; cp $OUT/results.tgz $OUT/results-call23.tgz 2>/dev/null
bash .whl/call24.sh
