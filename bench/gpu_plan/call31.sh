# Issue 18 items 2-3 and 1 (~420 s): the B 8 / 2048 eager HF row (1.12-1.32x sdpa's step on 12-05e) under
# torch.profiler, sdpa and kvdecode (self CPU time per op: where the ~100 us a layer more than sdpa goes); the
# host pieces of one call (profile_host --parts); then the masked twins (what the HF rows run) retuned with the
# deep corner into a copy of the H200 table (install only with a results file showing the win).
source .whl/env.sh
W=/tmp/w31; mkdir -p $W; snap() { tar czf $OUT/results.tgz -C $W . ; }
{ date -u; nvidia-smi -L; git log --oneline -1; python3 -c "import torch,triton,transformers;print(torch.__version__,triton.__version__,transformers.__version__)"; } > $W/env.log 2>&1
timeout 150 python3 bench/profile_hf_step.py --batch 8 --capacity 2048 --filled 1024 --backends sdpa,kvdecode --steps 5 --rows 25 > $W/profile-hf-b8-2048.log 2>&1; echo "rc=$?" >> $W/profile-hf-b8-2048.log; grep -v Warn $W/profile-hf-b8-2048.log | head -90; snap
timeout 45 python3 bench/profile_host.py --parts > $W/host-parts.log 2>&1; grep -v Warn $W/host-parts.log | tail -24; snap
cp ${TABLE:-/tmp/w29/retune.json} $W/retune-masked.json 2>/dev/null || cp kvdecode/tuning/default_h200.json $W/retune-masked.json
timeout 200 python3 -m kvdecode tune --mask --coarse --heads 32:8 --head-dim 128 --batch 1,8 --lengths 2048,32768 --remeasure --out $W/retune-masked.json > $W/tune-masked.log 2>&1; echo "tune rc=$?" >> $W/tune-masked.log; tail -12 $W/tune-masked.log; snap
