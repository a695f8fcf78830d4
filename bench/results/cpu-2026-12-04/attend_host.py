import sys, torch, kvdecode
from kvdecode.plan import PLANS
from kvdecode.timing import host_overhead_us
label = sys.argv[1]
B,HQ,HKV,D,CAP=1,32,8,128,256
class N:
    def __call__(self,*a): pass
for left in (False, True):
    c = kvdecode.StaticKVCache(2, B, HKV, CAP, D, dtype=torch.bfloat16, device="cpu", left_padded=left, backend="triton")
    q=torch.randn(B,HQ,1,D,dtype=torch.bfloat16); out=torch.empty_like(q)
    kn=torch.randn(B,HKV,1,D,dtype=torch.bfloat16)
    c.append(0, kn, kn); c.attend(0, q, out=out)
    for p in PLANS._plans.values(): p.launcher._split=p.launcher._merge=N()
    print(label, "left_padded" if left else "plain", "attend(out=)", round(min(host_overhead_us(lambda: c.attend(1, q, out=out), n=10000) for _ in range(3)),2), "us")
