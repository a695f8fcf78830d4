# Next GPU session, call 3 (~420 s): the HF rows 12-05b did not reach, compiled column included (issue 18 item 3)
source .whl/env.sh
W=/tmp/w19; mkdir -p $W; snap() { tar czf $OUT/results.tgz -C $W . ; }
timeout 400 python3 bench/bench_generate.py --rows 1x32768x16384,8x32768x1024,8x32768x16384x4096 --compile all --budget-s 1000 --tag part4 --out $W > $W/bench-generate-part4.log 2>&1; echo "rc=$?" >> $W/bench-generate-part4.log
grep -E "ms/step|FAILED|rc=" $W/bench-generate-part4.log | tail -30; snap
