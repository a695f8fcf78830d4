# Next GPU session, call 3 (~540 s): the B 8 / 2048 eager HF row twice (12.99 vs sdpa 9.90 ms on 12-05b: why?), then
# the HF rows 12-05b did not reach, compiled column included (issue 18 items 2 and 3). Afterwards, here:
# python bench/bench_generate.py --merge <12-05b parts> <part4> --out DIR; python bench/verdicts.py --generate
source .whl/env.sh
W=/tmp/w19; mkdir -p $W; snap() { tar czf $OUT/results.tgz -C $W . ; }
for i in 1 2; do timeout 60 python3 bench/bench_generate.py --rows 8x2048x1024 --compile none --repeats 5 --tag b8eager$i --out $W > $W/bench-generate-b8eager$i.log 2>&1; grep -E "eager" $W/bench-generate-b8eager$i.log; done; snap
timeout 400 python3 bench/bench_generate.py --rows 1x32768x16384,8x32768x1024,8x32768x16384x4096 --compile all --budget-s 1000 --tag part4 --out $W > $W/bench-generate-part4.log 2>&1; echo "rc=$?" >> $W/bench-generate-part4.log
grep -E "ms/step|FAILED|rc=" $W/bench-generate-part4.log | tail -30; snap
