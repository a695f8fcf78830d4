# Next GPU session, call 4 (~500 s), if call 18 (kernel_variants) shows a packed (heads_per_cta) variant ahead of base at B 16 L 1k/4k:
# retune B 4/16/64 x L 1k/4k of the H 32/8 D 128 bf16 family (the tuner now searches heads_per_cta), then the
# grid's batch cells side by side with torch SDPA on the retuned table. Install the table only if it wins:
# cp /tmp/w20/retune.json kvdecode/tuning/default_h200.json (with the results files under bench/results/).
source .whl/env.sh
W=/tmp/w20; mkdir -p $W; snap() { tar czf $OUT/results.tgz -C $W . ; }
python3 - <<'PY'
import json
table = json.load(open("kvdecode/tuning/default_h200.json"))
batches = table["families"]["hq32_hkv8_d128_tq1_bf16"]["batches"]
for b in ("4", "16", "64"):
    for n in ("1024", "4096"):
        batches[b]["lengths"].pop(n, None)  # re-measured below; every other point kept
json.dump(table, open("/tmp/w20/retune.json", "w"), indent=1)
PY
timeout 330 kvdecode tune --heads 32:8 --head-dim 128 --batch 4,16,64 --lengths 1024,4096 --out $W/retune.json > $W/tune.log 2>&1; echo "tune rc=$?" >> $W/tune.log; tail -15 $W/tune.log; snap
KVDECODE_TUNING_TABLE=$W/retune.json timeout 150 python3 bench/bench_decode.py --grid 'B=4,16,64;L=1k,4k' --sections grid --out $W > $W/grid-retuned.log 2>&1; tail -20 $W/grid-retuned.log; snap
