# 12-05 fourth session, call 3 (H100, ~300 s): the suite's failing test after its fix, the new mask-row GPU tests,
# the B 8 / 2048 eager HF row twice (12.99 vs sdpa 9.90 ms on the H200 12-05b: reproduced here?).
source .whl/env.sh
W=/tmp/w21; mkdir -p $W; snap() { tar czf $OUT/results.tgz -C $W . ; }
{ date -u; nvidia-smi -L; git log --oneline -1; } > $W/env.log 2>&1
HYPOTHESIS_PROFILE=gpu-smoke timeout 200 python3 -m pytest -q -n 4 -p no:cacheprovider tests/triton_kernels/test_fp8.py tests/triton_kernels/test_split_kv.py -k "packed_kv_heads_at_the_shapes or step_mask or checks_its_own or mask_row" -rfEs > $W/gpu-tests-fixed.log 2>&1; echo "rc=$?" >> $W/gpu-tests-fixed.log; tail -4 $W/gpu-tests-fixed.log; snap
for i in 1 2; do timeout 70 python3 bench/bench_generate.py --rows 8x2048x1024 --compile none --repeats 5 --backends sdpa,flex_attention,kvdecode --tag b8eager$i --out $W > $W/bench-generate-b8eager$i.log 2>&1; grep -E "^\| 8 " $W/bench-generate-b8eager$i.log $W/*b8eager$i*.md 2>/dev/null | head -4; done; snap
